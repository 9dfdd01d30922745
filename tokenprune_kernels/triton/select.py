"""Stages c and d in Triton: threshold top-k, then order-preserving compaction and row copies.

Host functions (arguments already validated by the op layer, ``docs/contract.md`` c, d, merge):

    :func:`select_topk_triton`   scores -> kept_idx, cu_seqlens_kept
    :func:`gather_kept_triton`   kept_idx -> kept rows and their position ids
    :func:`merge_kept_triton`    kept_idx -> the pruned sequence (text + kept visual rows)
    :func:`select_merge_triton`  scores -> the pruned sequence (fused: what prune_and_merge runs)
    :func:`select_gather_triton` scores -> kept rows (fused: what prune_visual_tokens runs)

Selection (``_select_kernel``, one program per sample, looping over the sample in chunks of
``BLOCK_V`` keys). A score becomes float32 (exact) and then an order-preserving uint32 key (NaN
-> 0, -0.0 and +0.0 share a key, ``key = ~bits`` for negative floats else ``bits | 0x80000000``).
The k-th largest key T is found by a radix select on 8-bit digits from the top: each pass histograms
(``tl.histogram``, 256 bins) the keys that match the digits chosen so far, and picks the bin that
holds the k-th key. It stops after 4 passes, or earlier when that bin is kept whole (then T is only
known to its prefix, and every key with that prefix is kept); ``k == n`` costs no pass at all. A
last pass in index order keeps every key above T and the first ``k - count(> T)`` keys equal to T
(ties to the lower index, as the contract says); ``tl.cumsum`` plus a running offset gives each
kept token its output slot, so ``kept_idx`` comes out ascending. Keys are uint32 in the kernel
(logical shifts, unsigned compares).

Merge (``select_merge`` and ``merge_kept``). The same program also builds, for its sample, a
per-row flag in a scratch ``[Tl]`` int32 (0 text, ``v + 1`` kept visual row v, -1 dropped) and,
after a CTA barrier, scans it in sequence order: each kept row's output slot is an exclusive
prefix sum, and the program writes ``src_idx`` (full-sequence row) and ``row_src`` (>= 0: a row of
``inputs_embeds``, < 0: row ``-row_src - 1`` of ``visual_embeds``) for every output row. The
``[To, H]`` embeddings then move in ONE wide launch (``_copy_rows_kernel``, output rows x
H-blocks) that reads each kept row once, text and visual alike, and copies the position ids
(``[R, T]``) alongside. Sample offsets are computed in the programs (``cu_seqlens_kept`` from a
sum of ``keep_counts[:b]``, ``cu_seqlens_out[b] = cu_seqlens[b] - cu_seqlens_v[b] +
cu_seqlens_kept[b]``), so no host-side cumsum runs.

Launches and bytes (s score bytes, e embedding bytes, c / i / p bytes of a cu_seqlens /
visual_idx / position id entry, P <= 4 radix passes actually run, Tk = sum k, To = Tl - Tv + Tk;
B-sized terms left out):

    select_topk   1 launch  (_select_kernel):  (P + 1) Tv s  read  +  8 Tk  written
    gather_kept   1 launch  (_copy_rows_kernel): Tk (8 + H e + R p) read + Tk (H e + R p) written
    merge_kept    2 launches:
                  _merge_kernel:      Tv (i + 4) + 8 Tk + 8 Tl read (flags re-read, 2 lower-bound
                                      searches per sample), 4 Tl + 4 Tv + 16 To written
                  _copy_rows_kernel:  To (16 + H e + R p) read, To (H e + R p) written
    select_merge  2 launches:
                  _select_kernel:     (P + 1) Tv s + Tv i + 4 Tl read, 8 Tk + 4 Tl + 4 Tv + 16 To
                                      written
                  _copy_rows_kernel:  To (16 + H e + R p) read, To (H e + R p) written
    select_gather 2 launches: _select_kernel (as select_topk) + _copy_rows_kernel (as gather_kept)

The copy launches dominate: 2 To H e bytes, against about (P + 1) Tv s + 30 Tl for the select.

Host syncs: output sizes come from shapes and keep_counts. ``merge_kept_triton`` and
``gather_kept_triton`` never sync (To = Tl - Tv + len(kept_idx)). The select functions need
sum(keep_counts): none when the caller passes ``total_kept`` or ``keep_counts`` lives on the CPU,
else exactly one device -> host sync (``keep_counts.sum()``).

Large samples: one program per sample makes a single large sample (B = 1, N_v = 64k) run its
select passes serially on one SM; the row copy, which moves most of the bytes, is fully parallel.
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

#: Keys per chunk of the select program (one program per sample loops over its chunks).
BLOCK_V = 2048
#: Rows per chunk of the merge scan over a sample's full sequence.
BLOCK_L = 2048
#: keep_counts entries summed per step when a program computes its output offset.
BLOCK_B = 1024
SELECT_WARPS = 8
#: Output rows and hidden columns per program of the row copy.
COPY_ROWS = 4
COPY_MAX_H = 1024
COPY_WARPS = 4
_RADIX_BINS = 256


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
def _find_threshold(scores_ptr, start, n, k, BLOCK: tl.constexpr):
    """Radix select of the k-th largest key of ``scores[start : start + n]``.

    Returns ``(prefix, kmask, remaining)``: keys with ``key & kmask > prefix`` are all kept, and
    the first ``remaining`` keys with ``key & kmask == prefix`` (by index) complete the top k.
    """
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)
    kmask = tl.full([], 0, tl.uint32)
    remaining = k
    # k == n keeps everything (kmask 0: every key ties), k == 0 keeps nothing: no pass needed.
    todo = ((k < n) & (k > 0)).to(tl.int32)
    for p in tl.static_range(4):
        shift = 24 - 8 * p  # a constexpr: digits from the top byte down
        if todo != 0:
            hist = tl.zeros([256], tl.int32)
            for c in range(0, n, BLOCK):
                idx = c + offs
                valid = idx < n
                x = tl.load(scores_ptr + start + idx, mask=valid, other=0.0)
                key = _score_keys(x)
                match = valid & ((key & kmask) == prefix)
                digit = tl.where(match, (key >> shift) & 0xFF, 0).to(tl.int32)
                h = tl.histogram(digit, 256)
                # Lanes that do not match were counted in bin 0: take them out again.
                miss = BLOCK - tl.sum(match.to(tl.int32), axis=0)
                hist += tl.where(bins == 0, h - miss, h)
            total = tl.sum(hist, axis=0)
            suffix = total - tl.cumsum(hist, axis=0) + hist  # keys in bins >= d
            d = tl.max(tl.where(suffix >= remaining, bins, -1), axis=0)
            above = tl.sum(tl.where(bins > d, hist, 0), axis=0)
            in_bin = tl.sum(tl.where(bins == d, hist, 0), axis=0)
            remaining = remaining - above
            prefix = prefix | (d.to(tl.uint32) << shift)
            kmask = kmask | (0xFF << shift)
            todo = (in_bin != remaining).to(tl.int32)
    return prefix, kmask, remaining


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
def _fill_text_flags(flags_ptr, row0, n_l, BLOCK: tl.constexpr):
    """flags[row0 : row0 + n_l] = 0 (every row text until the visual rows are marked)."""
    offs = tl.arange(0, BLOCK)
    for c in range(0, n_l, BLOCK):
        j = c + offs
        tl.store(flags_ptr + row0 + j, tl.zeros([BLOCK], tl.int32), mask=j < n_l)


@triton.jit
def _merge_scan(flags_ptr, row0, n_l, out0, src_ptr, row_src_ptr, BLOCK: tl.constexpr):
    """Compact the sample's rows with flags >= 0 into output rows out0, out0 + 1, ... in order.

    Writes src_idx (the full-sequence row) and row_src (>= 0 text row, < 0 visual row -v - 1).
    """
    offs = tl.arange(0, BLOCK)
    written = tl.zeros([], tl.int64)
    for c in range(0, n_l, BLOCK):
        j = c + offs
        valid = j < n_l
        f = tl.load(flags_ptr + row0 + j, mask=valid, other=-1)
        keep = valid & (f >= 0)
        ki = keep.to(tl.int32)
        slot = out0 + written + (tl.cumsum(ki, axis=0) - ki).to(tl.int64)
        row = row0 + j.to(tl.int64)
        tl.store(src_ptr + slot, row, mask=keep)
        tl.store(row_src_ptr + slot, tl.where(f > 0, -f.to(tl.int64), row), mask=keep)
        written += tl.sum(ki, axis=0).to(tl.int64)


@triton.jit
def _select_kernel(
    scores_ptr,
    cu_v_ptr,
    counts_ptr,
    kept_ptr,
    cu_kept_ptr,
    cu_ptr,
    vidx_ptr,
    flags_ptr,
    src_ptr,
    row_src_ptr,
    cu_out_ptr,
    BLOCK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_B: tl.constexpr,
    FUSE_MERGE: tl.constexpr,
):
    """Program b: top-k of sample b -> kept_idx[cu_kept[b]:cu_kept[b+1]] (+ the merge maps)."""
    b = tl.program_id(0)
    start = tl.load(cu_v_ptr + b).to(tl.int64)
    n = (tl.load(cu_v_ptr + b + 1).to(tl.int64) - start).to(tl.int32)
    k = tl.load(counts_ptr + b).to(tl.int32)
    kept0 = _sum_before(counts_ptr, b, BLOCK_B)
    tl.store(cu_kept_ptr + b + 1, kept0 + k)
    if b == 0:
        tl.store(cu_kept_ptr, kept0 * 0)
    if FUSE_MERGE:
        row0 = tl.load(cu_ptr + b).to(tl.int64)
        n_l = (tl.load(cu_ptr + b + 1).to(tl.int64) - row0).to(tl.int32)
        out0 = row0 - start + kept0
        tl.store(cu_out_ptr + b + 1, out0 + n_l - n + k)
        if b == 0:
            tl.store(cu_out_ptr, kept0 * 0)
        _fill_text_flags(flags_ptr, row0, n_l, BLOCK_L)
        tl.debug_barrier()

    prefix, kmask, remaining = _find_threshold(scores_ptr, start, n, k, BLOCK)

    offs = tl.arange(0, BLOCK)
    written = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for c in range(0, n, BLOCK):
        idx = c + offs
        valid = idx < n
        key = _score_keys(tl.load(scores_ptr + start + idx, mask=valid, other=0.0))
        top = key & kmask
        eq = valid & (top == prefix)
        eq_i = eq.to(tl.int32)
        tie_rank = ties + tl.cumsum(eq_i, axis=0) - eq_i
        keep = (valid & (top > prefix)) | (eq & (tie_rank < remaining))
        keep_i = keep.to(tl.int32)
        slot = kept0 + (written + tl.cumsum(keep_i, axis=0) - keep_i).to(tl.int64)
        gidx = start + idx.to(tl.int64)
        tl.store(kept_ptr + slot, gidx, mask=keep)
        if FUSE_MERGE:
            vpos = tl.load(vidx_ptr + gidx, mask=valid, other=0).to(tl.int64)
            flag = tl.where(keep, gidx + 1, -1)
            tl.store(flags_ptr + row0 + vpos, flag, mask=valid)
        written += tl.sum(keep_i, axis=0)
        ties += tl.sum(eq_i, axis=0)

    if FUSE_MERGE:
        tl.debug_barrier()
        _merge_scan(flags_ptr, row0, n_l, out0, src_ptr, row_src_ptr, BLOCK_L)


@triton.jit
def _lower_bound(sorted_ptr, size, target):
    """First i in [0, size) with sorted[i] >= target (size if none); a scalar binary search."""
    lo = tl.zeros([], tl.int64)
    hi = tl.zeros([], tl.int64) + size  # size may arrive as a constexpr (Triton specialises 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(sorted_ptr + mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def _merge_kernel(
    cu_ptr,
    cu_v_ptr,
    vidx_ptr,
    kept_ptr,
    n_kept,
    flags_ptr,
    src_ptr,
    row_src_ptr,
    cu_out_ptr,
    BLOCK: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program b: the merge maps of sample b for a given ascending ``kept_idx``."""
    b = tl.program_id(0)
    start = tl.load(cu_v_ptr + b).to(tl.int64)
    end = tl.load(cu_v_ptr + b + 1).to(tl.int64)
    n = (end - start).to(tl.int32)
    row0 = tl.load(cu_ptr + b).to(tl.int64)
    row1 = tl.load(cu_ptr + b + 1).to(tl.int64)
    n_l = (row1 - row0).to(tl.int32)
    k0 = _lower_bound(kept_ptr, n_kept, start)
    k1 = _lower_bound(kept_ptr, n_kept, end)
    out0 = row0 - start + k0
    tl.store(cu_out_ptr + b + 1, row1 - end + k1)
    if b == 0:
        tl.store(cu_out_ptr, out0 * 0)

    _fill_text_flags(flags_ptr, row0, n_l, BLOCK_L)
    tl.debug_barrier()
    offs = tl.arange(0, BLOCK)
    for c in range(0, n, BLOCK):  # every visual row: dropped until marked kept
        idx = c + offs
        valid = idx < n
        vpos = tl.load(vidx_ptr + start + idx, mask=valid, other=0).to(tl.int64)
        tl.store(flags_ptr + row0 + vpos, tl.full([BLOCK], -1, tl.int32), mask=valid)
    tl.debug_barrier()
    nk = (k1 - k0).to(tl.int32)
    for c in range(0, nk, BLOCK):  # the kept ones
        idx = c + offs
        valid = idx < nk
        g = tl.load(kept_ptr + k0 + idx, mask=valid, other=0)
        vpos = tl.load(vidx_ptr + g, mask=valid, other=0).to(tl.int64)
        tl.store(flags_ptr + row0 + vpos, (g + 1).to(tl.int32), mask=valid)
    tl.debug_barrier()
    _merge_scan(flags_ptr, row0, n_l, out0, src_ptr, row_src_ptr, BLOCK_L)


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


def _launch_select(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    merge: tuple[torch.Tensor, ...] | None,
    block_v: int,
    block_l: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = scores.device
    batch = cu_seqlens_v.shape[0] - 1
    kept_idx = _alloc((total_kept,), torch.int64, device)
    cu_kept = _alloc((batch + 1,), cu_seqlens_v.dtype, device)
    counts = keep_counts.to(device=device, dtype=torch.int64)
    if batch == 0:
        cu_kept.zero_()
        return kept_idx, cu_kept
    fuse = merge is not None
    if merge is None:  # unused pointer arguments
        merge = (cu_seqlens_v, cu_seqlens_v, kept_idx, kept_idx, kept_idx, cu_kept)
    _select_kernel[(batch,)](
        scores, cu_seqlens_v, counts, kept_idx, cu_kept, *merge,
        BLOCK=block_v, BLOCK_L=block_l, BLOCK_B=BLOCK_B, FUSE_MERGE=fuse,
        num_warps=SELECT_WARPS,
    )  # fmt: skip
    return kept_idx, cu_kept


def select_topk_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    *,
    total_kept: int | None = None,
    block_v: int = BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k by (score desc, index asc), NaN lowest; one launch.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_counts: [B] int64, 0 <= k_b <= n_b (CPU or the device of ``scores``).
        total_kept: sum(keep_counts) if the caller knows it (saves the one host sync).
        block_v: keys per chunk of the select program (a power of two; tests shrink it).

    Returns:
        kept_idx: [sum k] int64 global indices, ascending; cu_seqlens_kept: [B+1], dtype of
        ``cu_seqlens_v``. Syncs: none with ``total_kept`` or CPU ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_topk", scores.device):
        total = _total_kept(keep_counts, total_kept)
        return _launch_select(scores, cu_seqlens_v, keep_counts, total, None, block_v, BLOCK_L)


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
        return _copy_rows(None, visual_embeds, kept_idx, position_ids, kept_idx)


def _merge_buffers(
    inputs_embeds: torch.Tensor, cu_seqlens: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, ...]:
    device = inputs_embeds.device
    flags = _alloc((inputs_embeds.shape[0],), torch.int32, device)
    src_idx = _alloc((n_out,), torch.int64, device)
    row_src = _alloc((n_out,), torch.int64, device)
    cu_out = _alloc((cu_seqlens.shape[0],), cu_seqlens.dtype, device)
    return flags, src_idx, row_src, cu_out


def merge_kept_triton(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor,
    *,
    block_v: int = BLOCK_V,
    block_l: int = BLOCK_L,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned sequence for a given selection, exactly as ``merge_kept_ref``; two launches.

    Args:
        inputs_embeds: [Tl, H] float32/float16/bfloat16 (rows at visual positions ignored).
        position_ids: [Tl] or [R, Tl] int32/int64.
        cu_seqlens: [B+1] int32/int64 offsets of the full sequences.
        visual_embeds: [Tv, H], dtype of ``inputs_embeds``.
        visual_idx: [Tv] int32/int64 local positions, strictly increasing within a sample.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        kept_idx: [Tk] int64 global visual indices, strictly increasing.
        block_v, block_l: chunk sizes of the merge program (powers of two; tests shrink them).

    Returns:
        embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1] (dtype of
        ``cu_seqlens``), src_idx [To] int64; To = Tl - Tv + Tk. No host sync.
    """
    with stage_range("tokenprune.merge_kept", inputs_embeds.device):
        n_out = inputs_embeds.shape[0] - visual_embeds.shape[0] + kept_idx.shape[0]
        flags, src_idx, row_src, cu_out = _merge_buffers(inputs_embeds, cu_seqlens, n_out)
        batch = cu_seqlens.shape[0] - 1
        if batch == 0:
            cu_out.zero_()
        else:
            _merge_kernel[(batch,)](
                cu_seqlens, cu_seqlens_v, visual_idx, kept_idx, kept_idx.shape[0],
                flags, src_idx, row_src, cu_out,
                BLOCK=block_v, BLOCK_L=block_l, num_warps=SELECT_WARPS,
            )  # fmt: skip
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
    block_l: int = BLOCK_L,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused select + merge: threshold top-k, then one compaction straight into the pruned sequence.

    Two launches: the select program (which also writes the merge maps) and one row copy.

    Args:
        scores: [Tv] float32/float16/bfloat16.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        keep_counts: [B] int64, 0 <= k_b <= n_b.
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx: as
            :func:`merge_kept_triton`.
        total_kept: sum(keep_counts) if the caller knows it (saves the one host sync).
        block_v, block_l: chunk sizes of the select program (powers of two; tests shrink them).

    Returns:
        (embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1], src_idx [To] int64,
        kept_idx [Tk] int64), equal to ``merge_kept_ref(..., select_topk_ref(...)[0])``.
        Syncs: none with ``total_kept`` or CPU ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_merge", scores.device):
        total = _total_kept(keep_counts, total_kept)
        n_out = inputs_embeds.shape[0] - visual_embeds.shape[0] + total
        flags, src_idx, row_src, cu_out = _merge_buffers(inputs_embeds, cu_seqlens, n_out)
        merge = (cu_seqlens, visual_idx, flags, src_idx, row_src, cu_out)
        kept_idx, _ = _launch_select(
            scores, cu_seqlens_v, keep_counts, total, merge, block_v, block_l
        )
        if cu_seqlens.shape[0] == 1:
            cu_out.zero_()
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select then gather (what prune_visual_tokens runs); two launches.

    Args:
        scores: [Tv] float32/float16/bfloat16; cu_seqlens_v: [B+1]; keep_counts: [B] int64.
        visual_embeds: [Tv, H] float32/float16/bfloat16; position_ids: [Tv] or [R, Tv] int.
        total_kept: sum(keep_counts) if the caller knows it (saves the one host sync).
        block_v: keys per chunk of the select program.

    Returns:
        (kept_embeds [Tk, H], kept_position_ids [Tk] or [R, Tk], kept_idx [Tk] int64,
        cu_seqlens_kept [B+1] dtype of ``cu_seqlens_v``).
    """
    with stage_range("tokenprune.select_gather", scores.device):
        total = _total_kept(keep_counts, total_kept)
        kept_idx, cu_kept = _launch_select(
            scores, cu_seqlens_v, keep_counts, total, None, block_v, BLOCK_L
        )
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


def _select_case(score: torch.dtype, cu: torch.dtype, vidx: torch.dtype, merge: bool):
    sig = {
        "scores_ptr": _PTR[score], "cu_v_ptr": _PTR[cu], "counts_ptr": "*i64",
        "kept_ptr": "*i64", "cu_kept_ptr": _PTR[cu], "cu_ptr": _PTR[cu], "vidx_ptr": _PTR[vidx],
        "flags_ptr": "*i32", "src_ptr": "*i64", "row_src_ptr": "*i64", "cu_out_ptr": _PTR[cu],
        "BLOCK": "constexpr", "BLOCK_L": "constexpr", "BLOCK_B": "constexpr",
        "FUSE_MERGE": "constexpr",
    }  # fmt: skip
    name = f"select.select[{_PTR[score][1:]},cu={_PTR[cu][1:]},merge={int(merge)}]"
    return LoweringCase(
        name, _select_kernel, sig,
        {"BLOCK": BLOCK_V, "BLOCK_L": BLOCK_L, "BLOCK_B": BLOCK_B, "FUSE_MERGE": merge},
        {"num_warps": SELECT_WARPS},
    )  # fmt: skip


def _merge_case(cu: torch.dtype, vidx: torch.dtype):
    sig = {
        "cu_ptr": _PTR[cu], "cu_v_ptr": _PTR[cu], "vidx_ptr": _PTR[vidx], "kept_ptr": "*i64",
        "n_kept": "i32", "flags_ptr": "*i32", "src_ptr": "*i64", "row_src_ptr": "*i64",
        "cu_out_ptr": _PTR[cu], "BLOCK": "constexpr", "BLOCK_L": "constexpr",
    }  # fmt: skip
    return LoweringCase(
        f"select.merge[cu={_PTR[cu][1:]},visual_idx={_PTR[vidx][1:]}]", _merge_kernel, sig,
        {"BLOCK": BLOCK_V, "BLOCK_L": BLOCK_L}, {"num_warps": SELECT_WARPS},
    )  # fmt: skip


def _copy_case(emb: torch.dtype, pos: torch.dtype, has_text: bool, block_h: int):
    sig = {
        "out_ptr": _PTR[emb], "text_ptr": _PTR[emb], "vis_ptr": _PTR[emb], "row_src_ptr": "*i64",
        "n_rows": "i32", "hidden": "i32", "stride_out": "i32", "stride_text": "i32",
        "stride_vis": "i32", "pos_out_ptr": _PTR[pos], "pos_in_ptr": _PTR[pos],
        "pos_idx_ptr": "*i64", "n_pos_rows": "i32", "stride_pos_out": "i32",
        "stride_pos_in_r": "i32", "stride_pos_in_t": "i32",
        "BLOCK_R": "constexpr", "BLOCK_H": "constexpr", "HAS_TEXT": "constexpr",
    }  # fmt: skip
    kind = "merge" if has_text else "gather"
    return LoweringCase(
        f"select.copy_rows[{_PTR[emb][1:]},pos={_PTR[pos][1:]},{kind},BLOCK_H={block_h}]",
        _copy_rows_kernel, sig,
        {"BLOCK_R": COPY_ROWS, "BLOCK_H": block_h, "HAS_TEXT": has_text},
        {"num_warps": COPY_WARPS},
    )  # fmt: skip


LOWERING_CASES: list[LoweringCase] = [
    _select_case(torch.float32, torch.int32, torch.int64, False),
    _select_case(torch.float16, torch.int64, torch.int64, False),
    _select_case(torch.bfloat16, torch.int32, torch.int32, False),
    _select_case(torch.float32, torch.int64, torch.int64, True),
    _select_case(torch.bfloat16, torch.int32, torch.int32, True),
    _merge_case(torch.int32, torch.int64),
    _merge_case(torch.int64, torch.int32),
    _copy_case(torch.float16, torch.int64, True, COPY_MAX_H),
    _copy_case(torch.bfloat16, torch.int32, True, COPY_MAX_H),
    _copy_case(torch.float32, torch.int64, False, COPY_MAX_H),
    _copy_case(torch.bfloat16, torch.int64, False, 128),
]
