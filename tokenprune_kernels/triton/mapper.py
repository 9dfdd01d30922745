"""Stage b in Triton: the whole mapper in ONE fused kernel launch (``mapper_forward_triton``).

What it computes is :func:`tokenprune_kernels.mapper.functional.mapper_forward_ref`: per sample of
``n`` tokens ``x = log(n * attn + eps)`` (one channel per attention channel, then the optional
grid's two), then blocks of [depthwise conv1d (K, 'same' zero padding
per sample, bias) -> pointwise C_in -> C_out (bias) -> LayerNorm over channels (eps 1e-5, affine)
-> SiLU], then a head C_last -> 1 (bias). Depth and widths come from ``params`` (any widths, not
only powers of two; any depth), ``K`` from ``kernel_size``.

Design: (b) of the brief, a persistent grid with a small per-program scratch
--------------------------------------------------------------------------------
* Windows. The packed token axis is cut into windows of ``TILE = BLOCK_M - 2 * HALO`` output
  tokens, ``HALO = num_blocks * (K // 2)`` (10 for 5 blocks, K = 5). A window computes
  ``BLOCK_M`` rows (its tile plus ``HALO`` rows each side) through every block and writes the
  logits of its ``TILE`` centre rows only; errors from the window's edges travel inwards by
  ``K // 2`` rows per block and never reach the centre. Windows cut the PACKED axis, so one window
  may hold several samples: no host-built tile table, no host sync, the grid depends on shapes
  only. Default ``BLOCK_M = 128`` -> ``TILE = 108`` (84 % of the rows are outputs).
* Per-sample zero padding. Each row finds its sample ``[lo, hi)`` with an in-kernel binary search
  of ``cu_seqlens_v`` (``ceil(log2(B+1))`` steps). A depthwise tap of row ``q`` reads row
  ``q + d`` only if ``lo <= q + d < hi`` (and inside the window), else 0, at the input of EVERY
  block. So no value of another sample (NaN included) is ever read: nothing leaks across samples,
  empty samples cost nothing, and no masking pass is needed between blocks.
* Why scratch. Register tensors cannot be shifted along the token axis, and a ``[128, 512]`` fp32
  activation plus a ``256 x 512`` weight do not fit on chip. Each program owns a scratch slab
  ``[BLOCK_M, C_act]`` (block outputs) + ``[BLOCK_M, C_dw]`` (depthwise outputs) fp32, 384 KiB
  for the default mapper, reused for every window it processes. The grid is persistent
  (``min(#windows, PROGRAMS_PER_SM * #SMs)`` programs looping over windows), so the scratch is
  ``[programs, BLOCK_M, C]`` - never ``[N_v, C]`` - and stays (mostly) in L2.
* Per block: (1) depthwise: ``K`` shifted, masked loads of ``[BLOCK_M, BLOCK_K]`` chunks of the
  block input, FMA with the taps, store to the dw slab; barrier. (2) pointwise: ``tl.dot`` of dw
  chunks ``[BLOCK_M, BLOCK_K]`` with packed ``W^T`` chunks ``[BLOCK_K, BLOCK_N]``, output chunk by
  output chunk, bias added, pre-norm values stored to the activation slab; the LayerNorm mean and
  M2 are merged across output chunks with Chan's parallel formula (no ``E[x^2] - E[x]^2``
  cancellation); barrier. (3) normalise + affine + SiLU chunk by chunk, written back in place as
  the next block's input; in the last block it is dotted with the head weights instead (the head
  is fused, the last activation never stored); barrier.
* Pointwise precision: ``DOT_PRECISION`` (module constant, default ``"tf32x3"``, ~fp32 accurate
  on tensor cores; ``"ieee"`` is exact fp32 FMA, ``"tf32"`` the fast one the benchmark may try).
  The interpreter computes every ``tl.dot`` in exact fp32.
* Host side: one launch. The parameters are packed once into one zero-padded fp32 buffer
  (pointwise weights transposed to ``[K_pad, N_pad]``, widths padded to the chunk sizes, so weight
  loads need no masks; padded channels stay exactly 0 through every block) plus an int32 table of
  widths and offsets. The packing is cached, keyed on each tensor's ``data_ptr``, ``_version``
  (shared by ``.detach()`` views, bumped by in-place optimizer steps), shape and the chunk sizes;
  the cache (8 entries, LRU) holds the tensors, so a key's storage cannot be freed and reused
  while cached. A miss costs a few small device-to-device copies; a hit costs nothing on the
  device. The ``meta`` table depends on the shapes only: it is cached by shapes and uploaded once
  from pinned memory, asynchronously. Inference-mode tensors have no version counter (an in-place
  update under ``inference_mode`` would go unseen), so for them the buffer is refilled on every
  call - device copies only, no host sync. Scratch comes from the caching allocator on every
  call.

Launches, bytes and FLOPs (default mapper 32..512, K = 5, ``BLOCK_M=128, BLOCK_K=32,
BLOCK_N=64``; per output token = per window / 108)
------------------------------------------------------------------------------------------
* Launches: 1 (plus, on a packing-cache miss or with inference-mode params, the packing
  copies).
* Compulsory HBM traffic: attn read ``4 * Tv`` B, logits write ``4 * Tv`` B, ``cu_seqlens``
  ``(B + 1) * 4|8`` B, packed parameters 0.73 MB (182,785 floats, padded) once.
* L2 traffic: every window re-reads the packed parameters (0.73 MB, ~6.8 KB per token) and moves
  ~3.0 MB through its scratch slab (~27.6 KB per token): depthwise writes, dw reads once per
  output chunk (the largest part: 1 MB in block 5), pre-norm writes, normalise reads and writes.
  The K shifted depthwise reads (1.3 MB per window) mostly hit L1. attn and cu are re-read for
  the halo rows (4 B * 128/108 per token, L2).
* FLOPs per computed row: pointwise 2 * 174,112 + depthwise 2 * 2,405 + head 2 * 512 + norm and
  SiLU ~ 10 * 992 ~ 364 KFLOP; ~ 431 KFLOP per output token with the halo rows (tensor-core work
  x 3 under ``tf32x3``).
* Resources (sm_90, Triton 3.9 and its ptxas, the kernel as the launches specialise it: 16-byte
  aligned pointers, the slab strides in 16s; ``python -m tokenprune_kernels.triton.lowering``):
  8 warps, 250-254 registers/thread, no spills, 40 KiB shared memory, so one program per SM
  (``benchmarks/results/kernel_resources.md``). ``total`` and ``num_windows`` are not
  specialised (``do_not_specialize``): one compilation whatever the token count.

Not done here (needs a GPU): timing, and tuning ``BLOCK_M/BLOCK_N/NUM_WARPS/NUM_STAGES/
PROGRAMS_PER_SM`` and ``DOT_PRECISION``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.triton.launch import launch, sm_count

__all__ = [
    "BLOCK_K",
    "BLOCK_M",
    "BLOCK_N",
    "DOT_PRECISION",
    "NUM_STAGES",
    "NUM_WARPS",
    "PROGRAMS_PER_SM",
    "mapper_forward_triton",
]

#: ``tl.dot`` input precision of the pointwise convolutions on the GPU: "tf32x3" (default,
#: ~fp32 accurate), "ieee" (exact fp32 on CUDA cores) or "tf32" (fastest, ~1e-3 relative).
DOT_PRECISION = "tf32x3"
#: Rows per window (tile + 2 * halo); a power of two >= 16.
BLOCK_M = 128
#: Input-channel chunk of the depthwise step and the pointwise reduction; a power of two >= 16.
BLOCK_K = 32
#: Output-channel chunk of the pointwise step; a power of two >= BLOCK_K.
BLOCK_N = 64
NUM_WARPS = 8
NUM_STAGES = 2
#: Persistent programs per SM (the grid is ``min(#windows, PROGRAMS_PER_SM * #SMs)``).
PROGRAMS_PER_SM = 1

_ALIGN = 32  # float offsets of packed tensors are multiples of this (128 B)
_CACHE_SIZE = 8


@triton.jit(do_not_specialize=["total", "num_windows"])
def _mapper_forward_kernel(
    attn_ptr,  # *fp32 [total, groups] contiguous ([total] for one group)
    grid_ptr,  # *fp32 [total, 2] contiguous (any pointer when grid_cols is 0)
    cu_ptr,  # *i32|*i64 [num_samples + 1]
    params_ptr,  # *fp32 packed parameters (see _pack_params)
    meta_ptr,  # *i32 [num_blocks * 10 + 2] widths and offsets
    scratch_ptr,  # *fp32 [programs, BLOCK_M * (act_stride + dw_stride)]
    out_ptr,  # *fp32 [total]
    total,  # packed visual tokens
    groups,  # attention channels G
    grid_cols,  # 2 with a grid input, else 0 (block 0 takes groups + grid_cols channels)
    num_samples,
    search_top,  # largest power of two <= num_samples
    search_steps,  # bit length of num_samples
    num_blocks,
    halo,  # num_blocks * (KSIZE // 2)
    num_windows,
    act_stride16,  # row stride of the activation slab / 16 (max padded width / 16)
    dw_stride16,  # row stride of the depthwise slab / 16 (max padded input width / 16)
    input_eps,
    KSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    PAD: tl.constexpr = KSIZE // 2
    rows = tl.arange(0, BLOCK_M)
    cols_k = tl.arange(0, BLOCK_K)
    cols_n = tl.arange(0, BLOCK_N)
    tile = BLOCK_M - 2 * halo
    act_stride = act_stride16 * 16  # (in 16s so the compiler knows the rows are aligned)
    dw_stride = dw_stride16 * 16

    slab = scratch_ptr + pid.to(tl.int64) * (BLOCK_M * (act_stride + dw_stride))
    act = slab  # [BLOCK_M, act_stride] block inputs / pre-norm outputs
    dws = slab + BLOCK_M * act_stride  # [BLOCK_M, dw_stride] depthwise outputs
    act_rows = act + rows[:, None] * act_stride
    dw_rows = dws + rows[:, None] * dw_stride

    off_hw = tl.load(meta_ptr + num_blocks * 10)
    head_b = tl.load(params_ptr + tl.load(meta_ptr + num_blocks * 10 + 1))

    for w in range(pid, num_windows, nprog):
        q = w * tile - halo + rows  # packed positions of the window's rows
        in_range = (q >= 0) & (q < total)
        qc = tl.minimum(tl.maximum(q, 0), total - 1)

        # Sample of every row: the largest s with cu[s] <= q (binary lifting over cu[1..B]).
        s = tl.zeros([BLOCK_M], dtype=tl.int32)
        step = search_top
        for _ in range(search_steps):
            cand = s + step
            ok = cand <= num_samples
            bound = tl.load(cu_ptr + cand, mask=ok, other=0).to(tl.int32)
            s = tl.where(ok & (bound <= qc), cand, s)
            step = step // 2
        lo = tl.load(cu_ptr + s).to(tl.int32)
        hi = tl.load(cu_ptr + s + 1).to(tl.int32)
        lo = tl.where(in_range, lo, 0)  # rows outside [0, total) read no neighbour
        hi = tl.where(in_range, hi, 0)

        n = (hi - lo).to(tl.float32)
        qg = qc.to(tl.int64)

        tl.debug_barrier()  # the previous window is done with the slab
        for g in range(groups):  # block 0's input: log(n * attn + eps) per channel, the grid
            a = tl.load(attn_ptr + qg * groups + g, mask=in_range, other=1.0)
            tl.store(act + rows * act_stride + g, tl.log(n * a + input_eps))
        for j in range(grid_cols):
            gv = tl.load(grid_ptr + qg * 2 + j, mask=in_range, other=0.0)
            tl.store(act + rows * act_stride + groups + j, gv)
        tl.debug_barrier()

        logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        for blk in range(num_blocks):
            meta = meta_ptr + blk * 10
            c_in = tl.load(meta + 0)
            c_out = tl.load(meta + 1)
            k_pad = tl.multiple_of(tl.load(meta + 2), BLOCK_K)
            n_pad = tl.multiple_of(tl.load(meta + 3), BLOCK_N)
            dw_w = params_ptr + tl.multiple_of(tl.load(meta + 4), 32)
            dw_b = params_ptr + tl.multiple_of(tl.load(meta + 5), 32)
            pw_w = params_ptr + tl.multiple_of(tl.load(meta + 6), 32)
            pw_b = params_ptr + tl.multiple_of(tl.load(meta + 7), 32)
            ln_w = params_ptr + tl.multiple_of(tl.load(meta + 8), 32)
            ln_b = params_ptr + tl.multiple_of(tl.load(meta + 9), 32)
            is_last = blk == num_blocks - 1
            head_cols = tl.where(is_last, c_out, 0)  # head weights only in the last block
            store_rows = tl.where(is_last, 0, BLOCK_M)  # the last activation is not stored

            # (1) depthwise conv, zero padding at the sample (and window) boundaries.
            for c0 in range(0, k_pad, BLOCK_K):
                c = c0 + cols_k
                c_ok = (c < c_in)[None, :]
                acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                acc += tl.load(dw_b + c)[None, :]
                for k in tl.static_range(KSIZE):
                    src = rows + (k - PAD)
                    nb = q + (k - PAD)
                    ok = (src >= 0) & (src < BLOCK_M) & (nb >= lo) & (nb < hi)
                    xv = tl.load(
                        act + src[:, None] * act_stride + c[None, :],
                        mask=ok[:, None] & c_ok,
                        other=0.0,
                    )
                    acc += xv * tl.load(dw_w + k * k_pad + c)[None, :]
                tl.store(dw_rows + c[None, :], acc)
            tl.debug_barrier()

            # (2) pointwise conv chunk by chunk; LayerNorm statistics merged across chunks.
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            count = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, n_pad, BLOCK_N):
                cn = n0 + cols_n
                y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, k_pad, BLOCK_K):
                    ck = k0 + cols_k
                    a_chunk = tl.load(dw_rows + ck[None, :])
                    b_chunk = tl.load(pw_w + ck[:, None] * n_pad + cn[None, :])
                    y = tl.dot(a_chunk, b_chunk, y, input_precision=DOT_PRECISION)
                y += tl.load(pw_b + cn)[None, :]
                tl.store(act_rows + cn[None, :], y)
                col_ok = (cn < c_out)[None, :]
                n_b = tl.minimum(c_out - n0, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(tl.where(col_ok, y, 0.0), axis=1) / n_b
                dev = tl.where(col_ok, y - mean_b[:, None], 0.0)
                m2_b = tl.sum(dev * dev, axis=1)
                new_count = count + n_b
                delta = mean_b - mean
                mean += delta * (n_b / new_count)
                m2 += m2_b + delta * delta * (count * n_b / new_count)
                count = new_count
            rstd = 1.0 / tl.sqrt(m2 / c_out.to(tl.float32) + 1e-5)  # LAYER_NORM_EPS
            tl.debug_barrier()

            # (3) normalise + affine + SiLU: the next block's input, or (last block) the head.
            # Chunks of BLOCK_K columns: few rows per thread for the per-row vectors.
            for n0 in range(0, n_pad, BLOCK_K):
                cn = n0 + cols_k
                y = tl.load(act_rows + cn[None, :])
                z = (y - mean[:, None]) * rstd[:, None] * tl.load(ln_w + cn)[None, :]
                z += tl.load(ln_b + cn)[None, :]
                o = z / (1.0 + tl.exp(-z))
                hw = tl.load(params_ptr + off_hw + cn, mask=cn < head_cols, other=0.0)
                logit = tl.where(is_last, logit + tl.sum(o * hw[None, :], axis=1), logit)
                tl.store(act_rows + cn[None, :], o, mask=(rows < store_rows)[:, None])
            tl.debug_barrier()

        centre = (rows >= halo) & (rows < halo + tile) & in_range
        tl.store(out_ptr + qc, logit + head_b, mask=centre)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _Packed:
    """Packed parameters: ``params`` fp32 buffer, ``meta`` int32 table, slab widths."""

    def __init__(self, params: Tensor, meta: Tensor, act_stride: int, dw_stride: int) -> None:
        self.params = params
        self.meta = meta
        self.act_stride = act_stride
        self.dw_stride = dw_stride


class _Layout(NamedTuple):
    """Where each parameter goes in the packed buffer: a function of the shapes only."""

    #: per block: c_in, c_out, k_pad, n_pad and the offsets of its six parameters
    blocks: tuple[tuple[int, int, int, int, tuple[int, ...]], ...]
    head: tuple[int, int]  # offsets of head_w, head_b
    size: int  # floats in the buffer
    meta: tuple[int, ...]  # the kernel's int32 table
    act_stride: int
    dw_stride: int


_PACK_CACHE: OrderedDict[tuple, tuple[tuple[Tensor, ...], _Packed]] = OrderedDict()
_LAYOUT_CACHE: OrderedDict[tuple, tuple[_Layout, Tensor]] = OrderedDict()
_PACK_LOCK = threading.Lock()


def _cached(cache: OrderedDict, key: tuple, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made on a miss; least recently used entries beyond ``_CACHE_SIZE`` go."""
    with _PACK_LOCK:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    value = make()
    with _PACK_LOCK:
        cache[key] = value
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return value


def _layout(shapes: tuple[tuple[int, ...], ...], kernel_size: int, block_k: int, block_n: int):
    """The packing layout for parameters of ``shapes`` (see :func:`_pack_params`)."""
    num_blocks = (len(shapes) - 2) // 6
    meta: list[int] = []
    offset = 0

    def place(numel: int) -> int:
        nonlocal offset
        start = offset
        offset = _round_up(offset + numel, _ALIGN)
        return start

    act_stride, dw_stride = block_n, block_k
    blocks = []
    for b in range(num_blocks):
        c_out, c_in = shapes[6 * b + 2][0], shapes[6 * b + 2][1]  # pointwise weight [C_out, C_in]
        k_pad, n_pad = _round_up(c_in, block_k), _round_up(c_out, block_n)
        offs = (
            place(kernel_size * k_pad),
            place(k_pad),
            place(k_pad * n_pad),
            place(n_pad),
            place(n_pad),
            place(n_pad),
        )
        meta += [c_in, c_out, k_pad, n_pad, *offs]
        blocks.append((c_in, c_out, k_pad, n_pad, offs))
        act_stride = max(act_stride, k_pad, n_pad)
        dw_stride = max(dw_stride, k_pad)
    head = (place(blocks[-1][3]), place(1))
    meta += list(head)
    if offset >= 2**31:
        raise ValueError(f"params are too large for the Triton mapper ({offset} packed floats)")
    return _Layout(tuple(blocks), head, offset, tuple(meta), act_stride, dw_stride)


def _upload(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list on ``device`` without a host sync (pinned memory, ``non_blocking``)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _fill(params: Sequence[Tensor], layout: _Layout, kernel_size: int) -> Tensor:
    """The packed fp32 buffer: device-to-device copies only (no host sync)."""
    buf = torch.zeros(layout.size, dtype=torch.float32, device=params[0].device)
    with torch.no_grad():
        for b, (c_in, c_out, k_pad, n_pad, offs) in enumerate(layout.blocks):
            dw_w, dw_b, pw_w, pw_b, ln_w, ln_b = params[6 * b : 6 * b + 6]
            o_dw, o_db, o_pw, o_pb, o_lw, o_lb = offs
            taps = buf[o_dw : o_dw + kernel_size * k_pad].view(kernel_size, k_pad)
            taps[:, :c_in] = dw_w[:, 0, :].t()
            buf[o_db : o_db + c_in] = dw_b
            buf[o_pw : o_pw + k_pad * n_pad].view(k_pad, n_pad)[:c_in, :c_out] = pw_w.t()
            buf[o_pb : o_pb + c_out] = pw_b
            buf[o_lw : o_lw + c_out] = ln_w
            buf[o_lb : o_lb + c_out] = ln_b
        (off_hw, off_hb), c_last = layout.head, layout.blocks[-1][1]
        buf[off_hw : off_hw + c_last] = params[-2].reshape(-1)
        buf[off_hb : off_hb + 1] = params[-1].reshape(-1)
    return buf


def _pack_params(params: Sequence[Tensor], kernel_size: int, block_k: int, block_n: int) -> _Packed:
    """Pack the flat parameter list for the kernel (see the module docstring), with no host sync.

    Layout (float offsets multiples of 32), per block: ``dw_w [K, K_pad]`` (tap-major),
    ``dw_b [K_pad]``, ``pw_w^T [K_pad, N_pad]``, ``pw_b``, ``ln_w``, ``ln_b [N_pad]``; then
    ``head_w [N_pad_last]``, ``head_b [1]``. ``K_pad = round_up(C_in, block_k)``,
    ``N_pad = round_up(C_out, block_n)``; padding is zero. ``meta`` holds per block
    ``[C_in, C_out, K_pad, N_pad, off_dw_w, off_dw_b, off_pw, off_pb, off_lnw, off_lnb]`` then
    ``[off_head_w, off_head_b]``, int32.

    Caches: the layout and the device ``meta`` table depend on the shapes only and are cached by
    shapes and device (uploaded once, from pinned memory, asynchronously). The packed buffer is
    cached by each tensor's identity and version (so an in-place update repacks); inference-mode
    tensors have no version counter, so for them the buffer is refilled on every call
    (device-to-device copies, asynchronous).
    """
    device = params[0].device

    def pack() -> _Packed:
        shapes = tuple(tuple(p.shape) for p in params)
        layout, meta = _cached(
            _LAYOUT_CACHE,
            (shapes, kernel_size, block_k, block_n, str(device)),
            lambda: _placed(_layout(shapes, kernel_size, block_k, block_n), device),
        )
        return _Packed(
            _fill(params, layout, kernel_size), meta, layout.act_stride, layout.dw_stride
        )

    key = _cache_key(params, kernel_size, block_k, block_n)
    if key is None:
        return pack()
    return _cached(_PACK_CACHE, key, lambda: (tuple(params), pack()))[1]


def _placed(layout: _Layout, device: torch.device) -> tuple[_Layout, Tensor]:
    """``layout`` and its ``meta`` table on ``device``."""
    return layout, _upload(layout.meta, torch.int32, device)


def _cache_key(
    params: Sequence[Tensor], kernel_size: int, block_k: int, block_n: int
) -> tuple | None:
    """Identity + version of every tensor, or None when one has no version counter (an
    inference-mode tensor can change in place unseen: its buffer is refilled on every call)."""
    if any(p.is_inference() for p in params):
        return None
    tensors = tuple((p.data_ptr(), p._version, tuple(p.shape), str(p.device)) for p in params)
    return (kernel_size, block_k, block_n, tensors)


def _num_programs(device: torch.device, num_windows: int) -> int:
    """``PROGRAMS_PER_SM`` per SM (4 SMs under the interpreter), at most one per window."""
    return min(num_windows, PROGRAMS_PER_SM * sm_count(device))


def _check_block(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


def mapper_forward_triton(
    attn: Tensor,
    cu_seqlens_v: Tensor,
    params: Sequence[Tensor],
    kernel_size: int,
    input_eps: float,
    grid: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    num_programs: int | None = None,
) -> Tensor:
    """Mapper logits of a packed batch in one fused Triton launch (stage b, ``triton`` backend).

    Args:
        attn: ``[Tv]`` float32 attention signal (stage a), or ``[Tv, G]`` per-head-group means,
            on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        cu_seqlens_v: ``[B + 1]`` int32/int64 offsets on ``attn``'s device; empty samples allowed.
        params: the flat float32 mapper parameter list (``TokenMapper.op_params()``), on
            ``attn``'s device; depth and widths are read from it.
        kernel_size: odd depthwise kernel width ``K`` (``params[0].shape[-1]``).
        input_eps: ``> 0``; input feature ``log(n * attn + input_eps)``.
        grid: ``[Tv, 2]`` float32 normalised grid row and column (2 more input channels), or
            None.
        block_m: rows per window (power of two >= 16, > ``2 * HALO``); default
            ``max(BLOCK_M, next_pow2(4 * HALO))``, ``HALO = num_blocks * (K // 2)``.
        block_k: input-channel chunk (power of two >= 16); default :data:`BLOCK_K`.
        block_n: output-channel chunk (power of two >= ``block_k``); default :data:`BLOCK_N`.
        num_programs: persistent programs (default ``PROGRAMS_PER_SM * #SMs`` on CUDA, 4 on
            CPU), capped at the number of windows.

    The arguments are assumed validated by the op layer (``validation.check_mapper`` and
    ``check_mapper_values``); only the tuning keywords are checked here.

    Returns:
        ``[Tv]`` float32 logits, equal to :func:`mapper_forward_ref` up to fp32 rounding (and the
        pointwise ``DOT_PRECISION`` on the GPU).
    """
    with stage_range("tokenprune.mapper_forward", attn.device):
        num_blocks = (len(params) - 2) // 6
        halo = num_blocks * (kernel_size // 2)
        if block_m is None:
            block_m = max(BLOCK_M, triton.next_power_of_2(4 * halo))
        block_k = BLOCK_K if block_k is None else block_k
        block_n = BLOCK_N if block_n is None else block_n
        _check_block("block_m", block_m, 16)
        _check_block("block_k", block_k, 16)
        _check_block("block_n", block_n, block_k)
        if block_m <= 2 * halo:
            raise ValueError(
                f"block_m must exceed 2 * halo = {2 * halo} ({num_blocks} blocks, kernel_size "
                f"{kernel_size}), got {block_m}"
            )
        total = attn.shape[0]
        out = attn.new_empty(total)
        if total == 0:
            return out
        if total >= 2**31 - block_m:
            raise ValueError(f"attn must have fewer than 2**31 - {block_m} tokens, got {total}")
        tile = block_m - 2 * halo
        num_windows = -(-total // tile)
        if num_programs is None:
            num_programs = _num_programs(attn.device, num_windows)
        elif isinstance(num_programs, bool) or not isinstance(num_programs, int):
            raise ValueError(f"num_programs must be an int >= 1, got {num_programs!r}")
        elif num_programs < 1:
            raise ValueError(f"num_programs must be an int >= 1, got {num_programs}")
        num_programs = min(num_programs, num_windows)

        packed = _pack_params(params, kernel_size, block_k, block_n)
        scratch = torch.empty(
            num_programs * block_m * (packed.act_stride + packed.dw_stride),
            dtype=torch.float32,
            device=attn.device,
        )
        num_samples = cu_seqlens_v.shape[0] - 1
        steps = num_samples.bit_length()
        attn_c = attn.contiguous()
        grid_c = attn_c if grid is None else grid.contiguous()
        cu = cu_seqlens_v.contiguous()
        launch(
            _mapper_forward_kernel,
            (num_programs,),
            attn_c,
            grid_c,
            cu,
            packed.params,
            packed.meta,
            scratch,
            out,
            total,
            1 if attn.dim() == 1 else attn.shape[1],
            0 if grid is None else 2,
            num_samples,
            1 << (steps - 1),
            steps,
            num_blocks,
            halo,
            num_windows,
            packed.act_stride // 16,
            packed.dw_stride // 16,
            float(input_eps),
            **_constexprs(kernel_size, block_m, block_k, block_n),
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
        return out


def _constexprs(kernel_size: int, block_m: int, block_k: int, block_n: int) -> dict[str, Any]:
    """The kernel's constexpr arguments for a launch (and for its lowering cases)."""
    return {
        "KSIZE": kernel_size,
        "BLOCK_M": block_m,
        "BLOCK_K": block_k,
        "BLOCK_N": block_n,
        "DOT_PRECISION": DOT_PRECISION,
    }
