"""Stage c: deterministic per-sample top-k (``torch.ops.tokenprune.select_topk``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tokenprune_kernels import backend
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import define


def keep_counts_host(
    bounds_v: Sequence[int], keep_ratio: float | None = None, keep_count: int | None = None
) -> list[int]:
    """Tokens kept per sample, from visual offsets ``bounds_v`` (B+1 Python ints) already on the
    host: the rule of :func:`reference.keep_counts_ref` (``keep_count``, or
    ``clamp(floor(keep_ratio * n + 0.5), 1, n)`` in float64; 0 for an empty sample), whose sum
    is :func:`reference.keep_total_host`. Returns B Python ints."""
    counts = []
    for b in range(len(bounds_v) - 1):
        n = int(bounds_v[b + 1]) - int(bounds_v[b])
        if n == 0:
            counts.append(0)
        elif keep_count is not None:
            counts.append(int(keep_count))
        else:
            assert keep_ratio is not None
            counts.append(min(max(math.floor(n * float(keep_ratio) + 0.5), 1), n))
    return counts


def keep_counts_tensor(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """``counts`` as a [B] int64 tensor on ``device``, uploaded without a host sync.

    One host->device copy, where computing the counts on the device from the offsets takes about
    ten small kernels. On CUDA it goes through pinned memory with ``non_blocking=True``: a
    blocking copy, or an asynchronous one from pageable memory, can wait for the stream to drain.
    """
    host = torch.tensor(counts, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)  # on the CPU: ``host`` itself


def keep_counts_from_bounds(
    bounds_v: Sequence[int],
    device: torch.device,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-sample keep counts ([B] int64 on ``device``) and their total, from host offsets."""
    counts = keep_counts_host(bounds_v, keep_ratio, keep_count)
    return keep_counts_tensor(counts, device), sum(counts)


SCHEMA = (
    "select_topk(Tensor scores, Tensor cu_seqlens_v, float? keep_ratio=None, "
    "int? keep_count=None) -> (Tensor, Tensor)"
)


def _fake(scores, cu_seqlens_v, keep_ratio=None, keep_count=None):
    v.check_select(scores, cu_seqlens_v, keep_ratio, keep_count)
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)


def _impl(scores, cu_seqlens_v, keep_ratio=None, keep_count=None):
    v.check_select(scores, cu_seqlens_v, keep_ratio, keep_count)
    bounds = v.check_select_values(scores, cu_seqlens_v, keep_count)
    counts, total = keep_counts_from_bounds(bounds, scores.device, keep_ratio, keep_count)
    return backend.call(
        "select_topk", scores.device.type, scores, cu_seqlens_v, counts, total_kept=total
    )


define(SCHEMA, _impl, _fake)


def _select_topk_fake(scores, cu_seqlens_v, keep_counts, total_kept=None):
    """Fake of the compiled kernel ``_select_topk`` (the stage's calling convention, plus
    ``total_kept``: sum(keep_counts) when the caller knows it, which fixes the output size)."""
    v.check_rank("scores", scores, 1, "[total_v]")
    v.check_dtype("scores", scores, v.FLOAT_DTYPES)
    v.check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    v.check_rank("keep_counts", keep_counts, 1, "[batch] int64")
    kept = torch.library.get_ctx().new_dynamic_size() if total_kept is None else total_kept
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)


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
