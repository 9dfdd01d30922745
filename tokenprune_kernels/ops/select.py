"""Stage c: deterministic per-sample top-k (``torch.ops.tokenprune.select_topk``)."""

from __future__ import annotations

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import register


def run_select_topk(scores, cu_seqlens_v, keep_counts, total_kept=None):
    """Stage c on the chosen backend, for validated arguments and per-sample ``keep_counts``
    (``total_kept``: their sum when known on the host; it spares the Triton path a sync)."""
    which = backend.choose("select_topk", scores.device.type)
    if which in ("cpp", "cuda"):
        return torch.ops.tokenprune._select_topk(scores, cu_seqlens_v, keep_counts)
    if which == "triton":
        from tokenprune_kernels.triton import select_topk_triton

        return select_topk_triton(scores, cu_seqlens_v, keep_counts, total_kept=total_kept)
    return reference.select_topk_ref(scores, cu_seqlens_v, keep_counts)


def _impl(scores, cu_seqlens_v, keep_ratio=None, keep_count=None):
    v.check_select(scores, cu_seqlens_v, keep_ratio, keep_count)
    bounds = v.check_cu_seqlens_values(
        "cu_seqlens_v", cu_seqlens_v, scores.shape[0], "scores.shape[0]"
    )
    v.check_keep_count_values(keep_count, bounds)
    counts = reference.keep_counts_ref(cu_seqlens_v, keep_ratio, keep_count)
    total = reference.keep_total_host(bounds, keep_ratio, keep_count)
    return run_select_topk(scores, cu_seqlens_v, counts, total)


def _fake(scores, cu_seqlens_v, keep_ratio=None, keep_count=None):
    v.check_select(scores, cu_seqlens_v, keep_ratio, keep_count)
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)


register("select_topk", _impl, _fake)


def select_topk(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-scored visual tokens of every sample, in their original order.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_ratio: fraction in (0, 1]; a sample of n >= 1 tokens keeps
            ``clamp(floor(keep_ratio * n + 0.5), 1, n)`` (round half up, at least one).
        keep_count: tokens to keep per sample (>= 1 and <= every non-empty sample's n).
            Exactly one of ``keep_ratio`` and ``keep_count``. Empty samples keep nothing.

    Returns:
        kept_idx: [Tkept] int64 global indices into the packed visual tokens, ascending.
        cu_seqlens_kept: [B+1] offsets of the kept tokens, dtype of ``cu_seqlens_v``.

    Order: higher score first; equal scores by lower index; NaN below everything.
    """
    return torch.ops.tokenprune.select_topk(scores, cu_seqlens_v, keep_ratio, keep_count)
