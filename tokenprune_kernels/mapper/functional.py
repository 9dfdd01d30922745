"""Plain-PyTorch reference of the mapper (stage b of ``docs/contract.md``).

The mapper scores every visual token from the layer-0 attention signal of stage a. Per sample of
``n`` tokens::

    x = log(n * attn + input_eps)                                   # [1, n]
    for each block:                                                 # C_in -> C_out
        x = depthwise_conv1d(x, K, 'same' zero padding, bias)       # [C_in, n]
        x = pointwise_conv1d(x, bias)                               # [C_out, n]
        x = SiLU(LayerNorm_over_channels(x, eps=1e-5, affine))      # [C_out, n]
    logits = pointwise_conv1d(x, C_last -> 1, bias)                 # [n]

The flat parameter list, per block ``[dw_weight [C_in, 1, K], dw_bias [C_in],
pw_weight [C_out, C_in], pw_bias [C_out], ln_weight [C_out], ln_bias [C_out]]`` then
``[head_weight [1, C_last], head_bias [1]]``, all float32. The number of blocks and their widths
are read from the list, so any channel list works (the method's default is 1 -> 32 -> 64 -> 128
-> 256 -> 512).

Both entry points (packed varlen here, padded ``[B, N]`` in :class:`TokenMapper`) run the same
:func:`_mapper_trunk` over a layout in which every sample is followed by at least ``K // 2`` zero
positions that are re-zeroed after each block, so each depthwise convolution sees exactly its own
sample's zero padding and nothing leaks between samples.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LAYER_NORM_EPS",
    "mapper_forward_ref",
    "mapper_param_names",
    "validate_mapper_params",
]

#: LayerNorm epsilon of every block (fixed by the contract).
LAYER_NORM_EPS = 1e-5

_BLOCK_PARAM_SUFFIXES = (
    "dw.weight",
    "dw.bias",
    "pw.weight",
    "pw.bias",
    "norm.weight",
    "norm.bias",
)
_PARAMS_PER_BLOCK = len(_BLOCK_PARAM_SUFFIXES)


def mapper_param_names(num_blocks: int) -> list[str]:
    """Stable names of the flat mapper parameters, in the op's order.

    ``blocks.{i}.dw.weight``, ``blocks.{i}.dw.bias``, ``blocks.{i}.pw.weight``,
    ``blocks.{i}.pw.bias``, ``blocks.{i}.norm.weight``, ``blocks.{i}.norm.bias`` for each block
    ``i``, then ``head.weight`` and ``head.bias``. These are the keys of :class:`TokenMapper`'s
    ``state_dict`` and of the ``.safetensors`` files written by :func:`save_mapper`.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    names = [f"blocks.{i}.{suffix}" for i in range(num_blocks) for suffix in _BLOCK_PARAM_SUFFIXES]
    return [*names, "head.weight", "head.bias"]


def _check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size}")


def validate_mapper_params(params: Sequence[Tensor], kernel_size: int) -> tuple[int, ...]:
    """Check a flat mapper parameter list and return its block widths ``(C_1, ..., C_last)``.

    Raises ``ValueError`` naming the parameter (index and name) and the expected shape when the
    list has the wrong length, a tensor has the wrong shape (channels must chain from 1 input
    channel; the depthwise kernel width must equal ``kernel_size``) or the tensors are not all on
    one device, and ``TypeError`` when an entry is not a float32 tensor.
    """
    _check_kernel_size(kernel_size)
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    count = len(params)
    if count < _PARAMS_PER_BLOCK + 2 or (count - 2) % _PARAMS_PER_BLOCK != 0:
        raise ValueError(
            f"params must hold {_PARAMS_PER_BLOCK} tensors per block plus 2 for the head "
            f"(6 * num_blocks + 2 with num_blocks >= 1, e.g. 32 for 5 blocks), got {count}"
        )
    num_blocks = (count - 2) // _PARAMS_PER_BLOCK
    names = mapper_param_names(num_blocks)

    for index, (name, p) in enumerate(zip(names, params, strict=True)):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{index}] ({name}) must be a Tensor, got {type(p).__name__}")
        if p.dtype != torch.float32:
            raise TypeError(f"params[{index}] ({name}) must be float32, got {p.dtype}")
    device = params[0].device
    for index, (name, p) in enumerate(zip(names, params, strict=True)):
        if p.device != device:
            raise ValueError(
                f"params[{index}] ({name}) is on {p.device}, expected {device} like params[0]"
            )

    def expect(index: int, shape: tuple[int, ...]) -> None:
        got = tuple(params[index].shape)
        if got != shape:
            raise ValueError(
                f"params[{index}] ({names[index]}) must have shape {list(shape)}, got {list(got)}"
            )

    widths: list[int] = []
    c_in = 1
    for block in range(num_blocks):
        base = block * _PARAMS_PER_BLOCK
        dw_shape = tuple(params[base].shape)
        if len(dw_shape) != 3 or dw_shape[1] != 1 or dw_shape[0] != c_in:
            expect(base, (c_in, 1, kernel_size))
        if dw_shape[2] != kernel_size:
            raise ValueError(
                f"params[{base}] ({names[base]}) has kernel width {dw_shape[2]} but "
                f"kernel_size={kernel_size}: expected shape {[c_in, 1, kernel_size]}"
            )
        expect(base + 1, (c_in,))
        pw_shape = tuple(params[base + 2].shape)
        if len(pw_shape) != 2 or pw_shape[1] != c_in or pw_shape[0] < 1:
            raise ValueError(
                f"params[{base + 2}] ({names[base + 2]}) must have shape [C_out, {c_in}] "
                f"with C_out >= 1, got {list(pw_shape)}"
            )
        c_out = pw_shape[0]
        for offset in (3, 4, 5):
            expect(base + offset, (c_out,))
        widths.append(c_out)
        c_in = c_out
    expect(count - 2, (1, c_in))
    expect(count - 1, (1,))
    return tuple(widths)


def _mapper_trunk(x: Tensor, valid: Tensor, params: Sequence[Tensor], kernel_size: int) -> Tensor:
    """Blocks and head over a batch of zero-separated rows.

    ``x: [B, L]`` float32 input features, already zero wherever ``valid`` is False;
    ``valid: [B, L]`` bool. Every run of valid positions must be separated from the next one (and
    from nothing but the row ends) by at least ``kernel_size // 2`` invalid positions, which are
    forced back to zero after every block, so the convolutions see per-sample zero padding.
    Returns ``[B, L]`` float32 logits; values at invalid positions are meaningless.
    """
    num_blocks = (len(params) - 2) // _PARAMS_PER_BLOCK
    keep = valid.unsqueeze(-1)  # [B, L, 1]
    h = x.unsqueeze(1)  # [B, C=1, L]
    for block in range(num_blocks):
        dw_w, dw_b, pw_w, pw_b, ln_w, ln_b = params[
            block * _PARAMS_PER_BLOCK : (block + 1) * _PARAMS_PER_BLOCK
        ]
        h = F.conv1d(h, dw_w, dw_b, padding=kernel_size // 2, groups=dw_w.shape[0])  # [B, C_in, L]
        h = F.linear(h.transpose(1, 2), pw_w, pw_b)  # [B, L, C_out]
        h = F.layer_norm(h, (pw_w.shape[0],), ln_w, ln_b, eps=LAYER_NORM_EPS)
        h = F.silu(h)
        h = torch.where(keep, h, 0.0).transpose(1, 2)  # [B, C_out, L]
    head_w, head_b = params[-2], params[-1]
    return F.linear(h.transpose(1, 2), head_w, head_b).squeeze(-1)  # [B, L]


def _check_cu_seqlens(cu_seqlens_v: Tensor, total: int) -> None:
    if not isinstance(cu_seqlens_v, Tensor):
        raise TypeError(f"cu_seqlens_v must be a Tensor, got {type(cu_seqlens_v).__name__}")
    if cu_seqlens_v.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens_v must be int32 or int64, got {cu_seqlens_v.dtype}")
    if cu_seqlens_v.dim() != 1 or cu_seqlens_v.numel() < 1:
        raise ValueError(
            f"cu_seqlens_v must be 1-D with B + 1 >= 1 entries, got shape "
            f"{list(cu_seqlens_v.shape)}"
        )
    cu = cu_seqlens_v.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_v must start at 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens_v must end at attn.shape[0] = {total}, got {cu[-1]}")
    if any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens_v must be non-decreasing, got {cu}")


def mapper_forward_ref(
    attn: Tensor,
    cu_seqlens_v: Tensor,
    params: Sequence[Tensor],
    kernel_size: int,
    input_eps: float,
) -> Tensor:
    """Mapper logits of a packed (varlen) batch of visual tokens, in plain PyTorch.

    Args:
        attn: ``[Tv]`` float32, the layer-0 instruction attention of every visual token (stage a).
        cu_seqlens_v: ``[B + 1]`` int32/int64; sample ``b`` owns ``attn[cu[b]:cu[b + 1]]``.
            Starts at 0, never decreases, ends at ``Tv``. Empty samples are allowed.
        params: flat float32 parameter list in the order of :func:`mapper_param_names` (see the
            module docstring); widths and depth are inferred from it.
        kernel_size: odd depthwise kernel width ``K``; must match ``params[0].shape[-1]``.
        input_eps: ``> 0``; the input feature of a sample of ``n`` tokens is
            ``log(n * attn + input_eps)``.

    Returns:
        ``[Tv]`` float32 logits, one per visual token, on ``attn``'s device. Each sample is
        computed independently with its own 'same' zero padding (any ``n >= 1``, including
        ``n < K``); samples with 0 tokens contribute nothing. Differentiable in ``attn`` and
        ``params``.

    Raises:
        ValueError / TypeError naming the argument (and, for params, the index, name and
        expected shape) on malformed input.
    """
    if not isinstance(attn, Tensor):
        raise TypeError(f"attn must be a Tensor, got {type(attn).__name__}")
    if attn.dtype != torch.float32:
        raise TypeError(f"attn must be float32, got {attn.dtype}")
    if attn.dim() != 1:
        raise ValueError(f"attn must be 1-D [Tv], got shape {list(attn.shape)}")
    if isinstance(input_eps, bool) or not isinstance(input_eps, numbers.Real):
        raise TypeError(f"input_eps must be a float, got {type(input_eps).__name__}")
    input_eps = float(input_eps)
    if not (math.isfinite(input_eps) and input_eps > 0):
        raise ValueError(f"input_eps must be a finite float > 0, got {input_eps}")
    validate_mapper_params(params, kernel_size)
    if params[0].device != attn.device:
        raise ValueError(f"params are on {params[0].device} but attn is on {attn.device}")
    total = attn.shape[0]
    _check_cu_seqlens(cu_seqlens_v, total)
    if total == 0:
        return attn.new_empty(0)

    device = attn.device
    cu = cu_seqlens_v.to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]  # [B]
    num_samples = lengths.shape[0]
    sample = torch.repeat_interleave(
        torch.arange(num_samples, device=device), lengths, output_size=total
    )  # [Tv], sample id of every token
    n = lengths.to(torch.float32)[sample]  # [Tv], its sample's length
    x = torch.log(n * attn + input_eps)

    # Lay the samples out in one row with K // 2 zeros between consecutive samples; conv1d's own
    # padding supplies the zeros at the two ends.
    gap = kernel_size // 2
    pos = torch.arange(total, device=device) + gap * sample  # [Tv]
    width = total + gap * (num_samples - 1)
    row = x.new_zeros(width).index_put((pos,), x)
    valid = torch.zeros(width, dtype=torch.bool, device=device).index_fill(0, pos, True)
    logits = _mapper_trunk(row.unsqueeze(0), valid.unsqueeze(0), params, kernel_size)
    return logits[0, pos]
