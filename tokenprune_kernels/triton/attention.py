"""Stage a in Triton: layer-0 instruction-to-visual attention without the ``[Hq, Tq, Tk]`` matrix.

:func:`instruction_attention_triton` computes, for every visual token ``v`` of sample ``b``,
``mean over heads h and queries i of softmax_j(scale * q_ih . k_jh)`` at ``j = visual_idx[v]``,
the softmax running over all keys ``j <= q_pos[i]`` (``docs/contract.md``, stage a). Two launches:

**Pass 1, row statistics** (``_row_stats_kernel``, grid ``(row tiles, Hk, S)``). The rows of one
sample and one KV head are its ``n_q * G`` (query, head-of-the-group) pairs, ``G = Hq // Hk``,
packed query-major (row ``r`` is query ``r // G``, head ``kv_head * G + r % G``): all heads that
read the same key head share one K stream (GQA packing). A program takes ``BLOCK_M`` such rows and
one of ``S`` contiguous key splits of the keys ``0..max q_pos`` and streams them ``BLOCK_N`` at a
time with an online softmax in the log2 domain (``qk_scale = softmax_scale * log2(e)`` folded into
the fp32 logits, ``exp2``). Blocks that every row of the tile sees run without the causal mask; the
rest are masked (``key <= q_pos`` and inside the split). It writes the partial row max ``m`` and
normaliser ``l`` of its split to fp32 scratch ``[S, Tq * Hq]`` (split-major). The split gives the
launch enough programs when there are few rows (one prompt: 32 queries x 28 heads are 4 row tiles
per KV head).

**Merge** (``_merge_stats_kernel``, only when ``S > 1``). Each row's ``S`` partial statistics are
merged ONCE, in place into split 0: ``m = max_s m_s``, ``l = sum_s l_s * 2^(m_s - m)``.

**Pass 2, visual column sums** (``_visual_colsum_kernel``, grid ``(visual tiles,)``). A program
owns ``BLOCK_V`` visual tokens of one sample. For each KV head it loads their keys once (gathered
through ``visual_idx``), then loops over the sample's row tiles: loads each row's merged ``m`` and
``l``, recomputes the logits with ``tl.dot`` and adds ``2^(s - m) / l`` over the rows that see the
key (``visual_idx <= q_pos``) and are real rows. After the last head it divides by ``n_q * Hq``
and writes its ``[BLOCK_V]`` slice of the output: every output element is written by one program
in a fixed order, no atomics, so the result is deterministic (bitwise the same run to run).
With ``num_channels = C > 1`` (:func:`instruction_attention_heads_triton`, the same launches) it
keeps ``C`` sums apart, one per group of ``Hq / C`` consecutive query heads, reading the same
merged statistics; a group visits only the KV heads its query heads read, divides by
``n_q * Hq / C`` and writes its column of the ``[Tv, C]`` output.

**Varlen without a block table.** Sample ``b`` owns ``cdiv(n_q[b] * G, BLOCK_M)`` row tiles (0 when
it has no visual tokens) and ``cdiv(n_v[b], BLOCK_V)`` visual tiles. The grids are flat over tiles
and sized from tensor shapes only: ``min(R, (R + B * (BLOCK - 1)) // BLOCK)`` tiles for ``R`` rows
(``Tq * G``) or visual tokens (``Tv``), an upper bound of the true count. Each program finds its
sample by a loop over the ``B + 1`` offsets in ``cu_seqlens`` (``B`` scalar loads) and exits early
when its tile index is past the last tile. Hence **no host-device sync** at all (the op layer has
already synced once to validate; this function adds none) and nothing to build on the host.

**Launches: 3** (2 when ``S = 1``; plus two ``torch.empty`` allocations for the statistics and
one for the output; no other kernel). A one-launch design would need either each visual tile to
recompute the row statistics over all keys (a ``Tv / BLOCK_V``-fold repeat of pass 1) or a
grid-wide barrier, which Triton cannot guarantee. The merge is its own small launch so that pass 2
reads one ``(m, l)`` pair per row instead of every split's, for every visual tile.

**Bytes each pass must move** (``e`` = bytes per q/k element (4, 2, 2), ``i`` = bytes per index,
``S`` = splits, ``R1 = cdiv(n_q * G, BLOCK_M)`` row tiles per sample and KV head, ``Vt =
cdiv(n_v, BLOCK_V)`` visual tiles per sample; cu_seqlens reads, ``3 * (B + 1) * i`` per program, are
left out)::

    pass 1: reads  q      Tq * Hq * D * e
                   k      Tk * Hk * D * e        (issued R1 times: each row tile streams the
                                                  sample's keys; the repeats are L2 hits)
                   q_pos  Tq * i                 (when given)
            writes m, l   2 * 4 * Tq * Hq * S
    merge:  reads  m, l   2 * 4 * Tq * Hq * S    (S > 1 only)
            writes m, l   2 * 4 * Tq * Hq
    pass 2: reads  k      Tv * Hk * D * e        (visual rows only, gathered, one D*e run each)
                   idx    Tv * i
                   q      Tq * Hq * D * e        (issued Vt times per sample: L2 hits)
                   m, l   2 * 4 * Tq * Hq        (issued Vt times per sample: L2 hits)
            writes out    4 * Tv
    DRAM minimum, all passes:
        e * D * (2 * Tq * Hq + Tk * Hk + Tv * Hk) + 8 * Tq * Hq * (2 S + 2) + Tv * (i + 4)
        (+ Tq * i)

FLOPs: ``2 * D * Hq * sum_b n_q[b] * n_k[b]`` (pass 1) plus ``2 * D * Hq * sum_b n_q[b] * n_v[b]``
(pass 2, the logits of the visual columns are recomputed rather than stored).

**Precision.** ``tl.dot`` takes the operands as given (fp16/bf16 on the tensor cores, fp32
accumulate). For float32 inputs it runs with ``input_precision="ieee"`` (exact fp32 products, no
TF32); the tests hold it to a float64 reference at ``atol 1e-6, rtol 1e-4``. Softmax
statistics, ``exp2`` and all sums are fp32. Under the interpreter (CPU tensors) bf16 tiles are
cast to fp32 before ``tl.dot`` (``DOT_F32``): it stores bf16 as uint16 and would multiply the
bits as integers. The GPU path never sets it.

**Launch configuration** (:func:`_launch_config`, also what :mod:`.lowering` lowers): fixed per
dtype, no autotuning (nothing to tune under the interpreter, and no first-call tuning cost).
fp16/bf16: ``BLOCK_M = 64``, ``BLOCK_N = 64``, ``BLOCK_V = 64``, 4 warps, 3 stages (pass 1) / 2
stages (pass 2). fp32: ``BLOCK_M = 32``, ``BLOCK_N = 16``, ``BLOCK_V = 32``, 8 warps, 2 stages
(the "ieee" dot of pass 1 runs on FMAs and keeps its operand tiles in registers: ``BLOCK_M = 64``
or ``BLOCK_N = 32`` spill there). ``BLOCK_D = max(16, next_pow2(D))``, masked when ``D`` is not a
power of two. ``S = clamp(cdiv(2 * SMs, row tiles * Hk), 1, min(16, Tk // 256))``: about two
waves of programs, at least 256 keys per split. ``BLOCK_V`` is halved (down to 16) while pass 2
would have fewer programs than half the SMs. Every kernel lowers without register spills for
every dtype at D=128, as the launches specialise it (``python -m
tokenprune_kernels.triton.lowering``, checked in CI). These values were chosen for H100 and
checked only by compiling: no timing was taken (no GPU in the sessions that wrote this module).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.triton.launch import gpu_target, launch, sm_count
from tokenprune_kernels.validation import ScoringArgs, flat_args

__all__ = ["instruction_attention_triton"]

_LOG2E = 1.4426950408889634
#: Upper bound on the number of key splits of pass 1.
MAX_SPLITS = 16
#: A split covers at least this many keys (fewer splits for short sequences).
MIN_KEYS_PER_SPLIT = 256
#: Rows per program and warps of the statistics merge between the passes.
MERGE_BLOCK = 1024
MERGE_WARPS = 4


@triton.jit
def _locate_tile(
    cu_rows_ptr, cu_v_ptr, n_batch, tile, ROWS_PER_ITEM: tl.constexpr, BLOCK: tl.constexpr
):
    """The sample of flat tile ``tile``: sample ``b`` owns
    ``cdiv(n_rows[b] * ROWS_PER_ITEM, BLOCK)`` tiles when it has visual tokens, else none.
    Returns (sample, tile within the sample, total tiles); ``tile >= total``: nothing to do."""
    sample = 0
    first = 0
    total = 0
    for b in range(0, n_batch):
        r0 = tl.load(cu_rows_ptr + b).to(tl.int32)
        r1 = tl.load(cu_rows_ptr + b + 1).to(tl.int32)
        v0 = tl.load(cu_v_ptr + b).to(tl.int32)
        v1 = tl.load(cu_v_ptr + b + 1).to(tl.int32)
        n_tiles = tl.where(v1 > v0, ((r1 - r0) * ROWS_PER_ITEM + BLOCK - 1) // BLOCK, 0)
        hit = (tile >= total) & (tile < total + n_tiles)
        sample = tl.where(hit, b, sample)
        first = tl.where(hit, total, first)
        total += n_tiles
    return sample, tile - first, total


@triton.jit
def _segment(cu_ptr, b):
    """(start, length) of sample ``b`` in packed offsets ``cu_ptr``, as int32."""
    start = tl.load(cu_ptr + b).to(tl.int32)
    return start, tl.load(cu_ptr + b + 1).to(tl.int32) - start


@triton.jit
def _load_q_tile(
    q_ptr,
    q_pos_ptr,
    rows,
    row_ok,
    kv_head,
    q_start,
    n_q,
    n_k,
    strides,
    offs_d,
    d_ok,
    GROUP: tl.constexpr,
    HAS_Q_POS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """The q tile of packed rows ``rows`` of KV head ``kv_head`` in a sample whose queries start
    at ``q_start``: row ``r`` is query ``r // GROUP``, head ``kv_head * GROUP + r % GROUP``;
    ``strides``: (q token, q head, k token, k head) element strides.

    Returns (q [BLOCK_M, BLOCK_D], zero outside ``row_ok`` and ``d_ok``; qpos, each row's last
    visible key; token, its packed query index; head, its query head), shared by both passes.
    """
    stride_qt, stride_qh = strides[0], strides[1]
    qi = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    token = q_start + qi
    if HAS_Q_POS:
        qpos = tl.load(q_pos_ptr + token, mask=row_ok, other=0).to(tl.int32)
    else:
        qpos = n_k - n_q + qi
    q = tl.load(
        q_ptr
        + token.to(tl.int64)[:, None] * stride_qt
        + head[:, None] * stride_qh
        + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    return q, qpos, token, head


@triton.jit(do_not_specialize=["num_splits", "n_stats"])
def _row_stats_kernel(
    q_ptr,
    k_ptr,
    q_pos_ptr,
    cu_q_ptr,
    cu_k_ptr,
    cu_v_ptr,
    m_ptr,
    l_ptr,
    strides,
    n_batch,
    num_heads_q,
    num_splits,
    n_stats,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_Q_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Pass 1: partial (max, normaliser) of split ``program_id(2)`` for BLOCK_M packed rows,
    stored split-major: ``[S, n_stats]``, ``n_stats = Tq * Hq``, row ``token * Hq + head``."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    b, local, total = _locate_tile(cu_q_ptr, cu_v_ptr, n_batch, tile, GROUP, BLOCK_M)
    if tile >= total:
        return
    q_start, n_q = _segment(cu_q_ptr, b)
    k_start, n_k = _segment(cu_k_ptr, b)

    rows = local * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q, qpos, token, head = _load_q_tile(
        q_ptr, q_pos_ptr, rows, row_ok, kv_head, q_start, n_q, n_k, strides, offs_d, d_ok,
        GROUP, HAS_Q_POS, DOT_F32,
    )  # fmt: skip
    stride_kt, stride_kh = strides[2], strides[3]

    # Keys 0..kv_len-1 are seen by some row of the tile, 0..full_len-1 by all of them.
    kv_len = tl.max(tl.where(row_ok, qpos, -1), 0) + 1
    full_len = tl.min(tl.where(row_ok, qpos, n_k), 0) + 1
    chunk = (((kv_len + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)
    mid = lo + (tl.maximum(tl.minimum(hi, full_len) - lo, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + kv_head * stride_kh + offs_d[None, :]
    # Full blocks every row sees: no causal mask, every key is in range.
    for start in range(lo, mid, BLOCK_N):
        keys = start + offs_n
        k = tl.load(
            k_base + (k_start + keys).to(tl.int64)[:, None] * stride_kt,
            mask=d_ok[None, :],
            other=0.0,
        )
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
    # The rest of the split: causal mask per row (a row may see none of these keys).
    for start in range(mid, hi, BLOCK_N):
        keys = start + offs_n
        in_split = keys < hi
        k = tl.load(
            k_base + (k_start + keys).to(tl.int64)[:, None] * stride_kt,
            mask=in_split[:, None] & d_ok[None, :],
            other=0.0,
        )
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        seen = in_split[None, :] & (keys[None, :] <= qpos[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(p, 1)
        m_i = m_new

    stat = split * n_stats + token * num_heads_q + head
    tl.store(m_ptr + stat, m_i, mask=row_ok)
    tl.store(l_ptr + stat, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "num_splits"])
def _merge_stats_kernel(m_ptr, l_ptr, n_rows, num_splits, BLOCK: tl.constexpr):
    """Between the passes: each row's ``S`` partial statistics, stored split-major
    (``[S, rows]``), merged in place into split 0: ``m = max_s m_s``,
    ``l = sum_s l_s * 2^(m_s - m)`` (a row touches only its own entries)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    m = tl.load(m_ptr + rows, mask=ok, other=0.0)
    for s in range(1, num_splits):
        m = tl.maximum(m, tl.load(m_ptr + s * n_rows + rows, mask=ok, other=0.0))
    norm = tl.zeros([BLOCK], tl.float32)
    for s in range(0, num_splits):
        m_s = tl.load(m_ptr + s * n_rows + rows, mask=ok, other=0.0)
        norm += tl.load(l_ptr + s * n_rows + rows, mask=ok, other=0.0) * tl.exp2(m_s - m)
    tl.store(m_ptr + rows, m, mask=ok)
    tl.store(l_ptr + rows, norm, mask=ok)


@triton.jit
def _visual_colsum_kernel(
    q_ptr,
    k_ptr,
    q_pos_ptr,
    visual_idx_ptr,
    cu_q_ptr,
    cu_k_ptr,
    cu_v_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    strides,
    n_batch,
    num_heads_q,
    num_heads_k,
    qk_scale,
    num_channels,  # output channels C (1: the mean over every head); out is [Tv, C]
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_Q_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Pass 2: the mean attention of BLOCK_V visual tokens of one sample, over rows and the heads
    of each of the ``num_channels`` groups of ``Hq / num_channels`` consecutive query heads (a
    channel visits only the KV heads its query heads read); ``m``, ``l``: each row's merged
    statistics (``[Tq * Hq]``, row ``token * Hq + head``)."""
    tile = tl.program_id(0)
    b, local, total = _locate_tile(cu_v_ptr, cu_v_ptr, n_batch, tile, 1, BLOCK_V)
    if tile >= total:
        return
    q_start, n_q = _segment(cu_q_ptr, b)
    k_start, n_k = _segment(cu_k_ptr, b)
    v_start, n_v = _segment(cu_v_ptr, b)

    cols = local * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_v
    vpos = tl.load(visual_idx_ptr + v_start + cols, mask=col_ok, other=0).to(tl.int32)
    k_rows = (k_start + vpos).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_rows = n_q * GROUP
    stride_kt, stride_kh = strides[2], strides[3]

    per_channel = num_heads_q // num_channels
    for channel in range(0, num_channels):
        h0 = channel * per_channel
        acc = tl.zeros([BLOCK_V], tl.float32)
        for kv_head in range(h0 // GROUP, (h0 + per_channel - 1) // GROUP + 1):
            k = tl.load(
                k_ptr + k_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_F32:
                k = k.to(tl.float32)
            kt = tl.trans(k)
            for r0 in range(0, n_rows, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < n_rows
                q, qpos, token, head = _load_q_tile(
                    q_ptr, q_pos_ptr, rows, row_ok, kv_head, q_start, n_q, n_k, strides, offs_d,
                    d_ok, GROUP, HAS_Q_POS, DOT_F32,
                )  # fmt: skip
                stat = token * num_heads_q + head
                m = tl.load(m_ptr + stat, mask=row_ok, other=0.0)
                inv_l = 1.0 / tl.load(l_ptr + stat, mask=row_ok, other=1.0)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
                p = tl.exp2(s - m[:, None]) * inv_l[:, None]
                mine = (head >= h0) & (head < h0 + per_channel)
                seen = (row_ok & mine)[:, None] & (vpos[None, :] <= qpos[:, None])
                acc += tl.sum(tl.where(seen, p, 0.0), 0)
        out = acc / (n_q * per_channel).to(tl.float32)
        tl.store(out_ptr + (v_start + cols) * num_channels + channel, out, mask=col_ok)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _launch_config(dtype: torch.dtype, head_dim: int) -> dict[str, int | str]:
    """Block sizes, warps and stages of both passes for q/k of ``dtype`` and ``head_dim``."""
    if dtype == torch.float32:
        # "ieee" fp32 dots run on FMAs with the whole [BLOCK_M, BLOCK_D] operand in registers:
        # small tiles and 8 warps keep pass 1 from spilling at D=128 (the lowering check).
        return {
            "BLOCK_D": _block_d(head_dim),
            "BLOCK_M": 32,
            "BLOCK_N": 16,
            "BLOCK_V": 32,
            "MIN_BLOCK_V": 16,
            "DOT_PRECISION": "ieee",
            "num_warps": 8,
            "stages_rows": 2,
            "stages_cols": 2,
        }
    return {
        "BLOCK_D": _block_d(head_dim),
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_V": 64,
        "MIN_BLOCK_V": 16,
        "DOT_PRECISION": "ieee",  # ignored for fp16/bf16 operands (tensor cores either way)
        "num_warps": 4,
        "stages_rows": 3,
        "stages_cols": 2,
    }


def _tiles_upper_bound(items: int, n_batch: int, block: int) -> int:
    """An upper bound of ``sum_b cdiv(n_b, block)`` over ``n_batch`` samples of ``items`` in all."""
    return min(items, (items + n_batch * (block - 1)) // block)


def _num_splits(sms: int, row_tiles: int, heads_k: int, total_k: int) -> int:
    """Key splits of pass 1: about two waves of programs, at least 256 keys per split."""
    want = triton.cdiv(2 * sms, max(1, row_tiles * heads_k))
    return max(1, min(want, MAX_SPLITS, total_k // MIN_KEYS_PER_SPLIT))


def _block_v(largest: int, smallest: int, sms: int, total_v: int, n_batch: int) -> int:
    """Visual tile of pass 2: ``largest``, halved (down to ``smallest``) while the launch has fewer
    programs than half the SMs. A program loops over all query rows and heads of its sample
    whatever its width, so for short visual sequences narrower tiles mostly add parallelism (a
    heuristic, not timed)."""
    block = largest
    while block > smallest and 2 * _tiles_upper_bound(total_v, n_batch, block) < sms:
        block //= 2
    return block


@flat_args(ScoringArgs)
def instruction_attention_triton(
    s: ScoringArgs,
    *,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    _head_groups: int = 1,
) -> torch.Tensor:
    """Layer-0 instruction-to-visual attention, averaged over heads and instruction rows.

    Same arguments and result as :func:`tokenprune_kernels.reference.instruction_attention_ref`;
    the values are already validated by the op layer (only shapes are asserted here). Three
    kernel launches (two with one key split), no host-device synchronisation (see the module
    docstring).

    Args (flat, bound as :class:`~tokenprune_kernels.validation.ScoringArgs`, then the options):
        q: [Tq, Hq, D] float32/float16/bfloat16, instruction queries after rotary embedding.
        k: [Tk, Hk, D] same dtype, keys of every token the queries see; ``Hq % Hk == 0``.
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_v: [B+1] int32/int64 packed offsets.
        visual_idx: [Tv] int32/int64, each visual token's local position in its key sequence.
        q_pos: [Tq] int32/int64 local key position of each query, or None (the queries are the
            last ``n_q`` keys of their sample).
        softmax_scale: logit scale; None means ``1/sqrt(D)``.
        num_splits: key splits of pass 1 (None: from the SM count; tests set it).
        block_m, block_n, block_v: override the packed-row, key and visual tile sizes (powers of
            two >= 16; for tests).
        _head_groups: output channels (:func:`instruction_attention_heads_triton`).

    Returns:
        [Tv] float32 on the device of ``q`` ([Tv, G] for ``_head_groups`` G > 1).
    """
    with stage_range("tokenprune.instruction_attention", s.q.device):
        # The kernels index the offsets and indices as flat arrays (no-ops when contiguous).
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale = (
            s.contiguous()
        )
        assert q.dim() == 3 and k.dim() == 3 and q.shape[2] == k.shape[2], (q.shape, k.shape)
        assert q.shape[1] % k.shape[1] == 0, (q.shape, k.shape)
        assert visual_idx.dim() == 1 and cu_seqlens_v.dim() == 1, visual_idx.shape
        total_q, heads_q, head_dim = q.shape
        total_k, heads_k = k.shape[0], k.shape[1]
        total_v = visual_idx.shape[0]
        n_batch = cu_seqlens_q.shape[0] - 1
        channels = int(_head_groups)
        out = torch.empty(total_v, channels, dtype=torch.float32, device=q.device)
        if total_v == 0:
            return out if channels > 1 else out.view(-1)
        group = heads_q // heads_k
        if q.stride(2) != 1:
            q = q.contiguous()
        if k.stride(2) != 1:
            k = k.contiguous()
        scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
        cfg = _launch_config(q.dtype, head_dim)
        bm = block_m or int(cfg["BLOCK_M"])
        bn = block_n or int(cfg["BLOCK_N"])
        sms = sm_count(q.device)
        bv = block_v or _block_v(
            int(cfg["BLOCK_V"]), int(cfg["MIN_BLOCK_V"]), sms, total_v, n_batch
        )
        row_tiles = _tiles_upper_bound(total_q * group, n_batch, bm)
        splits = num_splits or _num_splits(sms, row_tiles, heads_k, total_k)
        n_stats = total_q * heads_q
        m_stat = torch.empty(splits * n_stats, dtype=torch.float32, device=q.device)
        l_stat = torch.empty_like(m_stat)
        has_q_pos = q_pos is not None
        q_pos_arg = q_pos if has_q_pos else cu_seqlens_q  # never read when HAS_Q_POS is False
        device_guard = (
            torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
        )
        common = {
            "GROUP": group,
            "HEAD_DIM": head_dim,
            "BLOCK_D": cfg["BLOCK_D"],
            "BLOCK_M": bm,
            "HAS_Q_POS": has_q_pos,
            "DOT_PRECISION": cfg["DOT_PRECISION"],
            # The interpreter stores bf16 as uint16 and would multiply the bits as integers.
            "DOT_F32": q.dtype == torch.bfloat16 and not gpu_target(q.device),
            "num_warps": cfg["num_warps"],
        }
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
        with device_guard:
            launch(
                _row_stats_kernel, (row_tiles, heads_k, splits),
                q, k, q_pos_arg, cu_seqlens_q, cu_seqlens_k, cu_seqlens_v, m_stat, l_stat,
                strides, n_batch, heads_q, splits, n_stats, scale * _LOG2E,
                BLOCK_N=bn, num_stages=cfg["stages_rows"], **common,
            )  # fmt: skip
            if splits > 1:
                launch(
                    _merge_stats_kernel, (triton.cdiv(n_stats, MERGE_BLOCK),),
                    m_stat, l_stat, n_stats, splits, BLOCK=MERGE_BLOCK, num_warps=MERGE_WARPS,
                )  # fmt: skip
            launch(
                _visual_colsum_kernel, (_tiles_upper_bound(total_v, n_batch, bv),),
                q, k, q_pos_arg, visual_idx, cu_seqlens_q, cu_seqlens_k, cu_seqlens_v,
                m_stat, l_stat, out, strides, n_batch, heads_q, heads_k, scale * _LOG2E, channels,
                BLOCK_V=bv, num_stages=cfg["stages_cols"], **common,
            )  # fmt: skip
        return out if channels > 1 else out.view(-1)


@flat_args(ScoringArgs)
def instruction_attention_heads_triton(
    s: ScoringArgs, head_groups: int | None = None, **options: int | None
) -> torch.Tensor:
    """:func:`instruction_attention_triton` per group of ``Hq / head_groups`` query heads (None:
    ``Hk``): the same launches, pass 2 keeping the groups' column sums apart. Returns [Tv, G]
    float32 (G validated by the op layer); ``options``: that function's keywords."""
    groups = s.k.shape[1] if head_groups is None else int(head_groups)
    return instruction_attention_triton(*s, _head_groups=groups, **options).view(-1, groups)
