"""Stage e: the composites that chain a-d (``prune_visual_tokens``) or a-c and the merge
(``prune_and_merge``), each one op in ``torch.ops.tokenprune``.

The arguments are checked once per call; then, with ``TOKENPRUNE_BACKEND=ref``, the whole composite
runs the reference, and otherwise each stage runs, unchecked, on the backend
:mod:`tokenprune_kernels.backend` picks for it (selection and gather/merge as one implementation
where the op table fuses them).

Inside, the arguments travel grouped (:class:`~tokenprune_kernels.validation.ScoringArgs`,
:class:`~tokenprune_kernels.validation.MapperArgs`), in the order the reference composites take.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.ops._library import define
from tokenprune_kernels.ops.gather import fake_gathered, fake_merged
from tokenprune_kernels.ops.select import keep_counts_for, select_counts

PRUNE_SCHEMA = (
    "prune_visual_tokens(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "Tensor visual_idx, Tensor cu_seqlens_v, Tensor visual_embeds, Tensor visual_position_ids, "
    "Tensor[] mapper_params, int mapper_kernel_size=5, float mapper_input_eps=0.0001, "
    "float? keep_ratio=None, int? keep_count=None, Tensor? q_pos=None, "
    "float? softmax_scale=None, float? keep_mass=None, float min_keep_ratio=0., "
    "float max_keep_ratio=1., Tensor? mapper_grid=None, Tensor? spread_coords=None, "
    "int spread_radius=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
MERGE_SCHEMA = (
    "prune_and_merge(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, Tensor visual_embeds, "
    "Tensor visual_idx, Tensor cu_seqlens_v, Tensor[] mapper_params, "
    "int mapper_kernel_size=5, float mapper_input_eps=0.0001, float? keep_ratio=None, "
    "int? keep_count=None, Tensor? q_pos=None, float? softmax_scale=None, "
    "float? keep_mass=None, float min_keep_ratio=0., float max_keep_ratio=1., "
    "Tensor? mapper_grid=None, Tensor? spread_coords=None, int spread_radius=0) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _grouped(cls: type, public: Callable, args: tuple, kwargs: dict) -> Any:
    """A call of a composite - flat, as its schema (and ``public``, its Python function, which
    takes the same arguments) orders them - grouped into ``cls`` (the reference's order)."""
    names, defaults = _parameters(public)
    call = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    scoring = v.ScoringArgs(**{f: call[f] for f in v.ScoringArgs._fields})
    mapper = v.MapperArgs(*(call[f"mapper_{f}"] for f in v.MapperArgs._fields))
    keep = v.KeepRule(**{f: call[f] for f in v.KeepRule._fields})
    spread = v.SpreadRule(*(call[f"spread_{f}"] for f in v.SpreadRule._fields))
    groups = ("scoring", "mapper", "keep", "spread")
    rest = {f: call[f] for f in cls._fields if f not in groups}
    return cls(scoring=scoring, mapper=mapper, keep=keep, spread=spread, **rest)


@functools.cache
def _parameters(public: Callable) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``public``'s parameter names, in order, and their defaults (read once: binding a call
    with ``inspect.Signature.bind`` costs tens of microseconds)."""
    params = inspect.signature(public).parameters
    defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    return tuple(params), defaults


def _select_then(
    last: str, spread: v.SpreadRule, scores, cu_seqlens_v, counts, total, *rest
) -> tuple:
    """Stage c, then ``last`` (gather_kept or merge_kept) on the kept indices: as one
    implementation where the op table fuses them (never with the spread rule), else one after
    the other. Returns what the fused implementation returns: ``last``'s outputs, then kept_idx
    (and, after a gather, cu_seqlens_kept)."""
    device = scores.device.type
    fused = backend.fused("select_topk", last, device) if spread.coords is None else None
    if fused is not None:
        return backend.run(fused, scores, cu_seqlens_v, counts, *rest, total_kept=total)
    kept_idx, cu_kept = select_counts(scores, cu_seqlens_v, counts, total, spread)
    if last == "gather_kept":
        return (*backend.call(last, device, *rest, kept_idx), kept_idx, cu_kept)
    return (*backend.call(last, device, *rest, cu_seqlens_v, kept_idx), kept_idx)


#: Grouped arguments -> (composite, its static checks, its value checks, its reference).
_COMPOSITES: dict[type, tuple[str, Callable, Callable, Callable]] = {
    v.PruneArgs: (
        "prune_visual_tokens",
        v.check_prune,
        v.check_prune_values,
        reference.prune_visual_tokens_ref,
    ),
    v.PruneMergeArgs: (
        "prune_and_merge",
        v.check_prune_and_merge,
        v.check_prune_merge_values,
        reference.prune_and_merge_ref,
    ),
}


def _run(a: v.PruneArgs | v.PruneMergeArgs, last_args: Callable[[v.ScoringArgs], tuple]) -> tuple:
    """One call of the composite whose grouped arguments ``a`` are (:data:`_COMPOSITES`).

    The static checks, then the value checks of every stage, once per call and in one device
    read (the stages then run unchecked; they return the visual offsets). Then the whole
    reference under ``TOKENPRUNE_BACKEND=ref``, else each stage on its own backend: attention,
    the mapper (when given parameters), the selection and the composite's last stage
    (:data:`backend.COMPOSITES`), which takes ``last_args(s)`` (``s``: the scoring arguments,
    made contiguous once here so that no stage copies them again).
    """
    name, check, check_values, ref = _COMPOSITES[type(a)]
    with stage_range(f"tokenprune.{name}", a.scoring.q.device):
        check(a)
        bounds_v = check_values(a)
        if backend.requested() == "ref":
            return ref(*a)
        s = a.scoring.contiguous()
        device = s.q.device.type
        groups = a.mapper.head_groups()
        if groups == 1:
            scores = backend.call("instruction_attention", device, *s)
        else:
            scores = backend.call("instruction_attention_heads", device, *s, groups)
        if len(a.mapper.params) > 0:
            scores = backend.call("mapper_forward", device, scores, s.cu_seqlens_v, *a.mapper)
        relevance = "softmax" if len(a.mapper.params) > 0 else "normalize"
        counts, total = keep_counts_for(a.keep, bounds_v, scores, s.cu_seqlens_v, relevance)
        last = backend.COMPOSITES[name][-1]
        out = _select_then(last, a.spread, scores, s.cu_seqlens_v, counts, total, *last_args(s))
        return (*out, scores)


def _kept_and_scores(s: v.ScoringArgs, n: torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake kept_idx [n] int64 and scores [Tv] float32."""
    kept_idx = s.visual_idx.new_empty(n, dtype=torch.int64)
    return kept_idx, s.q.new_empty(s.visual_idx.shape[0], dtype=torch.float32)


def _prune_fake(*args, **kwargs):
    a = _grouped(v.PruneArgs, prune_visual_tokens, args, kwargs)
    v.check_prune(a)
    n = torch.library.get_ctx().new_dynamic_size()
    kept_idx, scores = _kept_and_scores(a.scoring, n)
    embeds, pos = fake_gathered(a.visual_embeds, a.visual_position_ids, n)
    return embeds, pos, kept_idx, torch.empty_like(a.scoring.cu_seqlens_v), scores


def _prune_impl(*args, **kwargs):
    a = _grouped(v.PruneArgs, prune_visual_tokens, args, kwargs)
    return _run(a, lambda s: (a.visual_embeds, a.visual_position_ids))


define(PRUNE_SCHEMA, _prune_impl, _prune_fake)


def _merge_fake(*args, **kwargs):
    a = _grouped(v.PruneMergeArgs, prune_and_merge, args, kwargs)
    v.check_prune_and_merge(a)
    kept_idx, scores = _kept_and_scores(a.scoring, torch.library.get_ctx().new_dynamic_size())
    return (*fake_merged(a.inputs_embeds, a.position_ids, a.cu_seqlens), kept_idx, scores)


def _merge_impl(*args, **kwargs):
    a = _grouped(v.PruneMergeArgs, prune_and_merge, args, kwargs)
    return _run(
        a,
        lambda s: (
            a.inputs_embeds,
            a.position_ids,
            a.cu_seqlens.contiguous(),
            a.visual_embeds,
            s.visual_idx,
        ),
    )


define(MERGE_SCHEMA, _merge_impl, _merge_fake)


def prune_visual_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_position_ids: torch.Tensor,
    mapper_params: Sequence[torch.Tensor] = (),
    mapper_kernel_size: int = 5,
    mapper_input_eps: float = 1e-4,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    q_pos: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    mapper_grid: torch.Tensor | None = None,
    spread_coords: torch.Tensor | None = None,
    spread_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score, select and gather the visual tokens in one call.

    Args:
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale: as in
            :func:`instruction_attention`.
        visual_embeds: [Tv, H] float32/float16/bfloat16 visual features.
        visual_position_ids: [Tv] or [R, Tv] int32/int64 their original position ids.
        mapper_params: ``TokenMapper.op_params()``; empty for the training-free mode, where the
            score is the raw layer-0 attention. A mapper whose first block takes ``G > 1``
            attention channels is fed :func:`instruction_attention_heads` with
            ``head_groups=G`` (``G`` must divide ``Hq``).
        mapper_kernel_size, mapper_input_eps: the mapper's config.
        keep_ratio, keep_count, keep_mass, min_keep_ratio, max_keep_ratio: the keep rule, as in
            :func:`select_topk` (exactly one of the first three). With ``keep_mass`` the
            relevance is the softmax of the mapper's logits, or, without a mapper, the raw
            attention normalised per sample (``relevance="normalize"``).
        mapper_grid: [Tv, 2] float32 the visual tokens' normalised grid row and column, for a
            mapper with grid input (its first block then takes ``G + 2`` channels); else None.
        spread_coords, spread_radius: the spread rule, as in :func:`select_topk` (``[Tv, 3]``
            int32/int64 (segment, row, col), on the device of ``q``; None for the plain
            top-k). With coordinates the selection runs stage ``spread_select`` and the gather
            (merge) runs after it, never fused with it.

    Returns:
        kept_embeds [Tkept, H], kept_position_ids [Tkept] or [R, Tkept], kept_idx [Tkept] int64
        (global, ascending), cu_seqlens_kept [B+1], scores [Tv] float32 (the ranked values).
    """
    return torch.ops.tokenprune.prune_visual_tokens(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
        visual_position_ids, list(mapper_params), int(mapper_kernel_size),
        float(mapper_input_eps), keep_ratio, keep_count, q_pos, softmax_scale, keep_mass,
        float(min_keep_ratio), float(max_keep_ratio), mapper_grid,
        *v.spread_args(spread_coords, spread_radius),
    )  # fmt: skip


def prune_and_merge(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    mapper_params: Sequence[torch.Tensor] = (),
    mapper_kernel_size: int = 5,
    mapper_input_eps: float = 1e-4,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    q_pos: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    mapper_grid: torch.Tensor | None = None,
    spread_coords: torch.Tensor | None = None,
    spread_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score and select the visual tokens, then build the pruned input sequence directly.

    What model code calls instead of its ``masked_scatter``. Arguments as in
    :func:`prune_visual_tokens` and :func:`merge_kept` (``visual_idx`` indexes each sample's full
    sequence; the key sequence of ``k`` is a prefix of it).

    Returns:
        embeds [To, H], position_ids_out [To] or [R, To], cu_seqlens_out [B+1], src_idx [To]
        int64, kept_idx [Tkept] int64, scores [Tv] float32.
    """
    return torch.ops.tokenprune.prune_and_merge(
        q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens, visual_embeds,
        visual_idx, cu_seqlens_v, list(mapper_params), int(mapper_kernel_size),
        float(mapper_input_eps), keep_ratio, keep_count, q_pos, softmax_scale, keep_mass,
        float(min_keep_ratio), float(max_keep_ratio), mapper_grid,
        *v.spread_args(spread_coords, spread_radius),
    )  # fmt: skip
