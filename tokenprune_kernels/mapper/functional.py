"""Plain-PyTorch reference of the mapper (stage b of ``docs/contract.md``).

The mapper scores every visual token from the layer-0 attention signal of stage a. Per sample of
``n`` tokens::

    x = log(n * attn + input_eps)                                   # [C, n] (C = 1: the head mean)
    x = concat(x, grid)                  (optional)                 # [C + 2, n]
    for each block:                                                 # C_in -> C_out
        x = depthwise_conv1d(x, K, 'same' zero padding, bias)       # [C_in, n]
        x = pointwise_conv1d(x, bias)                               # [C_out, n]
        x = SiLU(LayerNorm_over_channels(x, eps=1e-5, affine))      # [C_out, n]
    logits = pointwise_conv1d(x, C_last -> 1, bias)                 # [n]

The flat parameter list, per block ``[dw_weight [C_in, 1, K], dw_bias [C_in],
pw_weight [C_out, C_in], pw_bias [C_out], ln_weight [C_out], ln_bias [C_out]]`` then
``[head_weight [1, C_last], head_bias [1]]``, all float32. The number of blocks and their widths
are read from the list, so any channel list works (the method's default is 1 -> 32 -> 64 -> 128
-> 256 -> 512). The input channels ``C_0`` of the first block are the attention channels (1 for
the paper's head-mean signal ``attn [Tv]``, ``C`` for per-head means ``attn [Tv, C]``) plus 2 when
the token's grid position ``grid [Tv, 2]`` (normalised row and column, see
:func:`grid_positions`) is an input.

Both entry points (packed varlen here, padded ``[B, N]`` in :class:`TokenMapper`) run the same
:func:`_mapper_trunk` over a layout in which every sample is followed by at least ``K // 2`` zero
positions that are re-zeroed after each block, so each depthwise convolution sees exactly its own
sample's zero padding and nothing leaks between samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenprune_kernels.validation import (
    check_mapper,
    check_mapper_values,
    mapper_param_names,
    segment_ids,
    validate_mapper_params,
)

__all__ = [
    "LAYER_NORM_EPS",
    "grid_positions",
    "mapper_features",
    "mapper_forward_ref",
    "mapper_param_names",
    "validate_mapper_params",
]

#: LayerNorm epsilon of every block (fixed by the contract).
LAYER_NORM_EPS = 1e-5

_PARAMS_PER_BLOCK = 6  # dw weight/bias, pw weight/bias, norm weight/bias (see mapper_param_names)


def grid_positions(height: int, width: int, frames: int = 1, device=None) -> Tensor:
    """The mapper's grid input of an image (or video) of ``frames x height x width`` tokens in
    row-major order: ``[frames * height * width, 2]`` float32, the normalised row
    ``(r + 0.5) / height`` and column ``(c + 0.5) / width`` of each token, in (0, 1)."""
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return grid.repeat(frames, 1)


def mapper_features(attn: Tensor, n: Tensor, input_eps: float, grid: Tensor | None) -> Tensor:
    """The first block's input: ``[..., C_0]`` float32, ``log(n * attn + input_eps)`` per
    attention channel, then the grid channels when ``grid`` is given.

    ``attn``: ``[...]`` (one channel) or ``[..., C]`` float32 >= 0; ``n``: the sample length of
    each token, broadcastable to ``attn``'s leading dims; ``grid``: ``[..., 2]`` or None.
    """
    x = attn if attn.dim() == n.dim() + 1 else attn.unsqueeze(-1)
    x = torch.log(n.unsqueeze(-1) * x + float(input_eps))
    return x if grid is None else torch.cat([x, grid.to(x.dtype)], dim=-1)


def _mapper_trunk(x: Tensor, valid: Tensor, params: Sequence[Tensor], kernel_size: int) -> Tensor:
    """Blocks and head over a batch of zero-separated rows.

    ``x: [B, L, C_0]`` float32 input features (:func:`mapper_features`), already zero wherever
    ``valid`` is False;
    ``valid: [B, L]`` bool. Every run of valid positions must be separated from the next one (and
    from nothing but the row ends) by at least ``kernel_size // 2`` invalid positions, which are
    forced back to zero after every block, so the convolutions see per-sample zero padding.
    Returns ``[B, L]`` float32 logits; values at invalid positions are meaningless.
    """
    num_blocks = (len(params) - 2) // _PARAMS_PER_BLOCK
    keep = valid.unsqueeze(-1)  # [B, L, 1]
    h = x.transpose(1, 2)  # [B, C_0, L]
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


def mapper_forward_ref(
    attn: Tensor,
    cu_seqlens_v: Tensor,
    params: Sequence[Tensor],
    kernel_size: int,
    input_eps: float,
    grid: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """Mapper logits of a packed (varlen) batch of visual tokens, in plain PyTorch.

    Args:
        attn: ``[Tv]`` float32, the layer-0 instruction attention of every visual token (stage a),
            or ``[Tv, C]`` float32, its per-head means (``instruction_attention(...,
            head_groups=C)``).
        cu_seqlens_v: ``[B + 1]`` int32/int64; sample ``b`` owns ``attn[cu[b]:cu[b + 1]]``.
            Starts at 0, never decreases, ends at ``Tv``. Empty samples are allowed.
        params: flat float32 parameter list in the order of :func:`mapper_param_names` (see the
            module docstring); widths and depth are inferred from it.
        kernel_size: odd depthwise kernel width ``K``; must match ``params[0].shape[-1]``.
        input_eps: ``> 0``; the input feature of a sample of ``n`` tokens is
            ``log(n * attn + input_eps)``.
        grid: ``[Tv, 2]`` float32, each token's normalised row and column
            (:func:`grid_positions`), or None; when given, 2 more input channels.
        validate: check the arguments first (the checks of ``tokenprune_kernels.validation``,
            shared with the op). The op passes False: it has checked them already.

    Returns:
        ``[Tv]`` float32 logits, one per visual token, on ``attn``'s device. Each sample is
        computed independently with its own 'same' zero padding (any ``n >= 1``, including
        ``n < K``); samples with 0 tokens contribute nothing. Differentiable in ``attn`` and
        ``params``.

    Raises:
        ValueError / TypeError naming the argument (and, for params, the index, name and
        expected shape) on malformed input.
    """
    if validate:
        check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps, grid)
        check_mapper_values(attn, cu_seqlens_v, grid)
    total = attn.shape[0]
    if total == 0:
        return attn.new_empty(0)

    device = attn.device
    cu = cu_seqlens_v.to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]  # [B]
    num_samples = lengths.shape[0]
    sample = segment_ids(cu, total)  # [Tv], sample id of every token
    n = lengths.to(torch.float32)[sample]  # [Tv], its sample's length
    x = mapper_features(attn, n, input_eps, grid)  # [Tv, C_0]

    # Lay the samples out in one row with K // 2 zeros between consecutive samples; conv1d's own
    # padding supplies the zeros at the two ends.
    gap = kernel_size // 2
    pos = torch.arange(total, device=device) + gap * sample  # [Tv]
    width = total + gap * (num_samples - 1)
    row = x.new_zeros(width, x.shape[1]).index_put((pos,), x)
    valid = torch.zeros(width, dtype=torch.bool, device=device).index_fill(0, pos, True)
    logits = _mapper_trunk(row.unsqueeze(0), valid.unsqueeze(0), params, kernel_size)
    return logits[0, pos]
