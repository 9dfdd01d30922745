"""Stage c in Triton: threshold top-k with an order-preserving compaction.

:func:`select_topk_triton`: scores -> kept_idx, cu_seqlens_kept (arguments already validated by
the op layer, ``docs/contract.md`` c). The gather and merge that consume ``kept_idx``, and the
fused select + gather / merge, are in :mod:`tokenprune_kernels.triton.gather`.

Keys. A score becomes float32 (exact) and then an order-preserving uint32 key: NaN -> 0, -0.0
and +0.0 share a key, ``key = ~bits`` for negative floats else ``bits | 0x80000000``. The kernels
keep keys in uint32 (logical shifts, unsigned compares).

Selection. The top k of a sample are the keys above its k-th largest key T, plus the first
``k - count(> T)`` keys equal to T by index (the contract's tie rule). T is found by a radix
select on 8-bit digits from the top: a pass histograms (``tl.histogram``, 256 bins, masked) the
keys that match the digits chosen so far - only those are counted - and picks the bin holding the
k-th key. It stops after 4 passes, or as soon as that bin is kept whole (T is then known to a
prefix and every key with that prefix is kept); ``k == n`` and ``k == 0`` cost no pass. A last
pass in index order keeps what the threshold says, and ``tl.cumsum`` plus a running offset gives
each kept token its output slot, so ``kept_idx`` comes out ascending. Two schedules:

- serial (``_select_kernel``): one program per sample loops over its keys in chunks of
  ``BLOCK_V``: all passes and the compaction in ONE launch. Good while samples are small or many.
- wide (``_radix_pass_kernel`` x 4, then ``_wide_compact_kernel``): for few large samples (B = 1,
  N_v = 64k would otherwise run serially on one SM). Each sample is cut into up to ``WIDE_SLICES``
  slices of whole chunks, one program per (sample, slice); pass p's programs replay passes
  0..p-1 from the per-slice histograms ``[4, B, S, 256]`` int32 that earlier launches wrote (no
  atomics, no memset, identical decisions in every program), then histogram their slice. The
  compaction launch derives each slice's count of keys above T and equal to T from the same
  histograms, so each slice knows its output offset and its share of the ties without a scan.
  Chosen when ``Tv >= WIDE_MIN_AVG * B`` (a size rule: no sync; thresholds not yet tuned on a GPU).

Launches and bytes moved (s score bytes, P <= 4 radix passes that run, Tk = sum k, S slices per
sample in the wide schedule; B-sized terms left out):

    _select_kernel       read (P + 1) Tv s, write 8 Tk
    _radix_pass_kernel   (wide, launched 4 times) read Tv s if its pass runs, write 1 KiB per
                         (sample, slice); each program also re-reads the earlier passes'
                         histograms of its sample (up to 3 S KiB, expected to hit L2)
    _wide_compact_kernel (wide) read Tv s, write 8 Tk; each program re-reads up to 4 S KiB

    select_topk   1 launch: _select_kernel (wide: 4 x _radix_pass_kernel + _wide_compact_kernel)

Host syncs: the output size is sum(keep_counts), never a kernel's result: no sync when the caller
passes ``total_kept`` and ``keep_counts`` already lives on the device; otherwise one (reading back
``keep_counts.sum()``, or the blocking host-to-device copy of a CPU ``keep_counts``).
"""

from __future__ import annotations

from typing import TypedDict, Unpack

import torch
import triton
import triton.language as tl

from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.triton.launch import launch

__all__ = ["SelectOptions", "select_topk_triton"]

#: Keys per chunk: the select programs loop over their keys BLOCK_V at a time.
BLOCK_V = 2048
#: keep_counts entries summed per step when a program computes its output offset.
BLOCK_B = 1024
SELECT_WARPS = 8
#: Wide schedule: at most this many slices (programs) per sample; used when Tv >= this * B.
WIDE_SLICES = 32
WIDE_MIN_AVG = 16384
#: Slices the wide kernels' per-slice tables hold (one compile whatever the slice count).
S_MAX = triton.next_power_of_2(WIDE_SLICES)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def _score_keys(x):
    """Scores (any float dtype) -> order-preserving uint32 keys (NaN 0, -0.0 == +0.0)."""
    x = x.to(tl.float32)
    bits = x.to(tl.uint32, bitcast=True)
    # x < 0 is false for -0.0 (and NaN): -0.0 gets 0x80000000 | 0x80000000, the key of +0.0.
    key = tl.where(x < 0.0, ~bits, bits | 0x80000000)
    return tl.where(x != x, tl.zeros_like(key), key)


@triton.jit
def _digit_hist(scores_ptr, lo, hi, prefix, kmask, shift: tl.constexpr, BLOCK: tl.constexpr):
    """[256] int32: keys of scores[lo:hi] with ``key & kmask == prefix``, by digit ``shift``."""
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([256], tl.int32)
    for c in range(lo, hi, BLOCK):
        idx = c + offs
        valid = idx < hi
        key = _score_keys(tl.load(scores_ptr + idx, mask=valid, other=0.0))
        match = valid & ((key & kmask) == prefix)
        # Only the matching lanes are counted (the others, most of them after the first pass,
        # add nothing: no update of bin 0 to take back).
        hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
    return hist


@triton.jit
def _decide(hist, prefix, kmask, remaining, shift: tl.constexpr):
    """One radix step: the bin d holding the ``remaining``-th largest matching key.

    Returns (prefix, kmask, remaining, todo, d) after the step; todo is 0 once the bin is kept
    whole.
    """
    bins = tl.arange(0, 256)
    total = tl.sum(hist, axis=0)
    suffix = total - tl.cumsum(hist, axis=0) + hist  # keys in bins >= d
    d = tl.max(tl.where(suffix >= remaining, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > d, hist, 0), axis=0)
    in_bin = tl.sum(tl.where(bins == d, hist, 0), axis=0)
    remaining = remaining - above
    prefix = prefix | (d.to(tl.uint32) << shift)
    kmask = kmask | (0xFF << shift)
    todo = (in_bin != remaining).to(tl.int32)
    return prefix, kmask, remaining, todo, d


@triton.jit
def _compact(scores_ptr, lo, hi, prefix, kmask, take, out_ptr, BLOCK: tl.constexpr):
    """Write, ascending, the indices i in [lo, hi) with ``key & kmask > prefix``, plus the first
    ``take`` with ``key & kmask == prefix``, to out_ptr[0], out_ptr[1], ..."""
    offs = tl.arange(0, BLOCK)
    written = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for c in range(lo, hi, BLOCK):
        idx = c + offs
        valid = idx < hi
        top = _score_keys(tl.load(scores_ptr + idx, mask=valid, other=0.0)) & kmask
        eq = valid & (top == prefix)
        eq_i = eq.to(tl.int32)
        tie_rank = ties + tl.cumsum(eq_i, axis=0) - eq_i
        keep = (valid & (top > prefix)) | (eq & (tie_rank < take))
        keep_i = keep.to(tl.int32)
        slot = written + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(out_ptr + slot, idx.to(tl.int64), mask=keep)
        written += tl.sum(keep_i, axis=0)
        ties += tl.sum(eq_i, axis=0)


@triton.jit
def _sum_before(counts_ptr, b, BLOCK_B: tl.constexpr):
    """sum(counts[:b]) as int64 (the output offset of sample b)."""
    offs = tl.arange(0, BLOCK_B)
    acc = tl.zeros([], tl.int64)
    for c in range(0, b, BLOCK_B):
        o = c + offs
        acc += tl.sum(tl.load(counts_ptr + o, mask=o < b, other=0).to(tl.int64), axis=0)
    return acc


@triton.jit
def _sample(cu_v_ptr, counts_ptr, b):
    """(start int64, n int32, k int32) of sample b."""
    start = tl.load(cu_v_ptr + b).to(tl.int64)
    n = (tl.load(cu_v_ptr + b + 1).to(tl.int64) - start).to(tl.int32)
    k = tl.load(counts_ptr + b).to(tl.int32)
    return start, n, k


@triton.jit
def _select_kernel(
    scores_ptr,
    cu_v_ptr,
    counts_ptr,
    kept_ptr,
    cu_kept_ptr,
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Program b: top-k of sample b -> kept_idx[cu_kept[b]:cu_kept[b+1]], all passes serial."""
    b = tl.program_id(0)
    start, n, k = _sample(cu_v_ptr, counts_ptr, b)
    kept0 = _sum_before(counts_ptr, b, BLOCK_B)
    tl.store(cu_kept_ptr + b + 1, kept0 + k)
    if b == 0:
        tl.store(cu_kept_ptr, kept0 * 0)
    prefix = tl.full([], 0, tl.uint32)
    kmask = tl.full([], 0, tl.uint32)
    remaining = k
    # k == n keeps everything (kmask 0: every key ties), k == 0 keeps nothing: no pass needed.
    todo = ((k < n) & (k > 0)).to(tl.int32)
    for p in tl.static_range(4):
        if todo != 0:
            hist = _digit_hist(scores_ptr, start, start + n, prefix, kmask, 24 - 8 * p, BLOCK)
            prefix, kmask, remaining, todo, _ = _decide(hist, prefix, kmask, remaining, 24 - 8 * p)
    _compact(scores_ptr, start, start + n, prefix, kmask, remaining, kept_ptr + kept0, BLOCK)


@triton.jit
def _wide_program(cu_v_ptr, counts_ptr, slice_len):
    """Program (b, s) of a wide launch: (b, s, sample start int64, n, k, the slice's bounds
    lo, hi within the sample; ``lo >= n``: an empty slice)."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    start, n, k = _sample(cu_v_ptr, counts_ptr, b)
    lo = s * slice_len
    return b, s, start, n, k, lo, tl.minimum(lo + slice_len, n)


@triton.jit
def _replay(hist_ptr, b, n_batch, n_slices, n, k, slice_len, NPASS: tl.constexpr,
            S_MAX: tl.constexpr):  # fmt: skip
    """Redo the first NPASS radix steps of sample b from the per-slice histograms.

    Returns (prefix, kmask, remaining, todo, gt, eq): gt[s] / eq[s] ([S_MAX] int32) count the
    keys of slice s above / equal to the threshold prefix so far.
    """
    sl = tl.arange(0, S_MAX)
    bins = tl.arange(0, 256)
    lo = sl * slice_len
    eq = tl.maximum(tl.minimum(n - lo, slice_len), 0)  # before any pass every key ties
    gt = tl.zeros([S_MAX], tl.int32)
    tile_mask = ((sl < n_slices) & (lo < n))[:, None]
    prefix = tl.full([], 0, tl.uint32)
    kmask = tl.full([], 0, tl.uint32)
    remaining = k
    todo = ((k < n) & (k > 0)).to(tl.int32)
    for q in tl.static_range(NPASS):
        if todo != 0:
            base = hist_ptr + ((q * n_batch + b) * n_slices).to(tl.int64) * 256
            tile = tl.load(base + sl[:, None] * 256 + bins[None, :], mask=tile_mask, other=0)
            prefix, kmask, remaining, todo, d = _decide(
                tl.sum(tile, axis=0), prefix, kmask, remaining, 24 - 8 * q
            )
            gt += tl.sum(tl.where(bins[None, :] > d, tile, 0), axis=1)
            eq = tl.sum(tl.where(bins[None, :] == d, tile, 0), axis=1)
    return prefix, kmask, remaining, todo, gt, eq


@triton.jit(do_not_specialize=["n_slices"])
def _radix_pass_kernel(
    scores_ptr,
    cu_v_ptr,
    counts_ptr,
    hist_ptr,
    n_batch,
    n_slices,
    slice_len,
    PASS: tl.constexpr,
    BLOCK: tl.constexpr,
    S_MAX: tl.constexpr,
):
    """Program (b, s): histogram of slice s of sample b for radix pass PASS -> hist[PASS, b, s]."""
    b, s, start, n, k, lo, hi = _wide_program(cu_v_ptr, counts_ptr, slice_len)
    if lo < n:
        prefix, kmask, _, todo, _, _ = _replay(
            hist_ptr, b, n_batch, n_slices, n, k, slice_len, PASS, S_MAX
        )
        if todo != 0:
            hist = _digit_hist(scores_ptr, start + lo, start + hi, prefix, kmask, 24 - 8 * PASS,
                               BLOCK)  # fmt: skip
            out = hist_ptr + (((PASS * n_batch + b) * n_slices + s).to(tl.int64) * 256)
            tl.store(out + tl.arange(0, 256), hist)


@triton.jit(do_not_specialize=["n_slices"])
def _wide_compact_kernel(
    scores_ptr,
    cu_v_ptr,
    counts_ptr,
    hist_ptr,
    kept_ptr,
    cu_kept_ptr,
    n_batch,
    n_slices,
    slice_len,
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    S_MAX: tl.constexpr,
):
    """Program (b, s): the kept indices of slice s of sample b, at the slice's output offset."""
    b, s, start, n, k, lo, hi = _wide_program(cu_v_ptr, counts_ptr, slice_len)
    kept0 = _sum_before(counts_ptr, b, BLOCK_B)
    if s == 0:
        tl.store(cu_kept_ptr + b + 1, kept0 + k)
        if b == 0:
            tl.store(cu_kept_ptr, kept0 * 0)
    if lo < n:
        prefix, kmask, remaining, _, gt, eq = _replay(
            hist_ptr, b, n_batch, n_slices, n, k, slice_len, 4, S_MAX
        )
        # Ties go to the lowest indices: slice s takes what the slices before it left.
        eq_before = tl.cumsum(eq, axis=0) - eq
        take = tl.minimum(tl.maximum(remaining - eq_before, 0), eq)
        kept = gt + take
        offset = tl.cumsum(kept, axis=0) - kept
        sl = tl.arange(0, S_MAX)
        my_take = tl.sum(tl.where(sl == s, take, 0), axis=0)
        my_offset = tl.sum(tl.where(sl == s, offset, 0), axis=0)
        _compact(scores_ptr, start + lo, start + hi, prefix, kmask, my_take,
                 kept_ptr + kept0 + my_offset, BLOCK)  # fmt: skip


# ---------------------------------------------------------------------------------- host side


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of this module and of :mod:`.gather` comes from here (the
    tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _total_kept(keep_counts: torch.Tensor, total_kept: int | None) -> int:
    if total_kept is not None:
        return int(total_kept)
    return int(keep_counts.sum())  # one device -> host sync when keep_counts is on the GPU


def _flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 1-D score and index tensors as the kernels read them: flat memory, element stride 1
    (a copy only for a non-contiguous view; the usual contiguous tensor passes through)."""
    return tuple(t.contiguous() for t in tensors)


def _select(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    block_v: int,
    wide: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 launch (serial) or 5 (wide); see the module docstring."""
    device = scores.device
    batch = cu_seqlens_v.shape[0] - 1
    tv = scores.shape[0]
    kept_idx = _alloc((total_kept,), torch.int64, device)
    cu_kept = _alloc((batch + 1,), cu_seqlens_v.dtype, device)
    if batch == 0:
        return kept_idx, cu_kept.zero_()
    counts = keep_counts.to(device=device, dtype=torch.int64)
    slices = min(WIDE_SLICES, triton.cdiv(tv, block_v))
    if wide is None:
        wide = tv >= WIDE_MIN_AVG * batch
    if not wide or slices <= 1:
        launch(
            _select_kernel, (batch,), scores, cu_seqlens_v, counts, kept_idx, cu_kept,
            BLOCK=block_v, BLOCK_B=BLOCK_B, num_warps=SELECT_WARPS,
        )  # fmt: skip
        return kept_idx, cu_kept
    slice_len = triton.cdiv(triton.cdiv(tv, slices), block_v) * block_v
    slices = triton.cdiv(tv, slice_len)
    hist = _alloc((4, batch, slices, 256), torch.int32, device)
    common = {"BLOCK": block_v, "S_MAX": S_MAX, "num_warps": SELECT_WARPS}
    for p in range(4):
        launch(
            _radix_pass_kernel, (batch, slices),
            scores, cu_seqlens_v, counts, hist, batch, slices, slice_len, PASS=p, **common,
        )  # fmt: skip
    launch(
        _wide_compact_kernel, (batch, slices),
        scores, cu_seqlens_v, counts, hist, kept_idx, cu_kept, batch, slices, slice_len,
        BLOCK_B=BLOCK_B, **common,
    )  # fmt: skip
    return kept_idx, cu_kept


class SelectOptions(TypedDict, total=False):
    """The tuning keywords of the select host functions (this module's and :mod:`.gather`'s
    fused ones).

    Attributes:
        block_v: keys per chunk (a power of two; default :data:`BLOCK_V`, tests shrink it).
        wide: force the wide (True) or serial (False) schedule; None (default) picks by size.
    """

    block_v: int
    wide: bool | None


def select_topk_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    *,
    total_kept: int | None = None,
    **options: Unpack[SelectOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k by (score desc, index asc), NaN lowest, -0.0 == +0.0.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_counts: [B] int64, 0 <= k_b <= n_b (best on the device of ``scores``).
        total_kept: sum(keep_counts) when the caller knows it (saves the one host sync).
        options: ``block_v``, ``wide`` (:class:`SelectOptions`).

    Returns:
        kept_idx: [sum k] int64 global indices, ascending; cu_seqlens_kept: [B+1], dtype of
        ``cu_seqlens_v``. 1 launch (serial) or 5 (wide). Syncs: none with ``total_kept`` and
        device ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_topk", scores.device):
        return _select_flat(scores, cu_seqlens_v, keep_counts, total_kept, **options)[:2]


def _select_flat(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int | None = None,
    block_v: int = BLOCK_V,
    wide: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_select` on the flat (contiguous) inputs: (kept_idx, cu_seqlens_kept, the flat
    ``cu_seqlens_v``, for the fused functions of :mod:`.gather` to reuse)."""
    scores, cu_seqlens_v, keep_counts = _flat(scores, cu_seqlens_v, keep_counts)
    total = _total_kept(keep_counts, total_kept)
    return (*_select(scores, cu_seqlens_v, keep_counts, total, block_v, wide), cu_seqlens_v)
