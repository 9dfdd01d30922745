"""Stages c and d in Triton: threshold top-k, order-preserving compaction, row copies.

Host functions (arguments already validated by the op layer, ``docs/contract.md`` c, d, merge):

    :func:`select_topk_triton`   scores -> kept_idx, cu_seqlens_kept
    :func:`gather_kept_triton`   kept_idx -> kept rows and their position ids
    :func:`merge_kept_triton`    kept_idx -> the pruned sequence (text + kept visual rows)
    :func:`select_merge_triton`  scores -> the pruned sequence (what prune_and_merge runs)
    :func:`select_gather_triton` scores -> kept rows (what prune_visual_tokens runs)

Keys. A score becomes float32 (exact) and then an order-preserving uint32 key: NaN -> 0, -0.0
and +0.0 share a key, ``key = ~bits`` for negative floats else ``bits | 0x80000000``. The kernels
keep keys in uint32 (logical shifts, unsigned compares).

Selection. The top k of a sample are the keys above its k-th largest key T, plus the first
``k - count(> T)`` keys equal to T by index (the contract's tie rule). T is found by a radix
select on 8-bit digits from the top: a pass histograms (``tl.histogram``, 256 bins) the keys
that match the digits chosen so far and picks the bin holding the k-th key. It stops after 4
passes, or as soon as that bin is kept whole (T is then known to a prefix and every key with
that prefix is kept); ``k == n`` and ``k == 0`` cost no pass. A last pass in index order keeps
what the threshold says, and ``tl.cumsum`` plus a running offset gives each kept token its
output slot, so ``kept_idx`` comes out ascending. Two schedules:

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

Merge maps (``_merge_maps_kernel``): fully parallel over the full-sequence rows, no scan. For row
j of sample b, with g the first visual token of b at or after j's position (a binary search in
``visual_idx``) and t the number of kept indices below g (a binary search in ``kept_idx``), the
row survives unless it is a dropped visual row, and its output row is ``j - g + t`` (rows before
it, minus the visual tokens before it, plus the kept ones among them). The kernel writes
``src_idx`` and ``row_src`` (>= 0: row of ``inputs_embeds``; < 0: row ``-row_src - 1`` of
``visual_embeds``) and ``cu_seqlens_out``.

Row copy (``_copy_rows_kernel``): one wide launch over (output rows / ``COPY_ROWS``) x (H /
``BLOCK_H``) that reads each kept row once (text and visual alike, straight into the pruned
sequence) and copies the position ids ``[R, T]`` alongside.

Launches and bytes moved (s score bytes, e embedding bytes, c / i / p bytes of a cu_seqlens /
visual_idx / position id entry, P <= 4 radix passes that run, Tk = sum k, To = Tl - Tv + Tk,
S slices per sample in the wide schedule; B-sized terms left out):

    _select_kernel       read (P + 1) Tv s, write 8 Tk
    _radix_pass_kernel   (wide, launched 4 times) read Tv s if its pass runs, write 1 KiB per
                         (sample, slice); each program also re-reads the earlier passes'
                         histograms of its sample (up to 3 S KiB, expected to hit L2)
    _wide_compact_kernel (wide) read Tv s, write 8 Tk; each program re-reads up to 4 S KiB
    _merge_maps_kernel   write 16 To (src_idx, row_src); read per full-sequence row about
                         log2(B) c + log2(n_v) i + 8 log2(Tk) bytes in binary searches
                         (small arrays re-read by every row: expected to hit in cache)
    _copy_rows_kernel    read To (H e + R p + 16), write To (H e + R p)

    select_topk   1 launch: _select_kernel (wide: 4 x _radix_pass_kernel + _wide_compact_kernel)
    gather_kept   1 launch: _copy_rows_kernel
    merge_kept    2 launches: _merge_maps_kernel, _copy_rows_kernel
    select_merge  3 launches: select (1, wide 5), _merge_maps_kernel, _copy_rows_kernel
    select_gather 2 launches: select (1, wide 5), _copy_rows_kernel

The copy moves most of the bytes, 2 To H e, against about (P + 1) Tv s + 16 To for the rest.

Host syncs: output sizes come from shapes and keep counts, never from a kernel's result.
``gather_kept_triton`` and ``merge_kept_triton`` never sync (To = Tl - Tv + len(kept_idx)). The
select functions need sum(keep_counts): no sync when the caller passes ``total_kept`` and
``keep_counts`` already lives on the device; otherwise one (reading back ``keep_counts.sum()``,
or the blocking host-to-device copy of a CPU ``keep_counts``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.triton.lowering import LoweringCase

__all__ = [
    "LOWERING_CASES",
    "gather_kept_triton",
    "merge_kept_triton",
    "select_gather_triton",
    "select_merge_triton",
    "select_topk_triton",
]

#: Keys per chunk: the select programs loop over their keys BLOCK_V at a time.
BLOCK_V = 2048
#: keep_counts entries summed per step when a program computes its output offset.
BLOCK_B = 1024
SELECT_WARPS = 8
#: Wide schedule: at most this many slices (programs) per sample; used when Tv >= this * B.
WIDE_SLICES = 32
WIDE_MIN_AVG = 16384
#: Full-sequence rows per program of the merge maps.
MAPS_BLOCK = 1024
MAPS_WARPS = 4
#: Output rows and (at most) hidden columns per program of the row copy.
COPY_ROWS = 4
COPY_MAX_H = 1024
COPY_WARPS = 4


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
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], tl.int32)
    for c in range(lo, hi, BLOCK):
        idx = c + offs
        valid = idx < hi
        key = _score_keys(tl.load(scores_ptr + idx, mask=valid, other=0.0))
        match = valid & ((key & kmask) == prefix)
        digit = tl.where(match, (key >> shift) & 0xFF, 0).to(tl.int32)
        h = tl.histogram(digit, 256)
        # Lanes that do not match were counted in bin 0: take them out again.
        miss = BLOCK - tl.sum(match.to(tl.int32), axis=0)
        hist += tl.where(bins == 0, h - miss, h)
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


@triton.jit
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
    b = tl.program_id(0)
    s = tl.program_id(1)
    start, n, k = _sample(cu_v_ptr, counts_ptr, b)
    lo = s * slice_len
    if lo < n:
        prefix, kmask, _, todo, _, _ = _replay(
            hist_ptr, b, n_batch, n_slices, n, k, slice_len, PASS, S_MAX
        )
        if todo != 0:
            hi = tl.minimum(lo + slice_len, n)
            hist = _digit_hist(scores_ptr, start + lo, start + hi, prefix, kmask, 24 - 8 * PASS,
                               BLOCK)  # fmt: skip
            out = hist_ptr + (((PASS * n_batch + b) * n_slices + s).to(tl.int64) * 256)
            tl.store(out + tl.arange(0, 256), hist)


@triton.jit
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
    b = tl.program_id(0)
    s = tl.program_id(1)
    start, n, k = _sample(cu_v_ptr, counts_ptr, b)
    kept0 = _sum_before(counts_ptr, b, BLOCK_B)
    if s == 0:
        tl.store(cu_kept_ptr + b + 1, kept0 + k)
        if b == 0:
            tl.store(cu_kept_ptr, kept0 * 0)
    lo = s * slice_len
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
        hi = tl.minimum(lo + slice_len, n)
        _compact(scores_ptr, start + lo, start + hi, prefix, kmask, my_take,
                 kept_ptr + kept0 + my_offset, BLOCK)  # fmt: skip


@triton.jit
def _lower_bound(ptr, lo, hi, target, steps):
    """Per lane: the first i in [lo, hi) with ptr[i] >= target (hi if none). ``steps`` must be
    at least bit_length(hi - lo)."""
    for _ in range(steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        v = tl.load(ptr + mid, mask=active, other=0)
        right = active & (v < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v >= target), mid, hi)
    return lo


@triton.jit
def _merge_maps_kernel(
    cu_ptr,
    cu_v_ptr,
    vidx_ptr,
    kept_ptr,
    src_ptr,
    row_src_ptr,
    cu_out_ptr,
    n_batch,
    n_rows,
    n_kept,
    steps_b,
    steps_v,
    steps_k,
    BLOCK: tl.constexpr,
):
    """Rows j of the full sequences -> src_idx / row_src at their output rows; cu_seqlens_out."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.int64)
    valid = j < n_rows
    # Sample of row j: the first b with cu[b + 1] > j.
    b = _lower_bound(cu_ptr + 1, zero, zero + n_batch, j + 1, steps_b)
    b = tl.where(valid, b, 0)
    row0 = tl.load(cu_ptr + b, mask=valid, other=0).to(tl.int64)
    v0 = tl.load(cu_v_ptr + b, mask=valid, other=0).to(tl.int64)
    v1 = tl.load(cu_v_ptr + b + 1, mask=valid, other=0).to(tl.int64)
    local = j - row0
    g = _lower_bound(vidx_ptr, v0, v1, local, steps_v)  # first visual token at or after row j
    is_vis = (g < v1) & (tl.load(vidx_ptr + g, mask=valid & (g < v1), other=-1) == local)
    t = _lower_bound(kept_ptr, zero, zero + n_kept, g, steps_k)  # kept indices below g
    kept = (t < n_kept) & (tl.load(kept_ptr + t, mask=valid & (t < n_kept), other=-1) == g)
    keep = valid & (kept | ~is_vis)
    out = j - g + t
    tl.store(src_ptr + out, j, mask=keep)
    tl.store(row_src_ptr + out, tl.where(is_vis, -g - 1, j), mask=keep)
    # cu_seqlens_out[i] = cu[i] - cu_v[i] + (kept indices below cu_v[i]), lanes i <= B.
    first = j <= n_batch
    cv = tl.load(cu_v_ptr + j, mask=first, other=0).to(tl.int64)
    below = _lower_bound(kept_ptr, zero, zero + n_kept, cv, steps_k)
    cu = tl.load(cu_ptr + j, mask=first, other=0).to(tl.int64)
    tl.store(cu_out_ptr + j, cu - cv + below, mask=first)


@triton.jit
def _copy_rows_kernel(
    out_ptr,
    text_ptr,
    vis_ptr,
    row_src_ptr,
    n_rows,
    hidden,
    stride_out,
    stride_text,
    stride_vis,
    pos_out_ptr,
    pos_in_ptr,
    pos_idx_ptr,
    n_pos_rows,
    stride_pos_out,
    stride_pos_in_r,
    stride_pos_in_t,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_TEXT: tl.constexpr,
):
    """out[r, h-block] = source row of r; position ids copied by the first H-block's programs.

    ``row_src[r]``: with HAS_TEXT, >= 0 is a row of text, < 0 is row ``-row_src - 1`` of vis;
    without, always a row of vis. ``pos_out[:, r] = pos_in[:, pos_idx[r]]``.
    """
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    src = tl.load(row_src_ptr + rows64, mask=rmask, other=0)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m = rmask[:, None] & (cols < hidden)[None, :]
    if HAS_TEXT:
        # Two loads with complementary masks (a select between two pointers would lose the
        # alignment facts that let the loads vectorise).
        is_vis = (src < 0)[:, None]
        vrow = tl.where(src < 0, -src - 1, 0)
        trow = tl.where(src < 0, 0, src)
        v = tl.load(vis_ptr + vrow[:, None] * stride_vis + cols[None, :], mask=m & is_vis)
        t = tl.load(text_ptr + trow[:, None] * stride_text + cols[None, :], mask=m & ~is_vis)
        vals = tl.where(is_vis, v, t)
    else:
        vals = tl.load(vis_ptr + src[:, None] * stride_vis + cols[None, :], mask=m)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], vals, mask=m)
    if pid_h == 0:
        pidx = tl.load(pos_idx_ptr + rows64, mask=rmask, other=0)
        for r in range(n_pos_rows):
            p = tl.load(pos_in_ptr + r * stride_pos_in_r + pidx * stride_pos_in_t, mask=rmask)
            tl.store(pos_out_ptr + r * stride_pos_out + rows64, p, mask=rmask)


# ---------------------------------------------------------------------------------- host side


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _total_kept(keep_counts: torch.Tensor, total_kept: int | None) -> int:
    if total_kept is not None:
        return int(total_kept)
    return int(keep_counts.sum())  # one device -> host sync when keep_counts is on the GPU


def _flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 1-D score and index tensors as the kernels read them: flat memory, element stride 1
    (a copy only for a non-contiguous view; the usual contiguous tensor passes through)."""
    return tuple(t.contiguous() for t in tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [T, H] tensor with unit stride along H (copied only when it has not)."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _copy_rows(
    text: torch.Tensor | None,
    vis: torch.Tensor,
    row_src: torch.Tensor,
    position_ids: torch.Tensor,
    pos_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One _copy_rows_kernel launch: rows by ``row_src``, position ids by ``pos_idx``."""
    n = row_src.shape[0]
    hidden = vis.shape[1]
    vis = _rows(vis)
    text_t = vis if text is None else _rows(text)
    out = _alloc((n, hidden), vis.dtype, vis.device)
    pos2d = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    pos_out = _alloc((pos2d.shape[0], n), pos2d.dtype, pos2d.device)
    if n > 0:
        block_h = min(triton.next_power_of_2(max(hidden, 1)), COPY_MAX_H)
        grid = (triton.cdiv(n, COPY_ROWS), max(triton.cdiv(hidden, block_h), 1))
        _copy_rows_kernel[grid](
            out, text_t, vis, row_src, n, hidden,
            out.stride(0), text_t.stride(0), vis.stride(0),
            pos_out, pos2d, pos_idx, pos2d.shape[0],
            pos_out.stride(0), pos2d.stride(0), pos2d.stride(1),
            BLOCK_R=COPY_ROWS, BLOCK_H=block_h, HAS_TEXT=text is not None,
            num_warps=COPY_WARPS,
        )  # fmt: skip
    return out, (pos_out if position_ids.dim() == 2 else pos_out.squeeze(0))


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
        _select_kernel[(batch,)](
            scores, cu_seqlens_v, counts, kept_idx, cu_kept,
            BLOCK=block_v, BLOCK_B=BLOCK_B, num_warps=SELECT_WARPS,
        )  # fmt: skip
        return kept_idx, cu_kept
    slice_len = triton.cdiv(triton.cdiv(tv, slices), block_v) * block_v
    slices = triton.cdiv(tv, slice_len)
    s_max = triton.next_power_of_2(slices)
    hist = _alloc((4, batch, slices, 256), torch.int32, device)
    for p in range(4):
        _radix_pass_kernel[(batch, slices)](
            scores, cu_seqlens_v, counts, hist, batch, slices, slice_len,
            PASS=p, BLOCK=block_v, S_MAX=s_max, num_warps=SELECT_WARPS,
        )  # fmt: skip
    _wide_compact_kernel[(batch, slices)](
        scores, cu_seqlens_v, counts, hist, kept_idx, cu_kept, batch, slices, slice_len,
        BLOCK=block_v, BLOCK_B=BLOCK_B, S_MAX=s_max, num_warps=SELECT_WARPS,
    )  # fmt: skip
    return kept_idx, cu_kept


def _merge_maps(
    cu_seqlens: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    visual_idx: torch.Tensor,
    kept_idx: torch.Tensor,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One _merge_maps_kernel launch -> (src_idx [To], row_src [To], cu_seqlens_out [B+1])."""
    device = cu_seqlens.device
    batch = cu_seqlens.shape[0] - 1
    n_out = n_rows - visual_idx.shape[0] + kept_idx.shape[0]
    src_idx = _alloc((n_out,), torch.int64, device)
    row_src = _alloc((n_out,), torch.int64, device)
    cu_out = _alloc((batch + 1,), cu_seqlens.dtype, device)
    grid = (triton.cdiv(max(n_rows, batch + 1), MAPS_BLOCK),)
    _merge_maps_kernel[grid](
        cu_seqlens, cu_seqlens_v, visual_idx, kept_idx, src_idx, row_src, cu_out,
        batch, n_rows, kept_idx.shape[0],
        batch.bit_length(), visual_idx.shape[0].bit_length(), kept_idx.shape[0].bit_length(),
        BLOCK=MAPS_BLOCK, num_warps=MAPS_WARPS,
    )  # fmt: skip
    return src_idx, row_src, cu_out


def select_topk_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    *,
    total_kept: int | None = None,
    block_v: int = BLOCK_V,
    wide: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k by (score desc, index asc), NaN lowest, -0.0 == +0.0.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_counts: [B] int64, 0 <= k_b <= n_b (best on the device of ``scores``).
        total_kept: sum(keep_counts) when the caller knows it (saves the one host sync).
        block_v: keys per chunk (a power of two; tests shrink it).
        wide: force the wide (True) or serial (False) schedule; None picks by size.

    Returns:
        kept_idx: [sum k] int64 global indices, ascending; cu_seqlens_kept: [B+1], dtype of
        ``cu_seqlens_v``. 1 launch (serial) or 5 (wide). Syncs: none with ``total_kept`` and
        device ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_topk", scores.device):
        scores, cu_seqlens_v, keep_counts = _flat(scores, cu_seqlens_v, keep_counts)
        total = _total_kept(keep_counts, total_kept)
        return _select(scores, cu_seqlens_v, keep_counts, total, block_v, wide)


def gather_kept_triton(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept rows and their original position ids; one launch, no sync.

    Args:
        visual_embeds: [Tv, H] float32/float16/bfloat16.
        position_ids: [Tv] or [R, Tv] int32/int64.
        kept_idx: [Tk] int64 global visual indices.

    Returns:
        ([Tk, H], [Tk] or [R, Tk]) in the input dtypes.
    """
    with stage_range("tokenprune.gather_kept", visual_embeds.device):
        (kept_idx,) = _flat(kept_idx)
        return _copy_rows(None, visual_embeds, kept_idx, position_ids, kept_idx)


def merge_kept_triton(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned sequence for a given selection, exactly as ``merge_kept_ref``.

    Args:
        inputs_embeds: [Tl, H] float32/float16/bfloat16 (rows at visual positions ignored).
        position_ids: [Tl] or [R, Tl] int32/int64.
        cu_seqlens: [B+1] int32/int64 offsets of the full sequences.
        visual_embeds: [Tv, H], dtype of ``inputs_embeds``.
        visual_idx: [Tv] int32/int64 local positions, strictly increasing within a sample.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        kept_idx: [Tk] int64 global visual indices, strictly increasing.

    Returns:
        embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1] (dtype of
        ``cu_seqlens``), src_idx [To] int64; To = Tl - Tv + Tk. Two launches, no sync.
    """
    with stage_range("tokenprune.merge_kept", inputs_embeds.device):
        cu_seqlens, cu_seqlens_v, visual_idx, kept_idx = _flat(
            cu_seqlens, cu_seqlens_v, visual_idx, kept_idx
        )
        src_idx, row_src, cu_out = _merge_maps(
            cu_seqlens, cu_seqlens_v, visual_idx, kept_idx, inputs_embeds.shape[0]
        )
        embeds, pos = _copy_rows(inputs_embeds, visual_embeds, row_src, position_ids, src_idx)
        return embeds, pos, cu_out, src_idx


def select_merge_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    *,
    total_kept: int | None = None,
    block_v: int = BLOCK_V,
    wide: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select, then one order-preserving compaction straight into the pruned sequence.

    The select writes ``kept_idx``; the merge maps place every text row and kept visual row at
    its output row; one row copy then moves each kept row once. 3 launches (7 wide).

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_counts: [B] int64, 0 <= k_b <= n_b.
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx: as
            :func:`merge_kept_triton`.
        total_kept: sum(keep_counts) when the caller knows it (saves the one host sync).
        block_v, wide: as :func:`select_topk_triton`.

    Returns:
        (embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1], src_idx [To] int64,
        kept_idx [Tk] int64), equal to ``merge_kept_ref(..., select_topk_ref(...)[0])``.
        Syncs: none with ``total_kept`` and device ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_merge", scores.device):
        scores, cu_seqlens_v, keep_counts, cu_seqlens, visual_idx = _flat(
            scores, cu_seqlens_v, keep_counts, cu_seqlens, visual_idx
        )
        total = _total_kept(keep_counts, total_kept)
        kept_idx, _ = _select(scores, cu_seqlens_v, keep_counts, total, block_v, wide)
        src_idx, row_src, cu_out = _merge_maps(
            cu_seqlens, cu_seqlens_v, visual_idx, kept_idx, inputs_embeds.shape[0]
        )
        embeds, pos = _copy_rows(inputs_embeds, visual_embeds, row_src, position_ids, src_idx)
        return embeds, pos, cu_out, src_idx, kept_idx


def select_gather_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    visual_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    total_kept: int | None = None,
    block_v: int = BLOCK_V,
    wide: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select then gather (what prune_visual_tokens runs); 2 launches (6 wide).

    Args:
        scores: [Tv] float32/float16/bfloat16; cu_seqlens_v: [B+1]; keep_counts: [B] int64.
        visual_embeds: [Tv, H] float32/float16/bfloat16; position_ids: [Tv] or [R, Tv] int.
        total_kept: sum(keep_counts) when the caller knows it (saves the one host sync).
        block_v, wide: as :func:`select_topk_triton`.

    Returns:
        (kept_embeds [Tk, H], kept_position_ids [Tk] or [R, Tk], kept_idx [Tk] int64,
        cu_seqlens_kept [B+1] dtype of ``cu_seqlens_v``).
    """
    with stage_range("tokenprune.select_gather", scores.device):
        scores, cu_seqlens_v, keep_counts = _flat(scores, cu_seqlens_v, keep_counts)
        total = _total_kept(keep_counts, total_kept)
        kept_idx, cu_kept = _select(scores, cu_seqlens_v, keep_counts, total, block_v, wide)
        embeds, pos = _copy_rows(None, visual_embeds, kept_idx, position_ids, kept_idx)
        return embeds, pos, kept_idx, cu_kept


# ---------------------------------------------------------------------------------- lowering

_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def _name(dtype: torch.dtype) -> str:
    return _PTR[dtype][1:]


def _aligned(sig: dict[str, str], ints: tuple[str, ...] = ()) -> dict:
    """The hints a real launch infers: 16-byte aligned pointers (torch allocations) and the
    named integer arguments divisible by 16."""
    names = list(sig)
    return {
        (names.index(a),): [["tt.divisibility", 16]]
        for a in names
        if sig[a].startswith("*") or a in ints
    }


def _select_case(score: torch.dtype, cu: torch.dtype) -> LoweringCase:
    sig = {"scores_ptr": _PTR[score], "cu_v_ptr": _PTR[cu], "counts_ptr": "*i64",
           "kept_ptr": "*i64", "cu_kept_ptr": _PTR[cu], "BLOCK": "constexpr",
           "BLOCK_B": "constexpr"}  # fmt: skip
    return LoweringCase(
        f"select.select[{_name(score)},cu={_name(cu)}]", _select_kernel, sig,
        {"BLOCK": BLOCK_V, "BLOCK_B": BLOCK_B}, {"num_warps": SELECT_WARPS}, _aligned(sig),
    )  # fmt: skip


def _radix_pass_case(score: torch.dtype, cu: torch.dtype, p: int) -> LoweringCase:
    sig = {"scores_ptr": _PTR[score], "cu_v_ptr": _PTR[cu], "counts_ptr": "*i64",
           "hist_ptr": "*i32", "n_batch": "i32", "n_slices": "i32", "slice_len": "i32",
           "PASS": "constexpr", "BLOCK": "constexpr", "S_MAX": "constexpr"}  # fmt: skip
    return LoweringCase(
        f"select.radix_pass[{_name(score)},cu={_name(cu)},PASS={p}]", _radix_pass_kernel, sig,
        {"PASS": p, "BLOCK": BLOCK_V, "S_MAX": WIDE_SLICES}, {"num_warps": SELECT_WARPS},
        _aligned(sig, ("slice_len",)),
    )  # fmt: skip


def _wide_compact_case(score: torch.dtype, cu: torch.dtype) -> LoweringCase:
    sig = {"scores_ptr": _PTR[score], "cu_v_ptr": _PTR[cu], "counts_ptr": "*i64",
           "hist_ptr": "*i32", "kept_ptr": "*i64", "cu_kept_ptr": _PTR[cu], "n_batch": "i32",
           "n_slices": "i32", "slice_len": "i32", "BLOCK": "constexpr", "BLOCK_B": "constexpr",
           "S_MAX": "constexpr"}  # fmt: skip
    return LoweringCase(
        f"select.wide_compact[{_name(score)},cu={_name(cu)}]", _wide_compact_kernel, sig,
        {"BLOCK": BLOCK_V, "BLOCK_B": BLOCK_B, "S_MAX": WIDE_SLICES},
        {"num_warps": SELECT_WARPS}, _aligned(sig, ("slice_len",)),
    )  # fmt: skip


def _maps_case(cu: torch.dtype, vidx: torch.dtype) -> LoweringCase:
    sig = {"cu_ptr": _PTR[cu], "cu_v_ptr": _PTR[cu], "vidx_ptr": _PTR[vidx], "kept_ptr": "*i64",
           "src_ptr": "*i64", "row_src_ptr": "*i64", "cu_out_ptr": _PTR[cu], "n_batch": "i32",
           "n_rows": "i32", "n_kept": "i32", "steps_b": "i32", "steps_v": "i32",
           "steps_k": "i32", "BLOCK": "constexpr"}  # fmt: skip
    return LoweringCase(
        f"select.merge_maps[cu={_name(cu)},visual_idx={_name(vidx)}]", _merge_maps_kernel, sig,
        {"BLOCK": MAPS_BLOCK}, {"num_warps": MAPS_WARPS}, _aligned(sig),
    )  # fmt: skip


def _copy_case(
    emb: torch.dtype, pos: torch.dtype, has_text: bool, block_h: int, aligned_h: bool = True
) -> LoweringCase:
    """``aligned_h``: H and the row strides divisible by 16 (H = 3584, say), as a launch sees."""
    sig = {"out_ptr": _PTR[emb], "text_ptr": _PTR[emb], "vis_ptr": _PTR[emb],
           "row_src_ptr": "*i64", "n_rows": "i32", "hidden": "i32", "stride_out": "i32",
           "stride_text": "i32", "stride_vis": "i32", "pos_out_ptr": _PTR[pos],
           "pos_in_ptr": _PTR[pos], "pos_idx_ptr": "*i64", "n_pos_rows": "i32",
           "stride_pos_out": "i32", "stride_pos_in_r": "i32", "stride_pos_in_t": "i32",
           "BLOCK_R": "constexpr", "BLOCK_H": "constexpr", "HAS_TEXT": "constexpr"}  # fmt: skip
    kind = "merge" if has_text else "gather"
    return LoweringCase(
        f"select.copy_rows[{_name(emb)},pos={_name(pos)},{kind},BLOCK_H={block_h},"
        f"H%16={'0' if aligned_h else '?'}]",
        _copy_rows_kernel, sig,
        {"BLOCK_R": COPY_ROWS, "BLOCK_H": block_h, "HAS_TEXT": has_text},
        {"num_warps": COPY_WARPS},
        _aligned(sig, ("hidden", "stride_out", "stride_text", "stride_vis") if aligned_h else ()),
    )  # fmt: skip


LOWERING_CASES: list[LoweringCase] = [
    _select_case(torch.float32, torch.int32),
    _select_case(torch.float16, torch.int64),
    _select_case(torch.bfloat16, torch.int32),
    *(_radix_pass_case(torch.float32, torch.int64, p) for p in range(4)),
    _radix_pass_case(torch.bfloat16, torch.int32, 0),
    _radix_pass_case(torch.float16, torch.int32, 3),
    _wide_compact_case(torch.float32, torch.int32),
    _wide_compact_case(torch.bfloat16, torch.int64),
    _maps_case(torch.int32, torch.int64),
    _maps_case(torch.int64, torch.int32),
    _copy_case(torch.float16, torch.int64, True, COPY_MAX_H),
    _copy_case(torch.bfloat16, torch.int32, True, COPY_MAX_H),
    _copy_case(torch.float32, torch.int64, True, COPY_MAX_H),
    _copy_case(torch.float32, torch.int32, False, COPY_MAX_H),
    _copy_case(torch.bfloat16, torch.int64, False, 128, aligned_h=False),
]
