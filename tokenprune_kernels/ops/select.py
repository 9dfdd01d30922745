"""Stage c: deterministic per-sample top-k (``torch.ops.tokenprune.select_topk``) and the
adaptive rule's per-sample keep counts (``torch.ops.tokenprune.mass_keep_counts``)."""

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


def mass_bounds_tensor(
    bounds_v: Sequence[int], device: torch.device, min_keep_ratio: float, max_keep_ratio: float
) -> torch.Tensor:
    """[2, B] int64 on ``device``: the least and most tokens each sample keeps under
    ``keep_mass`` (``min_keep_ratio`` / ``max_keep_ratio`` by the ratio rule of
    :func:`keep_counts_host`), from host offsets, uploaded in one copy without a sync."""
    lo = keep_counts_host(bounds_v, keep_ratio=min_keep_ratio)
    hi = keep_counts_host(bounds_v, keep_ratio=max_keep_ratio)
    return keep_counts_tensor([*lo, *hi], device).view(2, len(lo))


def keep_counts_for(
    keep: v.KeepRule,
    bounds_v: Sequence[int],
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    relevance: str,
) -> tuple[torch.Tensor, int]:
    """Per-sample keep counts ([B] int64 on the device of ``scores``) and their total, for any
    keep rule (validated; ``bounds_v``: the visual offsets on the host).

    ``keep_ratio`` / ``keep_count``: computed on the host, no sync. ``keep_mass``: stage
    ``mass_keep_counts`` on the backend the op table picks (it needs the scores), then ONE device
    read of the total, which sizes the outputs: the adaptive rule's only synchronisation.
    """
    if keep.keep_mass is None:
        return keep_counts_from_bounds(bounds_v, scores.device, keep.keep_ratio, keep.keep_count)
    kb = mass_bounds_tensor(bounds_v, scores.device, keep.min_keep_ratio, keep.max_keep_ratio)
    counts = backend.call(
        "mass_keep_counts", scores.device.type, scores, cu_seqlens_v, kb, keep.keep_mass, relevance
    )
    return counts, int(counts.sum())


MASS_SCHEMA = (
    "mass_keep_counts(Tensor scores, Tensor cu_seqlens_v, float keep_mass, "
    'float min_keep_ratio=0., float max_keep_ratio=1., str relevance="softmax") -> Tensor'
)


def _mass_fake(scores, cu_seqlens_v, keep_mass, min_keep_ratio=0.0, max_keep_ratio=1.0,
               relevance="softmax"):  # fmt: skip
    keep = v.KeepRule(None, None, keep_mass, min_keep_ratio, max_keep_ratio)
    v.check_select(scores, cu_seqlens_v, keep, relevance)
    return scores.new_empty(cu_seqlens_v.shape[0] - 1, dtype=torch.int64)


def _mass_impl(scores, cu_seqlens_v, keep_mass, min_keep_ratio=0.0, max_keep_ratio=1.0,
               relevance="softmax"):  # fmt: skip
    keep = v.KeepRule(None, None, keep_mass, min_keep_ratio, max_keep_ratio)
    v.check_select(scores, cu_seqlens_v, keep, relevance)
    bounds = v.check_select_values(scores, cu_seqlens_v, keep, relevance)
    kb = mass_bounds_tensor(bounds, scores.device, min_keep_ratio, max_keep_ratio)
    device = scores.device.type
    return backend.call("mass_keep_counts", device, scores, cu_seqlens_v, kb, keep_mass, relevance)


define(MASS_SCHEMA, _mass_impl, _mass_fake)


def _mass_keep_counts_fake(scores, cu_seqlens_v, keep_bounds, keep_mass, relevance):
    """Fake of the compiled kernel ``_mass_keep_counts`` (the stage's calling convention)."""
    v.check_rank("scores", scores, 1, "[total_v]")
    v.check_dtype("scores", scores, v.FLOAT_DTYPES)
    v.check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    v.check_rank("keep_bounds", keep_bounds, 2, "[2, batch] int64")
    return scores.new_empty(cu_seqlens_v.shape[0] - 1, dtype=torch.int64)


SCHEMA = (
    "select_topk(Tensor scores, Tensor cu_seqlens_v, float? keep_ratio=None, "
    "int? keep_count=None, float? keep_mass=None, float min_keep_ratio=0., "
    'float max_keep_ratio=1., str relevance="softmax", Tensor? spread_coords=None, '
    "int spread_radius=0) -> (Tensor, Tensor)"
)


def select_counts(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    counts: torch.Tensor,
    total: int,
    spread: v.SpreadRule = v.NO_SPREAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage c for validated arguments and keep counts ([B] int64 on the device, ``total``
    their sum): ``select_topk``, or ``spread_select`` when ``spread`` has coordinates (made
    contiguous here), each on the backend the op table picks. Returns (kept_idx,
    cu_seqlens_kept)."""
    device = scores.device.type
    if spread.coords is None:
        return backend.call("select_topk", device, scores, cu_seqlens_v, counts, total_kept=total)
    return backend.call(
        "spread_select", device, scores, cu_seqlens_v, counts, spread.coords.contiguous(),
        spread.radius, total_kept=total,
    )  # fmt: skip


def _fake(scores, cu_seqlens_v, keep_ratio=None, keep_count=None, keep_mass=None,
          min_keep_ratio=0.0, max_keep_ratio=1.0, relevance="softmax", spread_coords=None,
          spread_radius=0):  # fmt: skip
    keep = v.KeepRule(keep_ratio, keep_count, keep_mass, min_keep_ratio, max_keep_ratio)
    spread = v.SpreadRule(spread_coords, spread_radius)
    v.check_select(scores, cu_seqlens_v, keep, relevance, spread)
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)


def _impl(scores, cu_seqlens_v, keep_ratio=None, keep_count=None, keep_mass=None,
          min_keep_ratio=0.0, max_keep_ratio=1.0, relevance="softmax", spread_coords=None,
          spread_radius=0):  # fmt: skip
    keep = v.KeepRule(keep_ratio, keep_count, keep_mass, min_keep_ratio, max_keep_ratio)
    spread = v.SpreadRule(spread_coords, spread_radius)
    v.check_select(scores, cu_seqlens_v, keep, relevance, spread)
    bounds = v.check_select_values(scores, cu_seqlens_v, keep, relevance, spread)
    counts, total = keep_counts_for(keep, bounds, scores, cu_seqlens_v, relevance)
    return select_counts(scores, cu_seqlens_v, counts, total, spread)


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
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    relevance: str = "softmax",
    spread_coords: torch.Tensor | None = None,
    spread_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-scored visual tokens of every sample, in their original order.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_ratio: fraction in (0, 1]; a sample of n >= 1 tokens keeps
            ``clamp(floor(keep_ratio * n + 0.5), 1, n)`` (round half up, at least one).
        keep_count: tokens to keep per sample (>= 1 and <= every non-empty sample's n).
        keep_mass: the adaptive rule, in (0, 1]: each sample keeps its fewest top tokens whose
            predicted relevance mass reaches ``keep_mass`` (:func:`mass_keep_counts`), at least
            ``max(1, round_half_up(min_keep_ratio * n))`` and at most
            ``max(1, round_half_up(max_keep_ratio * n))`` (0 <= min <= max <= 1, max > 0; the
            ratios only go with ``keep_mass``). Costs one extra host sync (the output size).
            Exactly one of ``keep_ratio``, ``keep_count`` and ``keep_mass``. Empty samples keep
            nothing.
        relevance: what ``keep_mass`` measures: ``"softmax"`` (scores are logits, e.g. the
            mapper's: relevance = per-sample softmax) or ``"normalize"`` (scores are
            non-negative masses, e.g. raw attention: relevance = score / sample sum).
        spread_coords: the spread rule (mapper v2's selection): [Tv, 3] int32/int64 (segment,
            row, col) of each visual token - e.g. its M-RoPE (t, h, w) ids - strictly
            increasing in lexicographic order within each sample (raster order), on the device
            of ``scores``; None (default) for the plain top-k. With coordinates, each sample
            visits its tokens in the order below and suppresses a token when an already
            accepted token shares its segment within Chebyshev distance ``spread_radius`` on
            (row, col); it keeps the first k of (accepted, then suppressed), k from the keep
            rule as above. Checked in the same device read as the offsets.
        spread_radius: an int in [0, 64] (``validation.MAX_SPREAD_RADIUS``); 0 (default)
            suppresses nothing; > 0 needs ``spread_coords``.

    Returns:
        kept_idx: [Tkept] int64 global indices into the packed visual tokens, ascending.
        cu_seqlens_kept: [B+1] offsets of the kept tokens, dtype of ``cu_seqlens_v``.

    Order: higher score first; equal scores by lower index; NaN below everything.
    """
    return torch.ops.tokenprune.select_topk(
        scores, cu_seqlens_v, keep_ratio, keep_count, keep_mass, float(min_keep_ratio),
        float(max_keep_ratio), relevance, *v.spread_args(spread_coords, spread_radius),
    )  # fmt: skip


def mass_keep_counts(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_mass: float,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    relevance: str = "softmax",
) -> torch.Tensor:
    """Tokens each sample keeps under the adaptive rule (what ``select_topk(keep_mass=...)``
    keeps, without selecting them).

    Args:
        scores: [Tv] float32/float16/bfloat16 (``"normalize"``: finite and >= 0, or NaN).
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_mass, min_keep_ratio, max_keep_ratio, relevance: as in :func:`select_topk`.

    Returns:
        [B] int64 on the device of ``scores``: per sample of n >= 1 tokens, the smallest m whose
        top-m relevance (in the selection order: score desc, index asc, NaN last) sums to at
        least ``keep_mass``, clamped to ``[max(1, rhu(min_keep_ratio * n)),
        max(1, rhu(max_keep_ratio * n))]`` (rhu: round half up); 0 for an empty sample. The
        relevance is computed in fixed point (``docs/contract.md``): every backend returns the
        same counts. No host sync beyond the one validation read.
    """
    return torch.ops.tokenprune.mass_keep_counts(
        scores, cu_seqlens_v, float(keep_mass), float(min_keep_ratio), float(max_keep_ratio),
        relevance,
    )  # fmt: skip


def _spread_select_fake(scores, cu_seqlens_v, keep_counts, coords, radius, total_kept=None):
    """Fake of the compiled kernel ``_spread_select`` (the stage's calling convention, plus
    ``total_kept``: sum(keep_counts) when the caller knows it, which fixes the output size)."""
    v.check_rank("scores", scores, 1, "[total_v]")
    v.check_dtype("scores", scores, v.FLOAT_DTYPES)
    v.check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    v.check_rank("keep_counts", keep_counts, 1, "[batch] int64")
    v.check_rank("coords", coords, 2, "[total_v, 3]")
    v.check_dtype("coords", coords, v.INDEX_DTYPES)
    kept = torch.library.get_ctx().new_dynamic_size() if total_kept is None else total_kept
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)
