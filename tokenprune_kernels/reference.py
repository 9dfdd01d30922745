"""Plain-PyTorch reference of every stage: the truth each fast path is checked against.

Readable rather than fast: float32 accumulation, per-sample loops where they make the rule plain.
The functions take already-validated inputs (the public ops in :mod:`tokenprune_kernels.ops`
validate); the layout and rules are those of ``docs/contract.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from tokenprune_kernels.mapper.functional import mapper_forward_ref
from tokenprune_kernels.validation import (
    KeepRule,
    MapperArgs,
    MergeArgs,
    ScoringArgs,
    SpreadRule,
    flat_args,
    segment_ids,
)

__all__ = [
    "KeepRule",
    "MapperArgs",
    "ScoringArgs",
    "SpreadRule",
    "gather_kept_ref",
    "instruction_attention_heads_ref",
    "instruction_attention_ref",
    "keep_counts_ref",
    "keep_rule_counts_ref",
    "keep_total_host",
    "mapper_forward_ref",
    "mass_keep_counts_ref",
    "mass_weights_ref",
    "merge_kept_ref",
    "prune_and_merge_ref",
    "prune_visual_tokens_ref",
    "score_keys_ref",
    "select_topk_ref",
    "spread_select_ref",
    "spread_suppressed_ref",
]


def _bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]


@flat_args(ScoringArgs)
def instruction_attention_ref(s: ScoringArgs) -> torch.Tensor:
    """Layer-0 instruction-to-visual attention, averaged over heads and instruction rows.

    Args (flat, bound as :class:`ScoringArgs`):
        q: [Tq, Hq, D] float32/float16/bfloat16, instruction queries after rotary embedding.
        k: [Tk, Hk, D] same dtype, keys of every token the queries see, after rotary embedding.
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_v: [B+1] int32/int64 packed offsets.
        visual_idx: [Tv] int, each visual token's local position in its sample's key sequence.
        q_pos: [Tq] int or None, each query's local position in its key sequence (None: the
            queries are the last n_q keys).
        softmax_scale: None for 1/sqrt(D).

    Returns:
        [Tv] float32: mean over heads and queries of the causal softmax over all visible keys,
        read at the visual columns.
    """
    return instruction_attention_heads_ref(*s, 1)[:, 0]


@flat_args(ScoringArgs)
def instruction_attention_heads_ref(s: ScoringArgs, head_groups: int | None = None) -> torch.Tensor:
    """Layer-0 instruction-to-visual attention per group of query heads.

    Arguments as :func:`instruction_attention_ref`, then ``head_groups`` ``G`` dividing ``Hq``
    (None: ``Hk``).

    Returns:
        [Tv, G] float32: channel ``g`` is the mean over the query heads ``g * Hq / G .. (g + 1)
        * Hq / G - 1`` (for ``G = Hk``: the heads sharing KV head ``g``) and the sample's
        queries of the causal softmax over all visible keys, read at the visual columns. The
        mean over the channels is :func:`instruction_attention_ref`.
    """
    q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale = s
    if head_groups is None:
        head_groups = k.shape[1]
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    bq, bk, bv = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k), _bounds(cu_seqlens_v)
    out = torch.zeros(visual_idx.shape[0], head_groups, dtype=torch.float32, device=q.device)
    for b in range(len(bq) - 1):
        nq, nk, nv = bq[b + 1] - bq[b], bk[b + 1] - bk[b], bv[b + 1] - bv[b]
        if nv == 0:
            continue
        qb = q[bq[b] : bq[b + 1]].float()  # [nq, Hq, D]
        kb = k[bk[b] : bk[b + 1]].float().repeat_interleave(group, dim=1)  # [nk, Hq, D]
        if q_pos is None:
            pos = torch.arange(nk - nq, nk, device=q.device)
        else:
            pos = q_pos[bq[b] : bq[b + 1]].to(torch.int64)
        logits = torch.einsum("qhd,khd->hqk", qb, kb) * scale  # [Hq, nq, nk]
        keys = torch.arange(nk, device=q.device)
        visible = keys[None, :] <= pos[:, None]  # [nq, nk]
        logits = logits.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        cols = visual_idx[bv[b] : bv[b + 1]].to(torch.int64)
        per_group = probs[:, :, cols].reshape(head_groups, hq // head_groups, nq, nv)
        out[bv[b] : bv[b + 1]] = per_group.mean(dim=(1, 2)).T
    return out


def keep_counts_ref(
    cu_seqlens_v: torch.Tensor,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
) -> torch.Tensor:
    """Tokens to keep per sample: [B] int64 on the device of ``cu_seqlens_v``.

    ``keep_count`` for every sample with n >= 1 tokens, or from the ratio
    ``clamp(floor(keep_ratio * n + 0.5), 1, n)`` in float64; 0 for a sample with n == 0.
    """
    n = (cu_seqlens_v[1:] - cu_seqlens_v[:-1]).to(torch.int64)
    if keep_count is not None:
        k = torch.full_like(n, int(keep_count))
    else:
        assert keep_ratio is not None
        k = torch.floor(n.to(torch.float64) * float(keep_ratio) + 0.5).to(torch.int64)
        k = torch.clamp(k, min=1)
        k = torch.minimum(k, n)
    return torch.where(n == 0, torch.zeros_like(k), k)


def keep_total_host(
    bounds_v: Sequence[int], keep_ratio: float | None = None, keep_count: int | None = None
) -> int:
    """Total tokens kept over the batch, from host-side offsets (the rule of
    :func:`keep_counts_ref`, in Python's float64): sizes outputs without a device sync."""
    total = 0
    for b in range(len(bounds_v) - 1):
        n = int(bounds_v[b + 1]) - int(bounds_v[b])
        if n == 0:
            continue
        if keep_count is not None:
            total += int(keep_count)
        else:
            assert keep_ratio is not None
            total += min(max(math.floor(n * float(keep_ratio) + 0.5), 1), n)
    return total


#: Fixed-point bits of the relevance weights of the adaptive rule (a sample's top weight is
#: ``2**K`` with ``K = min(MASS_BITS, 53 - bit_length(n))``, so a sample's sum stays below 2**53).
MASS_BITS = 30
#: ``round(2**30 * ln(2)**k / k!)``, k = 0..10: ``2**u`` for ``u`` in [0, 1) in Q30 fixed point
#: (Horner in int64; the same constants are in ``csrc/core/mass.h``).
EXP2_Q30 = (1073741824, 744261118, 257941248, 59597083, 10327387, 1431680, 165394, 16377, 1419,
            109, 8)  # fmt: skip
#: ``log2(e) * 2**30``: a float64 difference of scores times this is log2 of the softmax weight
#: in Q30 fixed point.
LOG2E_Q30 = math.log2(math.e) * 2.0**30


def _exact_pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e as float64 for int64 ``e`` in [-1022, 1023], built from its bits (exact)."""
    return ((e + 1023) << 52).view(torch.float64)


def mass_weights_ref(
    scores: torch.Tensor, cu_seqlens_v: torch.Tensor, relevance: str
) -> torch.Tensor:
    """The int64 relevance weights the adaptive keep rule sums (``docs/contract.md``, stage c).

    Args:
        scores: [Tv] float32/float16/bfloat16 (``relevance="normalize"``: finite and >= 0, or NaN).
        cu_seqlens_v: [B+1] int32/int64.
        relevance: ``"softmax"`` (scores are logits: weight ~ ``exp(s - max)``) or
            ``"normalize"`` (scores are non-negative masses: weight ~ ``s / max``).

    Returns:
        [Tv] int64 in ``[0, 2**K]``, ``K = min(30, 53 - n.bit_length())`` of the token's sample
        (n its tokens): ``floor(2**K * w)`` up to the fixed-point exp below, where ``w`` is
        ``exp(s - max)`` or ``s / 2**e`` (``2**(e-1) <= max < 2**e``). NaN and ``-inf`` weigh 0;
        when the sample's max is ``+inf``, its ``+inf`` tokens weigh ``2**K`` and the rest 0.
        Every step is exact or one correctly rounded float64 operation, and the exp is integer
        arithmetic, so every backend computes the same integers.
    """
    tv = scores.shape[0]
    seg = segment_ids(cu_seqlens_v, tv)
    n = (cu_seqlens_v[1:] - cu_seqlens_v[:-1]).to(torch.int64)
    bits = torch.frexp(n.to(torch.float64))[1].to(torch.int64)  # n.bit_length(), 0 for n == 0
    k = torch.clamp(53 - bits, max=MASS_BITS)[seg]
    x = scores.float().to(torch.float64)
    nan = torch.isnan(x)
    mx = torch.full((n.shape[0],), -math.inf, dtype=torch.float64, device=scores.device)
    mx = mx.scatter_reduce(0, seg, x.masked_fill(nan, -math.inf), "amax")[seg]
    zero = torch.zeros_like(k)
    if relevance == "normalize":
        e = torch.frexp(mx)[1].to(torch.int64)
        scaled = torch.floor(x * _exact_pow2(k - e))
        return torch.where(nan | (mx <= 0), 0.0, scaled).to(torch.int64)
    # softmax: log2 of the weight in Q30, clamped to [-64, 0], then 2**frac by an int64 Horner.
    u = torch.clamp((x - mx) * LOG2E_Q30, min=-64.0 * 2**30)
    y = torch.floor(torch.nan_to_num(u, nan=-64.0 * 2**30)).to(torch.int64)
    whole, frac = y >> 30, y & ((1 << 30) - 1)
    p = torch.full_like(y, EXP2_Q30[-1])
    for c in reversed(EXP2_Q30[:-1]):
        p = c + ((p * frac) >> 30)
    shift = MASS_BITS - k - whole
    w = torch.where(shift >= 31, zero, p >> torch.clamp(shift, max=31))
    w = torch.where(nan | (x == -math.inf), zero, w)
    top = torch.where(x == math.inf, torch.ones_like(k) << k, zero)
    return torch.where(mx == math.inf, top, w)


def mass_keep_counts_ref(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_bounds: torch.Tensor,
    keep_mass: float,
    relevance: str = "softmax",
) -> torch.Tensor:
    """Per-sample keep counts of the adaptive rule: the fewest top tokens whose relevance mass
    reaches ``keep_mass``, clamped to the sample's bounds.

    Args:
        scores: [Tv] float32/float16/bfloat16; cu_seqlens_v: [B+1] int32/int64.
        keep_bounds: [2, B] int64, the least and most tokens each sample keeps
            (``1 <= lo <= hi <= n``; 0 and 0 for an empty sample).
        keep_mass: threshold in (0, 1].
        relevance: as in :func:`mass_weights_ref`.

    Returns:
        [B] int64: ``clamp(m, lo, hi)`` (0 for an empty sample), ``m`` the smallest count whose
        weights (:func:`mass_weights_ref`), summed in the selection order (score desc, index
        asc, NaN last), reach ``keep_mass * total`` (a float64 product; sums are exact int64).
    """
    tv = scores.shape[0]
    device = scores.device
    b = cu_seqlens_v.shape[0] - 1
    seg = segment_ids(cu_seqlens_v, tv)
    w = mass_weights_ref(scores, cu_seqlens_v, relevance)
    order = torch.sort(seg * (1 << 32) + (0xFFFFFFFF - score_keys_ref(scores)), stable=True).indices
    ws = w[order]
    before = torch.cumsum(ws, 0) - ws  # exclusive, over the whole batch
    starts = cu_seqlens_v[:-1].to(torch.int64)
    total = torch.zeros(b, dtype=torch.int64, device=device).index_add_(0, seg, ws)
    first = torch.cat([before, before.new_zeros(1)])[starts]  # an empty sample reads the pad
    local = before - first[seg]  # mass of the tokens ranked above each token, in its sample
    need = local.to(torch.float64) < float(keep_mass) * total.to(torch.float64)[seg]
    m = torch.zeros(b, dtype=torch.int64, device=device).index_add_(0, seg, need.to(torch.int64))
    lo, hi = keep_bounds.to(device=device, dtype=torch.int64)
    n = (cu_seqlens_v[1:] - cu_seqlens_v[:-1]).to(torch.int64)
    return torch.where(n == 0, torch.zeros_like(m), torch.minimum(torch.maximum(m, lo), hi))


def score_keys_ref(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 keys of the scores, as int64 in [0, 2**32).

    Larger key = ranked higher. NaN -> 0 (below -inf); -0.0 and +0.0 share a key.
    """
    x = scores.float() + 0.0  # canonicalises -0.0 to +0.0
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = bits >= 0x80000000
    keys = torch.where(negative, 0xFFFFFFFF - bits, bits | 0x80000000)
    return torch.where(torch.isnan(x), torch.zeros_like(keys), keys)


def _first_k(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    seg: torch.Tensor,
    group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k_b`` tokens of each sample in the order (``group`` asc, score key desc, index
    asc), ``group`` non-decreasing with ``seg`` (the sample id, or a tier within it): ascending
    global indices and ``cu_seqlens_kept`` in the dtype of ``cu_seqlens_v``."""
    tv = scores.shape[0]
    device = scores.device
    # One stable ascending sort of (group, inverted key): within a group, higher key first and
    # equal keys keep index order.
    combined = group * (1 << 32) + (0xFFFFFFFF - score_keys_ref(scores))
    order = torch.sort(combined, stable=True).indices
    starts = cu_seqlens_v[:-1].to(torch.int64)
    rank = torch.arange(tv, device=device) - starts[seg[order]]
    chosen = order[rank < keep_counts.to(device)[seg[order]]]
    kept_idx = torch.sort(chosen).values
    cu_kept = torch.zeros(keep_counts.numel() + 1, dtype=torch.int64, device=device)
    cu_kept[1:] = torch.cumsum(keep_counts.to(device), 0)
    return kept_idx, cu_kept.to(cu_seqlens_v.dtype)


def select_topk_ref(
    scores: torch.Tensor, cu_seqlens_v: torch.Tensor, keep_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-sample top-k.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64.
        keep_counts: [B] int64, 0 <= k_b <= n_b.

    Returns:
        kept_idx: [sum k] int64 global indices, ascending; cu_seqlens_kept: [B+1] in the dtype of
        ``cu_seqlens_v``. Order: score desc, ties by lower index, NaN lowest.
    """
    seg = segment_ids(cu_seqlens_v, scores.shape[0])
    return _first_k(scores, cu_seqlens_v, keep_counts, seg, seg)


def spread_suppressed_ref(
    scores: torch.Tensor, cu_seqlens_v: torch.Tensor, coords: torch.Tensor, radius: int
) -> torch.Tensor:
    """The spread rule's greedy suppression (``docs/contract.md``, stage c, ``spread``).

    Within each sample, tokens are visited in the selection order (score desc, ties by lower
    index, NaN lowest); a token is *accepted* when no token accepted before it is its neighbour,
    else *suppressed*. Neighbours: the same ``coords[:, 0]`` (segment: image or frame) and
    ``max(|row - row'|, |col - col'|) <= radius`` on ``coords[:, 1:]``.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64.
        coords: [Tv, 3] int32/int64 (segment, row, col), distinct within a sample.
        radius: >= 0 (0 suppresses nothing: coordinates are distinct).

    Returns:
        [Tv] bool, True where suppressed.
    """
    tv = scores.shape[0]
    keys = score_keys_ref(scores).tolist()
    cs = [tuple(c) for c in coords.to(torch.int64).tolist()]
    out = [False] * tv
    offsets = _bounds(cu_seqlens_v)
    steps = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]
    steps.remove((0, 0))
    for start, end in itertools.pairwise(offsets):
        where = {cs[i]: i for i in range(start, end)}
        accepted: set[int] = set()
        for i in sorted(range(start, end), key=lambda j: (-keys[j], j)):
            g, r, c = cs[i]
            hit = (where.get((g, r + dr, c + dc)) for dr, dc in steps)
            if any(j in accepted for j in hit if j is not None):
                out[i] = True
            else:
                accepted.add(i)
    return torch.tensor(out, dtype=torch.bool, device=scores.device)


def spread_select_ref(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    coords: torch.Tensor,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k under the spread rule: the accepted tokens of
    :func:`spread_suppressed_ref` in the selection order, then the suppressed ones in that order;
    the first ``k_b`` are kept.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64.
        keep_counts: [B] int64, 0 <= k_b <= n_b.
        coords: [Tv, 3] int32/int64 (segment, row, col).
        radius: >= 0.

    Returns:
        kept_idx: [sum k] int64 global indices, ascending; cu_seqlens_kept: [B+1] in the dtype of
        ``cu_seqlens_v`` (as :func:`select_topk_ref`).
    """
    tv = scores.shape[0]
    seg = segment_ids(cu_seqlens_v, tv)
    tier = spread_suppressed_ref(scores, cu_seqlens_v, coords, radius).to(torch.int64)
    return _first_k(scores, cu_seqlens_v, keep_counts, seg, seg * 2 + tier)


def gather_kept_ref(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept rows and their original position ids.

    Args:
        visual_embeds: [Tv, H] float32/float16/bfloat16.
        position_ids: [Tv] or [R, Tv] int32/int64.
        kept_idx: [Tk] int64 global indices.

    Returns:
        ([Tk, H], [Tk] or [R, Tk]), dtypes of the inputs.
    """
    return visual_embeds.index_select(0, kept_idx), position_ids.index_select(-1, kept_idx)


@flat_args(MergeArgs)
def merge_kept_ref(a: MergeArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned input sequence: text rows and kept visual rows, in sequence order.

    Args (flat, bound as :class:`MergeArgs`):
        inputs_embeds: [Tl, H] text embeddings of the full sequences (visual rows ignored).
        position_ids: [Tl] or [R, Tl] int32/int64 original ids.
        cu_seqlens: [B+1] offsets of the full sequences.
        visual_embeds: [Tv, H] same dtype as ``inputs_embeds``.
        visual_idx: [Tv] int, local position of each visual token in its sample's sequence.
        cu_seqlens_v: [B+1] offsets of the visual tokens.
        kept_idx: [Tk] int64 global visual indices to keep.

    Returns:
        embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1] (dtype of
        ``cu_seqlens``), src_idx [To] int64 (packed full-sequence row of each output row).
    """
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx = a
    tl, tv = inputs_embeds.shape[0], visual_embeds.shape[0]
    device = inputs_embeds.device
    seg_v = segment_ids(cu_seqlens_v, tv)
    vis_rows = cu_seqlens.to(torch.int64)[seg_v] + visual_idx.to(torch.int64)  # global rows
    full = inputs_embeds.clone()
    full[vis_rows] = visual_embeds  # what masked_scatter would have built
    keep = torch.ones(tl, dtype=torch.bool, device=device)
    keep[vis_rows] = False
    keep[vis_rows[kept_idx]] = True
    src_idx = torch.nonzero(keep).flatten()
    seg_l = segment_ids(cu_seqlens, tl)
    counts = torch.bincount(seg_l[src_idx], minlength=cu_seqlens.numel() - 1)
    cu_out = torch.zeros(cu_seqlens.numel(), dtype=torch.int64, device=device)
    cu_out[1:] = torch.cumsum(counts, 0)
    return (
        full.index_select(0, src_idx),
        position_ids.index_select(-1, src_idx),
        cu_out.to(cu_seqlens.dtype),
        src_idx,
    )


def keep_rule_counts_ref(
    scores: torch.Tensor, cu_seqlens_v: torch.Tensor, keep: KeepRule, relevance: str = "softmax"
) -> torch.Tensor:
    """[B] int64 keep counts of any keep rule: :func:`keep_counts_ref` for ``keep_ratio`` /
    ``keep_count``; for ``keep_mass`` :func:`mass_keep_counts_ref`, bounded per sample by the
    counts :func:`keep_counts_ref` gives ``min_keep_ratio`` and ``max_keep_ratio``."""
    if keep.keep_mass is None:
        return keep_counts_ref(cu_seqlens_v, keep.keep_ratio, keep.keep_count)
    lo = keep_counts_ref(cu_seqlens_v, keep_ratio=keep.min_keep_ratio)
    hi = keep_counts_ref(cu_seqlens_v, keep_ratio=keep.max_keep_ratio)
    bounds = torch.stack([lo, hi])
    return mass_keep_counts_ref(scores, cu_seqlens_v, bounds, keep.keep_mass, relevance)


#: The default of the reference composites: no mapper, the raw attention is ranked.
_NO_MAPPER = MapperArgs()
#: No keep rule: the reference composites need one (``KeepRule(keep_ratio=...)``, ...).
_NO_KEEP = KeepRule()
#: The default of the reference composites: no spread rule (the plain top-k).
_NO_SPREAD = SpreadRule()


def _scores_ref(s: ScoringArgs, m: MapperArgs) -> torch.Tensor:
    """Stage a (per head group when the mapper takes several attention channels), then the
    mapper when there is one."""
    groups = m.head_groups()
    if groups == 1:
        attn = instruction_attention_ref(*s)
    else:
        attn = instruction_attention_heads_ref(*s, groups)
    if len(m.params) == 0:
        return attn
    return mapper_forward_ref(attn, s.cu_seqlens_v, *m, validate=False)


def _kept_ref(
    s: ScoringArgs, m: MapperArgs, keep: KeepRule, spread: SpreadRule
) -> tuple[torch.Tensor, ...]:
    """Stages a-c: (scores, kept_idx, cu_seqlens_kept). The adaptive rule's relevance is the
    mapper's softmax, or the raw attention normalised per sample (no mapper); with spread
    coordinates the selection is :func:`spread_select_ref`'s."""
    scores = _scores_ref(s, m)
    relevance = "softmax" if len(m.params) > 0 else "normalize"
    counts = keep_rule_counts_ref(scores, s.cu_seqlens_v, keep, relevance)
    if spread.coords is not None:
        kept = spread_select_ref(scores, s.cu_seqlens_v, counts, spread.coords, spread.radius)
        return (scores, *kept)
    return (scores, *select_topk_ref(scores, s.cu_seqlens_v, counts))


def prune_visual_tokens_ref(
    scoring: ScoringArgs,
    visual_embeds: torch.Tensor,
    visual_position_ids: torch.Tensor,
    mapper: MapperArgs = _NO_MAPPER,
    keep: KeepRule = _NO_KEEP,
    spread: SpreadRule = _NO_SPREAD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stages a-d chained: ``prune_visual_tokens`` with its arguments grouped (``scoring``: those
    of :func:`instruction_attention_ref`; ``mapper``: params, kernel size, input eps, no params
    for the raw attention; ``keep``: the keep rule; ``spread``: the spread rule, none by
    default). Returns (kept_embeds, kept_position_ids, kept_idx, cu_seqlens_kept, scores [Tv]
    float32)."""
    scores, kept_idx, cu_kept = _kept_ref(scoring, mapper, keep, spread)
    kept_embeds, kept_pos = gather_kept_ref(visual_embeds, visual_position_ids, kept_idx)
    return kept_embeds, kept_pos, kept_idx, cu_kept, scores


def prune_and_merge_ref(
    scoring: ScoringArgs,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    mapper: MapperArgs = _NO_MAPPER,
    keep: KeepRule = _NO_KEEP,
    spread: SpreadRule = _NO_SPREAD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stages a-c then the merge: ``prune_and_merge`` with its arguments grouped as in
    :func:`prune_visual_tokens_ref`. Returns (embeds, position_ids_out, cu_seqlens_out, src_idx,
    kept_idx, scores)."""
    scores, kept_idx, _ = _kept_ref(scoring, mapper, keep, spread)
    merged = merge_kept_ref(
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, scoring.visual_idx,
        scoring.cu_seqlens_v, kept_idx,
    )  # fmt: skip
    return (*merged, kept_idx, scores)
