"""Stage b: the relevance mapper over packed visual tokens (``tokenprune::mapper_forward``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import register


def run_mapper_forward(attn, cu_seqlens_v, params, kernel_size, input_eps):
    """Stage b on the chosen backend; the arguments are already validated."""
    which = backend.choose("mapper_forward", attn.device.type)
    if which in ("cpp", "cuda"):
        return torch.ops.tokenprune._mapper_forward(
            attn, cu_seqlens_v, list(params), int(kernel_size), float(input_eps)
        )
    if which == "triton":
        from tokenprune_kernels.triton import mapper_forward_triton

        return mapper_forward_triton(attn, cu_seqlens_v, params, kernel_size, input_eps)
    return reference.mapper_forward_ref(
        attn, cu_seqlens_v, params, kernel_size, input_eps, validate=False
    )


def _impl(attn, cu_seqlens_v, params, kernel_size, input_eps):
    v.check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps)
    v.check_mapper_values(attn, cu_seqlens_v)
    return run_mapper_forward(attn, cu_seqlens_v, params, kernel_size, input_eps)


def _fake(attn, cu_seqlens_v, params, kernel_size, input_eps):
    v.check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps)
    return torch.empty_like(attn)


register("mapper_forward", _impl, _fake)


def mapper_forward(
    attn: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    params: Sequence[torch.Tensor],
    kernel_size: int = 5,
    input_eps: float = 1e-4,
) -> torch.Tensor:
    """Relevance logits of the visual tokens from their instruction-attention signal.

    Args:
        attn: [Tv] float32, the output of :func:`instruction_attention`.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        params: the mapper's tensors in op order (``TokenMapper.op_params()``), float32.
        kernel_size: depthwise kernel size (odd).
        input_eps: epsilon of the input feature ``log(n * attn + eps)``.

    Returns:
        [Tv] float32 logits; a per-sample softmax gives the predicted relevance.
    """
    return torch.ops.tokenprune.mapper_forward(
        attn, cu_seqlens_v, list(params), int(kernel_size), float(input_eps)
    )
