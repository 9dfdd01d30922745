"""How every Triton kernel of this package is launched, and how a launch is recorded instead.

The host functions launch through :func:`launch` (never ``kernel[grid](...)`` directly). Inside
:func:`capture`, :func:`launch` records the launch (kernel, grid, arguments) and runs nothing, and
the host code takes the GPU's decisions (:func:`gpu_target`, :func:`sm_count`) whatever the
tensors' device. That gives, without a GPU:

- the lowering check (:mod:`.lowering`): the exact specialisations real launches get, from the
  host code itself;
- the compilation count over many input sizes (``tests/triton/test_specialisation.py``).

:func:`specialisation` is what ``JITFunction.run`` computes before it looks up its kernel cache:
the signature (argument types), the constexpr values and the specialisation attributes
(``tt.divisibility`` 16 for 16-byte-aligned pointers and integers divisible by 16; integers equal
to 1 become constexprs), plus the compile options, through Triton's own binder for the CUDA
target. Two launches compile the same binary exactly when their :attr:`Specialisation.key` is
equal. Integer arguments that grow with the number of tokens are listed in each kernel's
``do_not_specialize`` so that the count of compilations over token counts stays bounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Launch", "Specialisation", "capture", "gpu_target", "launch", "sm_count"]

#: SMs of the target the lowering check plans for (H100 SXM).
TARGET_SMS = 132
#: SMs assumed off CUDA (the interpreter): a few programs, so the multi-program paths run.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Capture:
    sms: int
    launches: list[Launch] = field(default_factory=list)


_STATE = threading.local()
_SM_COUNT: dict[int, int] = {}


def _active() -> _Capture | None:
    return getattr(_STATE, "capture", None)


@contextlib.contextmanager
def capture(sms: int = TARGET_SMS) -> Iterator[list[Launch]]:
    """Record the launches of the block instead of running them (this thread only).

    Inside, the host code plans for a CUDA GPU with ``sms`` SMs whatever the tensors' device
    (CPU tensors are fine: only their dtype, shape, strides and address alignment matter).

    Yields:
        the list the launches are appended to, in launch order.
    """
    previous = _active()
    state = _Capture(sms)
    _STATE.capture = state
    try:
        yield state.launches
    finally:
        _STATE.capture = previous


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it inside :func:`capture`."""
    state = _active()
    if state is not None:
        state.launches.append(Launch(kernel, tuple(int(g) for g in grid), args, kwargs))
        return
    kernel[tuple(grid)](*args, **kwargs)


def gpu_target(device: torch.device) -> bool:
    """Whether the launch compiles for a GPU: tensors on CUDA, or inside :func:`capture`
    (False: the interpreter on CPU tensors)."""
    return device.type == "cuda" or _active() is not None


def sm_count(device: torch.device) -> int:
    """SMs of ``device`` (a cached host query, no sync); :data:`INTERPRETER_SMS` off CUDA; the
    capture's count inside :func:`capture`."""
    state = _active()
    if state is not None:
        return state.sms
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ------------------------------------------------------------------------- specialisation


@dataclass(frozen=True)
class Specialisation:
    """What a launch compiles: the inputs of ``triton.compile`` for one kernel binary.

    Attributes:
        kernel: the ``@triton.jit`` function launched.
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"constexpr"``...).
        constexprs: ``(index,)`` -> value of every constexpr argument (declared or specialised).
        attrs: ``(index,)`` -> specialisation attributes, e.g. ``[["tt.divisibility", 16]]``.
        options: compile options (``num_warps``, ``num_stages``, ...), as the launch parses them.
        key: the JIT cache key: equal keys, one compilation.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    key: str

    @property
    def name(self) -> str:
        return _jit(self.kernel).fn.__name__

    def hinted(self) -> list[str]:
        """The arguments with a ``tt.divisibility`` attribute, in order (``"strides[2]"`` for an
        element of a tuple argument)."""
        names = list(self.signature)
        return [
            names[path[0]] + "".join(f"[{i}]" for i in path[1:])
            for path, a in sorted(self.attrs.items())
            if a
        ]


_JIT_CACHE: dict[Any, Any] = {}  # interpreted kernel -> its JITFunction (kept alive here)
_BACKENDS: dict[tuple[int, int], tuple[Any, dict[int, Any]]] = {}


def _jit(kernel: Any) -> Any:
    """The ``JITFunction`` of ``kernel`` (under the interpreter, one built from the same Python
    function and ``triton.jit`` arguments, so both modes specialise alike)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    jit = _JIT_CACHE.get(kernel)
    if jit is None:
        jit = _JIT_CACHE[kernel] = JITFunction(kernel.fn, **kernel.kwargs)
    return jit


def specialisation(record: Launch, capability: int = 90, warp_size: int = 32) -> Specialisation:
    """What ``record`` compiles for ``sm_<capability>``, computed as ``JITFunction.run`` does.

    Uses Triton's launch binder (``triton.runtime.jit.create_function_from_signature``) and
    argument packing (``JITFunction._pack_args``) of the installed Triton (3.9): internal APIs,
    so a Triton upgrade may need this function updated (the tests would say so).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(record.kernel)
    backend, binders = _BACKENDS.setdefault((capability, warp_size), (None, {}))
    if backend is None:
        backend = make_backend(GPUTarget("cuda", capability, warp_size))
        _BACKENDS[(capability, warp_size)] = (backend, binders)
    binder = binders.get(id(jit))  # (a JITFunction's hash compiles its source: not here)
    if binder is None:
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        binders[id(jit)] = binder
    bound, spec, options = binder(*record.args, **record.kwargs)
    key = str(spec) + str(sorted(options.items()))
    options, signature, constexprs, attrs = jit._pack_args(
        backend, dict(record.kwargs), bound, spec, options
    )
    return Specialisation(jit, signature, constexprs, attrs, dict(options.__dict__), key)
