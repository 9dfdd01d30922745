"""Which implementation runs each op on each device: decided here and nowhere else.

Backends:
    ``ref``    plain PyTorch (:mod:`tokenprune_kernels.reference`), every op, every device.
    ``cpp``    the compiled extension's CPU kernels (``torch.ops.tokenprune._*``).
    ``cuda``   the compiled extension's CUDA kernels (CUDA builds only).
    ``triton`` Triton kernels (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``).

Automatic choice, per op: on CPU ``cpp`` then ``ref``; on CUDA ``cuda``, ``triton``, then ``ref``.
``TOKENPRUNE_BACKEND=ref|cpp|cuda|triton`` (or :func:`use_backend` in code) forces a backend for
every op it implements on that device; the other ops use ``ref``. ``auto`` (or unset) is the
automatic choice. Forcing a compiled backend when the extension did not load is an error.

In the composites, when ``select_topk`` runs on ``triton`` (or ``cuda``) the selection and the
gather/merge run fused in Triton (or CUDA), whatever backend the stand-alone gather/merge would get.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

from tokenprune_kernels import _extension

ENV_VAR = "TOKENPRUNE_BACKEND"
BACKENDS = ("ref", "cpp", "cuda", "triton")
_PREFERENCE = {"cpu": ("cpp", "ref"), "cuda": ("cuda", "triton", "ref")}

#: Stage ops and the private compiled op that implements each in C++/CUDA.
COMPILED_OP = {
    "instruction_attention": "_instruction_attention",
    "mapper_forward": "_mapper_forward",
    "select_topk": "_select_topk",
    "gather_kept": "_gather_kept",
    "merge_kept": "_merge_kept",
}
STAGE_OPS = ("instruction_attention", "mapper_forward", "select_topk", "gather_kept", "merge_kept")
#: Stage ops with a Triton implementation (:mod:`tokenprune_kernels.triton`): all of them.
TRITON_OPS = frozenset(STAGE_OPS)
COMPOSITE_OPS = ("prune_visual_tokens", "prune_and_merge")

_override: str | None = None


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_usable(device_type: str) -> bool:
    if not _triton_installed():
        return False
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def implemented(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` implements stage ``op`` for tensors on ``device_type``."""
    if backend == "ref":
        return True
    if backend in ("cpp", "cuda"):
        if (backend == "cpp") != (device_type == "cpu"):
            return False
        compiled = COMPILED_OP.get(op)
        key = "CPU" if backend == "cpp" else "CUDA"
        return compiled is not None and _extension.has_kernel(compiled, key)
    if backend == "triton":
        return op in TRITON_OPS and _triton_usable(device_type)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def requested() -> str:
    """The forced backend ('auto' when none): :func:`use_backend` first, then the env var."""
    value = _override if _override is not None else os.environ.get(ENV_VAR, "auto")
    value = value.strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    if value in ("cpp", "cuda") and not _extension.available():
        raise RuntimeError(
            f"{ENV_VAR}={value} needs the compiled extension, which did not load: "
            f"{_extension.load_error()}"
        )
    return value


def choose(op: str, device_type: str) -> str:
    """The backend that runs stage ``op`` on ``device_type`` ('cpu', 'cuda', ...)."""
    forced = requested()
    if forced != "auto":
        return forced if implemented(op, forced, device_type) else "ref"
    for backend in _PREFERENCE.get(device_type, ("ref",)):
        if implemented(op, backend, device_type):
            if backend == "ref":
                _extension.warn_if_missing()
            return backend
    return "ref"


def describe(device_type: str) -> dict[str, str]:
    """op -> backend for every public op on ``device_type`` (composites list their stages)."""
    table = {op: choose(op, device_type) for op in STAGE_OPS}
    forced = requested()
    for op in COMPOSITE_OPS:
        if forced == "ref":
            table[op] = "ref"
            continue
        last = "merge_kept" if "merge" in op else "gather_kept"
        parts = [f"{s}={table[s]}" for s in ("instruction_attention", "mapper_forward")]
        if table["select_topk"] in ("triton", "cuda"):
            parts.append(f"select_topk+{last}={table['select_topk']}(fused)")
        else:
            parts += [f"select_topk={table['select_topk']}", f"{last}={table[last]}"]
        table[op] = "stages(" + ", ".join(parts) + ")"
    return table


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` ('auto', 'ref', 'cpp', 'cuda', 'triton') inside a ``with`` block."""
    global _override
    previous = _override
    _override = name
    try:
        requested()  # validate now, not at the first op call
        yield
    finally:
        _override = previous
