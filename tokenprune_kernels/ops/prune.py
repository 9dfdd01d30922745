"""Stage e: the composites that chain a-d (``prune_visual_tokens``) or a-c and the merge
(``prune_and_merge``), each one op in ``torch.ops.tokenprune``.

The arguments are checked once per call; then, with ``TOKENPRUNE_BACKEND=ref``, the whole composite
runs the reference, and otherwise each stage runs, unchecked, on the backend
:mod:`tokenprune_kernels.backend` picks for it. When selection runs in Triton, selection and the
gather (or merge) run fused: one select launch and one compaction pass that writes the kept rows
straight into the output. When it runs in CUDA, one compiled op (``_select_gather_kept`` /
``_select_merge_kept``) selects and gathers (merges), sized by the host-known total: no
synchronisation after the validation's one read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.ops._library import register
from tokenprune_kernels.ops.attention import run_instruction_attention
from tokenprune_kernels.ops.gather import run_gather_kept, run_merge_kept
from tokenprune_kernels.ops.mapper import run_mapper_forward
from tokenprune_kernels.ops.select import keep_counts_from_bounds, run_select_topk


def _check_scoring(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                   mapper_params, mapper_kernel_size, mapper_input_eps, keep_ratio, keep_count,
                   q_pos, softmax_scale):  # fmt: skip
    """Static checks of stages a-c shared by both composites (fake and real)."""
    v.check_instruction_attention(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale
    )
    v.check_keep(keep_ratio, keep_count)
    if len(mapper_params) > 0:
        v.check_mapper_config(mapper_params, mapper_kernel_size, mapper_input_eps, q.device)
    v.check_rank("visual_embeds", visual_embeds, 2, "[total_v, hidden]")
    v.require(
        visual_embeds.shape[0] == visual_idx.shape[0],
        f"visual_embeds must have one row per visual token ({visual_idx.shape[0]}), got "
        f"{visual_embeds.shape[0]}",
    )


def _check_prune(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                 visual_position_ids, mapper_params, mapper_kernel_size, mapper_input_eps,
                 keep_ratio, keep_count, q_pos, softmax_scale):  # fmt: skip
    _check_scoring(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                   mapper_params, mapper_kernel_size, mapper_input_eps, keep_ratio, keep_count,
                   q_pos, softmax_scale)  # fmt: skip
    v.check_gather(visual_embeds, visual_position_ids, visual_idx.new_empty(0, dtype=torch.int64))


def _check_merge(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
                 visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size,
                 mapper_input_eps, keep_ratio, keep_count, q_pos, softmax_scale):  # fmt: skip
    _check_scoring(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                   mapper_params, mapper_kernel_size, mapper_input_eps, keep_ratio, keep_count,
                   q_pos, softmax_scale)  # fmt: skip
    v.check_merge(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                  cu_seqlens_v, visual_idx.new_empty(0, dtype=torch.int64))  # fmt: skip


def _score(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, mapper_params,
           mapper_kernel_size, mapper_input_eps, q_pos, softmax_scale):  # fmt: skip
    """Stages a and b (b only with a mapper), each on its own backend: [Tv] float32 scores."""
    scores = run_instruction_attention(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale
    )
    if len(mapper_params) > 0:
        scores = run_mapper_forward(
            scores, cu_seqlens_v, mapper_params, mapper_kernel_size, mapper_input_eps
        )
    return scores


def _fused_select(scores: torch.Tensor) -> str | None:
    """'triton' or 'cuda' when stage c runs there, in which case c and d run fused; else None."""
    which = backend.choose("select_topk", scores.device.type)
    return which if which in ("triton", "cuda") else None


def _as_2d(position_ids: torch.Tensor) -> torch.Tensor:
    return position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)


def _like(pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``pos`` [R, T] back to the rank of ``position_ids``."""
    return pos if position_ids.dim() == 2 else pos.squeeze(0)


def _in_range(name: str, impl: Callable) -> Callable:
    """``impl`` inside the NVTX range ``name`` (when its first argument, q, is on a GPU)."""

    @functools.wraps(impl)
    def wrapped(q, *args, **kwargs):
        with stage_range(name, q.device):
            return impl(q, *args, **kwargs)

    return wrapped


def _prune_impl(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                visual_position_ids, mapper_params, mapper_kernel_size=5, mapper_input_eps=1e-4,
                keep_ratio=None, keep_count=None, q_pos=None, softmax_scale=None):  # fmt: skip
    _check_prune(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                 visual_position_ids, mapper_params, mapper_kernel_size, mapper_input_eps,
                 keep_ratio, keep_count, q_pos, softmax_scale)  # fmt: skip
    # The value checks of stages a-c, once per call and in one device read (the stages then run
    # unchecked).
    bounds_v = v.check_prune_values(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v,
                                    q_pos, keep_count)  # fmt: skip
    if backend.requested() == "ref":
        return reference.prune_visual_tokens_ref(
            q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
            visual_position_ids, mapper_params, mapper_kernel_size, mapper_input_eps,
            keep_ratio, keep_count, q_pos, softmax_scale,
        )  # fmt: skip
    scores = _score(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, mapper_params,
        mapper_kernel_size, mapper_input_eps, q_pos, softmax_scale,
    )  # fmt: skip
    counts, total = keep_counts_from_bounds(bounds_v, scores.device, keep_ratio, keep_count)
    fused = _fused_select(scores)
    if fused == "cuda":
        embeds, pos, kept_idx, cu_kept = torch.ops.tokenprune._select_gather_kept(
            scores, cu_seqlens_v, counts, total, visual_embeds, _as_2d(visual_position_ids)
        )
        return embeds, _like(pos, visual_position_ids), kept_idx, cu_kept, scores
    if fused == "triton":
        from tokenprune_kernels.triton import select_gather_triton

        embeds, pos, kept_idx, cu_kept = select_gather_triton(
            scores, cu_seqlens_v, counts, visual_embeds, visual_position_ids, total_kept=total
        )
        return embeds, pos, kept_idx, cu_kept, scores
    kept_idx, cu_kept = run_select_topk(scores, cu_seqlens_v, counts, total)
    embeds, pos = run_gather_kept(visual_embeds, visual_position_ids, kept_idx)
    return embeds, pos, kept_idx, cu_kept, scores


def _prune_fake(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                visual_position_ids, mapper_params, mapper_kernel_size=5, mapper_input_eps=1e-4,
                keep_ratio=None, keep_count=None, q_pos=None, softmax_scale=None):  # fmt: skip
    _check_prune(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
                 visual_position_ids, mapper_params, mapper_kernel_size, mapper_input_eps,
                 keep_ratio, keep_count, q_pos, softmax_scale)  # fmt: skip
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        visual_embeds.new_empty((n, visual_embeds.shape[1])),
        visual_position_ids.new_empty((*visual_position_ids.shape[:-1], n)),
        visual_idx.new_empty(n, dtype=torch.int64),
        torch.empty_like(cu_seqlens_v),
        q.new_empty(visual_idx.shape[0], dtype=torch.float32),
    )


register(
    "prune_visual_tokens", _in_range("tokenprune.prune_visual_tokens", _prune_impl), _prune_fake
)


def _merge_impl(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
                visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size=5,
                mapper_input_eps=1e-4, keep_ratio=None, keep_count=None, q_pos=None,
                softmax_scale=None):  # fmt: skip
    _check_merge(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
                 visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size,
                 mapper_input_eps, keep_ratio, keep_count, q_pos, softmax_scale)  # fmt: skip
    # The value checks of stages a-c and the merge, once per call and in one device read.
    bounds_v = v.check_prune_merge_values(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds,
                                          cu_seqlens, visual_idx, cu_seqlens_v, q_pos,
                                          keep_count)  # fmt: skip
    if backend.requested() == "ref":
        return reference.prune_and_merge_ref(
            q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
            visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size,
            mapper_input_eps, keep_ratio, keep_count, q_pos, softmax_scale,
        )  # fmt: skip
    scores = _score(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, mapper_params,
        mapper_kernel_size, mapper_input_eps, q_pos, softmax_scale,
    )  # fmt: skip
    counts, total = keep_counts_from_bounds(bounds_v, scores.device, keep_ratio, keep_count)
    fused = _fused_select(scores)
    if fused == "cuda":
        embeds, pos, cu_out, src_idx, kept_idx = torch.ops.tokenprune._select_merge_kept(
            scores, cu_seqlens_v, counts, total, inputs_embeds, _as_2d(position_ids), cu_seqlens,
            visual_embeds, visual_idx,
        )  # fmt: skip
        return embeds, _like(pos, position_ids), cu_out, src_idx, kept_idx, scores
    if fused == "triton":
        from tokenprune_kernels.triton import select_merge_triton

        embeds, pos, cu_out, src_idx, kept_idx = select_merge_triton(
            scores, cu_seqlens_v, counts, inputs_embeds, position_ids, cu_seqlens,
            visual_embeds, visual_idx, total_kept=total,
        )  # fmt: skip
        return embeds, pos, cu_out, src_idx, kept_idx, scores
    kept_idx, _ = run_select_topk(scores, cu_seqlens_v, counts, total)
    merged = run_merge_kept(
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
    )
    return (*merged, kept_idx, scores)


def _merge_fake(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
                visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size=5,
                mapper_input_eps=1e-4, keep_ratio=None, keep_count=None, q_pos=None,
                softmax_scale=None):  # fmt: skip
    _check_merge(q, k, cu_seqlens_q, cu_seqlens_k, inputs_embeds, position_ids, cu_seqlens,
                 visual_embeds, visual_idx, cu_seqlens_v, mapper_params, mapper_kernel_size,
                 mapper_input_eps, keep_ratio, keep_count, q_pos, softmax_scale)  # fmt: skip
    ctx = torch.library.get_ctx()
    n_out, n_kept = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (
        inputs_embeds.new_empty((n_out, inputs_embeds.shape[1])),
        position_ids.new_empty((*position_ids.shape[:-1], n_out)),
        torch.empty_like(cu_seqlens),
        inputs_embeds.new_empty(n_out, dtype=torch.int64),
        visual_idx.new_empty(n_kept, dtype=torch.int64),
        q.new_empty(visual_idx.shape[0], dtype=torch.float32),
    )


register("prune_and_merge", _in_range("tokenprune.prune_and_merge", _merge_impl), _merge_fake)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score, select and gather the visual tokens in one call.

    Args:
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale: as in
            :func:`instruction_attention`.
        visual_embeds: [Tv, H] float32/float16/bfloat16 visual features.
        visual_position_ids: [Tv] or [R, Tv] int32/int64 their original position ids.
        mapper_params: ``TokenMapper.op_params()``; empty for the training-free mode, where the
            score is the raw layer-0 attention.
        mapper_kernel_size, mapper_input_eps: the mapper's config.
        keep_ratio, keep_count: as in :func:`select_topk` (exactly one).

    Returns:
        kept_embeds [Tkept, H], kept_position_ids [Tkept] or [R, Tkept], kept_idx [Tkept] int64
        (global, ascending), cu_seqlens_kept [B+1], scores [Tv] float32 (the ranked values).
    """
    return torch.ops.tokenprune.prune_visual_tokens(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, visual_embeds,
        visual_position_ids, list(mapper_params), int(mapper_kernel_size),
        float(mapper_input_eps), keep_ratio, keep_count, q_pos, softmax_scale,
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
        float(mapper_input_eps), keep_ratio, keep_count, q_pos, softmax_scale,
    )  # fmt: skip
