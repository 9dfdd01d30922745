"""The op table: which backend implements which stage, and the choice made from it.

:data:`OPS` says which backends implement each stage op and with what, :data:`FUSED` which stage
pairs a backend runs as one, :data:`COMPOSITES` which stages each composite chains, and
:data:`CONVENTIONS` what every implementation of a stage is called with. Everything else is
derived from them: the backend that runs an op (:func:`choose`), the call itself (:func:`call`,
:func:`fused`, :func:`run`), ``tokenprune env``'s listing (:func:`describe`), the private compiled
ops whose fakes get registered (:func:`kernels`), the Triton modules and their lowering for sm_90
(:func:`triton_functions`), and the backends each parity test runs (:func:`backends`).

Backends:
    ``ref``    plain PyTorch (:mod:`tokenprune_kernels.reference`), every op, every device.
    ``cpp``    a CPU kernel of the compiled extension (a private op ``torch.ops.tokenprune._*``).
    ``cuda``   a CUDA kernel of the compiled extension (CUDA builds only).
    ``triton`` Triton kernels (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``).

Automatic choice, per op: on CPU ``cpp`` then ``ref``; on CUDA ``cuda``, ``triton``, then ``ref``.
``TOKENPRUNE_BACKEND=ref|cpp|cuda|triton`` (or :func:`use_backend` in code) forces a backend for
every op it implements on that device; the other ops use ``ref``. ``auto`` (or unset) is the
automatic choice. Forcing a compiled backend when the extension did not load is an error.

Adaptive keep rule (``keep_mass``): the selection and the composites first run stage
``mass_keep_counts`` (per-sample counts from the scores, on the device) on its own backend, read
the counts' total to the host once (it sizes the outputs: the only synchronisation this rule
adds; the fixed rules compute counts on the host and add none), then select as for any counts.

Spread rule (``spread_coords``): ``select_topk`` and the composites then run stage
``spread_select`` (which has no public op of its own: :data:`RUN_BY`) on the backend
:func:`choose` picks for it, after the keep counts (any keep rule), and the composites run their
gather or merge after it as a separate stage: no fused implementation takes the spread rule.

Fusion (stated here only): when ``select_topk`` runs on a backend that :data:`FUSED` lists for
(select, gather) or (select, merge) - Triton or CUDA - the composites run the selection and the
gather or merge as that one implementation (one compaction pass writes the kept rows straight
into the output; in CUDA one compiled op, ``_select_gather_kept`` / ``_select_merge_kept``, sized
by the host-known ``total_kept``: no synchronisation), whatever backend the stand-alone gather or
merge would get.

Calling convention: an implementation of a stage takes :data:`CONVENTIONS` positionally (the
public op's own arguments, validated by :mod:`tokenprune_kernels.ops`; select takes the
per-sample keep counts instead of the keep rule, spread_select those counts then
``spread_coords`` (made contiguous) and ``spread_radius`` as ``coords`` and ``radius``,
mass_keep_counts the per-sample bounds ``keep_bounds`` [2, B] instead of the min/max ratios)
plus the keywords its entry lists in ``hints``
(``total_kept``: the sum of the keep counts, known on the host), and returns what the public op
returns. ``tests/ops/test_schemas.py`` checks every entry against it.

Adding a backend for one stage touches its kernel file and one entry here, plus what a compiled
kernel needs to exist at all. A C++ CPU ``instruction_attention`` (private op
``_instruction_attention``; ``_mapper_forward`` likewise):

1. ``csrc/cpu/attention.cpp``: the kernel, registered with
   ``TORCH_LIBRARY_IMPL(tokenprune, CPU, m) { m.impl("_instruction_attention", ...); }``;
2. ``csrc/sources.txt``: ``cpp: csrc/cpu/attention.cpp`` (the source list of both builds);
3. ``csrc/torch_bindings.cpp``: its schema, one ``m.def`` taking the stage's
   :data:`CONVENTIONS` (then it needs no adapter, and the public op's fake is its fake);
4. here: ``"cpp": Impl(kernel="_instruction_attention", fake=f"{_OPS}.attention:_fake")``.

A CUDA kernel: ``csrc/cuda/<stage>.cu`` (torch-free, launcher in ``kernels.h``), its glue in
``csrc/cuda/ops_cuda.cpp`` (``TORCH_LIBRARY_IMPL(tokenprune, CUDA, m)``), ``csrc/sources.txt``,
the schema line if the private op is new, and ``"cuda": Impl(kernel=..., fake=...)`` (the same
fake as a ``cpp`` entry of that op). A Triton kernel: ``tokenprune_kernels/triton/<stage>.py``
(kernels, launched through ``triton.launch.launch``, and a host function taking the
convention), its SCENARIOS in ``triton/lowering.py`` (host calls; the lowered cases are the
launches they make), and ``"triton": Impl(f"{_TRITON}.<stage>:<function>")``. Dispatch, fake
registration, ``tokenprune env``, the Triton exports, the lowering check and the tests' backend
lists follow from the entry.
Nothing here touches a device or imports an implementation before its first call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenprune_kernels import _extension

ENV_VAR = "TOKENPRUNE_BACKEND"
BACKENDS = ("ref", "cpp", "cuda", "triton")
_PREFERENCE = {"cpu": ("cpp", "ref"), "cuda": ("cuda", "triton", "ref")}
#: The compiled backends: their device type and the dispatch key of their kernels.
_COMPILED = {"cpp": ("cpu", "CPU"), "cuda": ("cuda", "CUDA")}


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one stage.

    Attributes:
        call: ``"module:function"`` following the stage's calling convention, imported on first
            use. Empty for a private op called as is (``torch.ops.tokenprune.<kernel>``).
        kernel: for ``cpp``/``cuda``, the private compiled op; the entry is available where that
            op has a kernel for the backend's dispatch key.
        fake: ``"module:function"``, the fake of ``kernel`` (registered by the op layer).
        hints: keyword arguments the implementation takes beyond the convention (``total_kept``).
    """

    call: str = ""
    kernel: str = ""
    fake: str = ""
    hints: tuple[str, ...] = ()


#: Stage (or fused pair) -> the positional arguments of every implementation, in order.
CONVENTIONS: dict[str, tuple[str, ...]] = {
    "instruction_attention": (
        "q", "k", "cu_seqlens_q", "cu_seqlens_k", "visual_idx", "cu_seqlens_v", "q_pos",
        "softmax_scale",
    ),
    "instruction_attention_heads": (
        "q", "k", "cu_seqlens_q", "cu_seqlens_k", "visual_idx", "cu_seqlens_v", "q_pos",
        "softmax_scale", "head_groups",
    ),
    "mapper_forward": ("attn", "cu_seqlens_v", "params", "kernel_size", "input_eps", "grid"),
    "mass_keep_counts": ("scores", "cu_seqlens_v", "keep_bounds", "keep_mass", "relevance"),
    "select_topk": ("scores", "cu_seqlens_v", "keep_counts"),
    "spread_select": ("scores", "cu_seqlens_v", "keep_counts", "coords", "radius"),
    "gather_kept": ("visual_embeds", "position_ids", "kept_idx"),
    "merge_kept": (
        "inputs_embeds", "position_ids", "cu_seqlens", "visual_embeds", "visual_idx",
        "cu_seqlens_v", "kept_idx",
    ),
    # Fused: the first stage's arguments, then the second's less those the first takes or makes.
    "select_topk+gather_kept": (
        "scores", "cu_seqlens_v", "keep_counts", "visual_embeds", "position_ids",
    ),
    "select_topk+merge_kept": (
        "scores", "cu_seqlens_v", "keep_counts", "inputs_embeds", "position_ids", "cu_seqlens",
        "visual_embeds", "visual_idx",
    ),
}  # fmt: skip

_OPS = "tokenprune_kernels.ops"
_REF = "tokenprune_kernels.reference"
_TRITON = "tokenprune_kernels.triton"
_TOTAL = ("total_kept",)


def _adapted(kernel: str, hints: tuple[str, ...] = ()) -> Impl:
    """A compiled op of stage d called through its adapter in ``ops/gather.py``,
    ``<kernel>_compiled`` (the stage's convention: 1-D position ids too), its fake
    ``<kernel>_fake`` beside it."""
    return Impl(f"{_OPS}.gather:{kernel}_compiled", kernel, f"{_OPS}.gather:{kernel}_fake", hints)


_GATHER = _adapted("_gather_kept")
_MERGE = _adapted("_merge_kept")
_MASS = Impl(kernel="_mass_keep_counts", fake=f"{_OPS}.select:_mass_keep_counts_fake")
_SELECT = Impl(kernel="_select_topk", fake=f"{_OPS}.select:_select_topk_fake", hints=_TOTAL)
_SPREAD = Impl(kernel="_spread_select", fake=f"{_OPS}.select:_spread_select_fake", hints=_TOTAL)
#: The CPU and CUDA kernels of a stage share the private op and its fake.
_ATTENTION = Impl(kernel="_instruction_attention", fake=f"{_OPS}.attention:_fake")
_ATTENTION_HEADS = Impl(kernel="_instruction_attention_heads", fake=f"{_OPS}.attention:_heads_fake")
_MAPPER = Impl(kernel="_mapper_forward", fake=f"{_OPS}.mapper:_fake")

#: Stage op -> backend -> implementation (the conventions are in the module docstring).
OPS: dict[str, dict[str, Impl]] = {
    "instruction_attention": {
        "ref": Impl(f"{_REF}:instruction_attention_ref"),
        "cpp": _ATTENTION,
        "cuda": _ATTENTION,
        "triton": Impl(f"{_TRITON}.attention:instruction_attention_triton"),
    },
    "instruction_attention_heads": {
        "ref": Impl(f"{_REF}:instruction_attention_heads_ref"),
        "cpp": _ATTENTION_HEADS,
        "cuda": _ATTENTION_HEADS,
        "triton": Impl(f"{_TRITON}.attention:instruction_attention_heads_triton"),
    },
    "mapper_forward": {
        "ref": Impl(f"{_OPS}.mapper:_mapper_forward_ref"),
        "cpp": _MAPPER,
        "cuda": _MAPPER,
        "triton": Impl(f"{_TRITON}.mapper:mapper_forward_triton"),
    },
    # No Triton entry: with selection on Triton the counts run as torch ops on the device (ref).
    "mass_keep_counts": {
        "ref": Impl(f"{_REF}:mass_keep_counts_ref"),
        "cpp": _MASS,
        "cuda": _MASS,
    },
    "select_topk": {
        "ref": Impl(f"{_REF}:select_topk_ref"),
        "cpp": _SELECT,
        "cuda": _SELECT,
        "triton": Impl(f"{_TRITON}.select:select_topk_triton", hints=_TOTAL),
    },
    # The spread rule's selection (select_topk with spread_coords; never fused). No Triton entry:
    # the greedy pass is sequential within a sample (a token's fate depends on the tokens accepted
    # before it); on CUDA the cuda kernel runs it, one warp per sample.
    "spread_select": {
        "ref": Impl(f"{_REF}:spread_select_ref"),
        "cpp": _SPREAD,
        "cuda": _SPREAD,
    },
    "gather_kept": {
        "ref": Impl(f"{_REF}:gather_kept_ref"),
        "cpp": _GATHER,
        "cuda": _GATHER,
        "triton": Impl(f"{_TRITON}.gather:gather_kept_triton"),
    },
    "merge_kept": {
        "ref": Impl(f"{_REF}:merge_kept_ref"),
        "cpp": _MERGE,
        "cuda": _MERGE,
        "triton": Impl(f"{_TRITON}.gather:merge_kept_triton"),
    },
}

#: (stage, next stage) -> backend -> one implementation of both (see "Fusion" above).
FUSED: dict[tuple[str, str], dict[str, Impl]] = {
    ("select_topk", "gather_kept"): {
        "cuda": _adapted("_select_gather_kept", _TOTAL),
        "triton": Impl(f"{_TRITON}.gather:select_gather_triton", hints=_TOTAL),
    },
    ("select_topk", "merge_kept"): {
        "cuda": _adapted("_select_merge_kept", _TOTAL),
        "triton": Impl(f"{_TRITON}.gather:select_merge_triton", hints=_TOTAL),
    },
}

#: Composite op -> the stages it chains, in order (mapper_forward only when given parameters).
COMPOSITES: dict[str, tuple[str, ...]] = {
    "prune_visual_tokens": (
        "instruction_attention",
        "mapper_forward",
        "select_topk",
        "gather_kept",
    ),
    "prune_and_merge": ("instruction_attention", "mapper_forward", "select_topk", "merge_kept"),
}

#: Stage -> the public op that runs it, for a stage without a public op of its own.
RUN_BY: dict[str, str] = {"spread_select": "select_topk"}

STAGE_OPS = tuple(OPS)
COMPOSITE_OPS = tuple(COMPOSITES)
#: The public ops of ``torch.ops.tokenprune``: every stage with an op of its own, the composites.
PUBLIC_OPS = tuple(op for op in STAGE_OPS if op not in RUN_BY) + COMPOSITE_OPS

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


def _usable(impl: Impl, backend: str, device_type: str) -> bool:
    if backend == "ref":
        return True
    if backend in _COMPILED:
        device, key = _COMPILED[backend]
        return device_type == device and _extension.has_kernel(impl.kernel, key)
    return _triton_usable(device_type)


def implemented(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` implements stage ``op`` for tensors on ``device_type`` (here, now)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    impl = OPS[op].get(backend)
    return impl is not None and _usable(impl, backend, device_type)


def backends(op: str) -> tuple[str, ...]:
    """Every backend the table lists for stage ``op`` (whether or not it can run here)."""
    return tuple(b for b in BACKENDS if b in OPS[op])


def requested() -> str:
    """The forced backend ('auto' when none): :func:`use_backend` first, then the env var."""
    value = _override if _override is not None else os.environ.get(ENV_VAR, "auto")
    value = value.strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    if value in _COMPILED and not _extension.available():
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


def fused(op: str, next_op: str, device_type: str) -> Impl | None:
    """The implementation that runs stage ``op`` and ``next_op`` as one on ``device_type``, when
    ``op``'s backend (:func:`choose`) has one in :data:`FUSED`; else None."""
    return FUSED.get((op, next_op), {}).get(choose(op, device_type))


def resolve(target: str) -> Any:
    """The object a ``"module:name"`` target names (the module imported now if it was not)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _load(impl: Impl) -> Callable[..., Any]:
    if not impl.call:
        import torch

        return getattr(torch.ops.tokenprune, impl.kernel)
    return resolve(impl.call)


def run(impl: Impl, *args: Any, **hints: Any) -> Any:
    """Call ``impl`` with its stage's arguments; of ``hints`` it gets those it lists."""
    return _load(impl)(*args, **{k: v for k, v in hints.items() if k in impl.hints})


def call(op: str, device_type: str, *args: Any, **hints: Any) -> Any:
    """Run stage ``op`` on the backend :func:`choose` picks for ``device_type``, with the stage's
    (validated) arguments and ``hints``."""
    return run(OPS[op][choose(op, device_type)], *args, **hints)


def kernels(of: str | None = None) -> dict[str, str]:
    """Every private compiled op the table names (fused ones too; only backend ``of``'s when
    given) -> its fake (``"module:function"``)."""
    found: dict[str, str] = {}
    for impls in (*OPS.values(), *FUSED.values()):
        for name, impl in impls.items():
            if impl.kernel and impl.fake and of in (None, name):
                found[impl.kernel] = impl.fake
    return found


def triton_functions() -> dict[str, str]:
    """Host function -> its module in :mod:`tokenprune_kernels.triton`, for every Triton
    implementation the table names (what that package exports and lowers for sm_90)."""
    found: dict[str, str] = {}
    for impls in (*OPS.values(), *FUSED.values()):
        if "triton" in impls:
            module, function = impls["triton"].call.split(":")
            found[function] = module.rsplit(".", 1)[1]
    return found


def describe(device_type: str) -> dict[str, str]:
    """op -> backend for every stage (those of :data:`RUN_BY` included) and composite on
    ``device_type`` (composites list their stages; with the spread rule they run
    ``spread_select`` in place of ``select_topk``, unfused)."""
    table = {op: choose(op, device_type) for op in OPS}
    forced = requested()
    for op, stages in COMPOSITES.items():
        if forced == "ref":
            table[op] = "ref"
            continue
        parts, i = [], 0
        while i < len(stages):
            pair = stages[i : i + 2]
            if len(pair) == 2 and fused(*pair, device_type) is not None:
                parts.append(f"{pair[0]}+{pair[1]}={table[pair[0]]}(fused)")
                i += 2
            else:
                parts.append(f"{stages[i]}={table[stages[i]]}")
                i += 1
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
