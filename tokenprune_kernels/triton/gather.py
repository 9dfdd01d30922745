"""Stage d in Triton: the gather of the kept rows, the merge that builds the pruned sequence,
and both fed straight by the selection (what the composites run when selection is on Triton).

Host functions (arguments already validated by the op layer, ``docs/contract.md`` d, e):

    :func:`gather_kept_triton`   kept_idx -> kept rows and their position ids
    :func:`merge_kept_triton`    kept_idx -> the pruned sequence (text + kept visual rows)
    :func:`select_gather_triton` scores -> kept rows (what prune_visual_tokens runs)
    :func:`select_merge_triton`  scores -> the pruned sequence (what prune_and_merge runs)

The selection itself is :mod:`tokenprune_kernels.triton.select`'s.

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

Launches and bytes moved (e embedding bytes, c / i / p bytes of a cu_seqlens / visual_idx /
position id entry, Tk kept tokens, To = Tl - Tv + Tk; B-sized terms left out; the select's own
are in :mod:`tokenprune_kernels.triton.select`):

    _merge_maps_kernel   write 16 To (src_idx, row_src); read per full-sequence row about
                         log2(B) c + log2(n_v) i + 8 log2(Tk) bytes in binary searches
                         (small arrays re-read by every row: expected to hit in cache)
    _copy_rows_kernel    read To (H e + R p + 16), write To (H e + R p)

    gather_kept   1 launch: _copy_rows_kernel
    merge_kept    2 launches: _merge_maps_kernel, _copy_rows_kernel
    select_merge  3 launches: select (1, wide 5), _merge_maps_kernel, _copy_rows_kernel
    select_gather 2 launches: select (1, wide 5), _copy_rows_kernel

The copy moves most of the bytes, 2 To H e, against about (P + 1) Tv s + 16 To for the rest.

Host syncs: output sizes come from shapes and keep counts, never from a kernel's result.
``gather_kept_triton`` and ``merge_kept_triton`` never sync (To = Tl - Tv + len(kept_idx)); the
fused functions, as ``select_topk_triton``: none given ``total_kept`` and device ``keep_counts``.
"""

from __future__ import annotations

from typing import Unpack

import torch
import triton
import triton.language as tl

from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.triton import select as sel
from tokenprune_kernels.triton.launch import launch
from tokenprune_kernels.validation import MergeArgs, flat_args

__all__ = ["gather_kept_triton", "merge_kept_triton", "select_gather_triton", "select_merge_triton"]

#: Full-sequence rows per program of the merge maps.
MAPS_BLOCK = 1024
MAPS_WARPS = 4
#: Output rows and (at most) hidden columns per program of the row copy.
COPY_ROWS = 4
COPY_MAX_H = 1024
COPY_WARPS = 4


# ------------------------------------------------------------------------------------- kernels


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


@triton.jit(do_not_specialize=["n_rows", "n_kept", "steps_v", "steps_k"])
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


@triton.jit(do_not_specialize=["n_rows", "stride_pos_out", "stride_pos_in_r"])
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
    out = sel._alloc((n, hidden), vis.dtype, vis.device)
    pos2d = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    pos_out = sel._alloc((pos2d.shape[0], n), pos2d.dtype, pos2d.device)
    if n > 0:
        block_h = min(triton.next_power_of_2(max(hidden, 1)), COPY_MAX_H)
        grid = (triton.cdiv(n, COPY_ROWS), max(triton.cdiv(hidden, block_h), 1))
        launch(
            _copy_rows_kernel, grid, out, text_t, vis, row_src, n, hidden,
            out.stride(0), text_t.stride(0), vis.stride(0),
            pos_out, pos2d, pos_idx, pos2d.shape[0],
            pos_out.stride(0), pos2d.stride(0), pos2d.stride(1),
            BLOCK_R=COPY_ROWS, BLOCK_H=block_h, HAS_TEXT=text is not None,
            num_warps=COPY_WARPS,
        )  # fmt: skip
    return out, (pos_out if position_ids.dim() == 2 else pos_out.squeeze(0))


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
    src_idx = sel._alloc((n_out,), torch.int64, device)
    row_src = sel._alloc((n_out,), torch.int64, device)
    cu_out = sel._alloc((batch + 1,), cu_seqlens.dtype, device)
    grid = (triton.cdiv(max(n_rows, batch + 1), MAPS_BLOCK),)
    launch(
        _merge_maps_kernel, grid,
        cu_seqlens, cu_seqlens_v, visual_idx, kept_idx, src_idx, row_src, cu_out,
        batch, n_rows, kept_idx.shape[0],
        batch.bit_length(), visual_idx.shape[0].bit_length(), kept_idx.shape[0].bit_length(),
        BLOCK=MAPS_BLOCK, num_warps=MAPS_WARPS,
    )  # fmt: skip
    return src_idx, row_src, cu_out


def gather_kept_triton(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept rows and their original position ids: arguments (shapes, dtypes, any strides) and
    results exactly as :func:`tokenprune_kernels.reference.gather_kept_ref`. One launch, no sync.
    """
    with stage_range("tokenprune.gather_kept", visual_embeds.device):
        (kept_idx,) = sel._flat(kept_idx)
        return _copy_rows(None, visual_embeds, kept_idx, position_ids, kept_idx)


@flat_args(MergeArgs)
def merge_kept_triton(
    a: MergeArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned sequence for a given selection: arguments (shapes, dtypes, any strides) and
    results exactly as :func:`tokenprune_kernels.reference.merge_kept_ref`, for validated
    arguments (``kept_idx`` strictly increasing). To = Tl - Tv + Tk rows. Two launches, no sync.
    """
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx = a
    with stage_range("tokenprune.merge_kept", inputs_embeds.device):
        cu_seqlens, cu_seqlens_v, visual_idx, kept_idx = sel._flat(
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
    **options: Unpack[sel.SelectOptions],
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
        options: ``block_v``, ``wide``, as :func:`select_topk_triton`.

    Returns:
        (embeds [To, H], position_ids [To] or [R, To], cu_seqlens_out [B+1], src_idx [To] int64,
        kept_idx [Tk] int64), equal to ``merge_kept_ref(..., select_topk_ref(...)[0])``.
        Syncs: none with ``total_kept`` and device ``keep_counts``, else one.
    """
    with stage_range("tokenprune.select_merge", scores.device):
        kept_idx, _, cu_seqlens_v = sel._select_flat(
            scores, cu_seqlens_v, keep_counts, total_kept, **options
        )
        merged = merge_kept_triton(
            inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v,
            kept_idx,
        )  # fmt: skip
        return (*merged, kept_idx)


def select_gather_triton(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_counts: torch.Tensor,
    visual_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    total_kept: int | None = None,
    **options: Unpack[sel.SelectOptions],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select then gather (what prune_visual_tokens runs); 2 launches (6 wide).

    Args:
        scores: [Tv] float32/float16/bfloat16; cu_seqlens_v: [B+1]; keep_counts: [B] int64.
        visual_embeds: [Tv, H] float32/float16/bfloat16; position_ids: [Tv] or [R, Tv] int.
        total_kept: sum(keep_counts) when the caller knows it (saves the one host sync).
        options: ``block_v``, ``wide``, as :func:`select_topk_triton`.

    Returns:
        (kept_embeds [Tk, H], kept_position_ids [Tk] or [R, Tk], kept_idx [Tk] int64,
        cu_seqlens_kept [B+1] dtype of ``cu_seqlens_v``).
    """
    with stage_range("tokenprune.select_gather", scores.device):
        kept_idx, cu_kept, _ = sel._select_flat(
            scores, cu_seqlens_v, keep_counts, total_kept, **options
        )
        return (*gather_kept_triton(visual_embeds, position_ids, kept_idx), kept_idx, cu_kept)
