"""Stage b: the relevance mapper over packed visual tokens (``tokenprune::mapper_forward``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import define

SCHEMA = (
    "mapper_forward(Tensor attn, Tensor cu_seqlens_v, Tensor[] params, int kernel_size, "
    "float input_eps, Tensor? grid=None) -> Tensor"
)


def _fake(attn, cu_seqlens_v, params, kernel_size, input_eps, grid=None) -> torch.Tensor:
    v.check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps, grid)
    return attn.new_empty(attn.shape[0])


def _impl(attn, cu_seqlens_v, params, kernel_size, input_eps, grid=None) -> torch.Tensor:
    v.check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps, grid)
    v.check_mapper_values(attn, cu_seqlens_v, grid)
    return backend.call(
        "mapper_forward",
        attn.device.type,
        attn,
        cu_seqlens_v,
        params,
        kernel_size,
        input_eps,
        grid,
    )


define(SCHEMA, _impl, _fake)


def _mapper_forward_ref(
    attn, cu_seqlens_v, params, kernel_size, input_eps, grid=None
) -> torch.Tensor:
    """The reference in the stage's calling convention: the op has validated the arguments."""
    return reference.mapper_forward_ref(
        attn, cu_seqlens_v, params, kernel_size, input_eps, grid, validate=False
    )


def mapper_forward(
    attn: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    params: Sequence[torch.Tensor],
    kernel_size: int = 5,
    input_eps: float = 1e-4,
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relevance logits of the visual tokens from their instruction-attention signal.

    Args:
        attn: [Tv] float32, the output of :func:`instruction_attention` (the paper's input), or
            [Tv, G] float32, the output of :func:`instruction_attention_heads` (a mapper with
            ``G`` attention channels).
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        params: the mapper's tensors in op order (``TokenMapper.op_params()``), float32.
        kernel_size: depthwise kernel size (odd).
        input_eps: epsilon of the input feature ``log(n * attn + eps)``.
        grid: [Tv, 2] float32, each token's normalised row and column in its image grid
            (``tokenprune_kernels.mapper.grid_positions``), for a mapper with grid input;
            None otherwise. The first block takes ``G`` (+ 2 with ``grid``) input channels.

    Returns:
        [Tv] float32 logits; a per-sample softmax gives the predicted relevance.
    """
    return torch.ops.tokenprune.mapper_forward(
        attn, cu_seqlens_v, list(params), int(kernel_size), float(input_eps), grid
    )
