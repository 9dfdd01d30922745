"""Stage a: layer-0 instruction-to-visual attention (``tokenprune::instruction_attention``)."""

from __future__ import annotations

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import register


def run_instruction_attention(
    q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale
):
    """Stage a on the chosen backend; the arguments are already validated."""
    args = (q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale)
    which = backend.choose("instruction_attention", q.device.type)
    if which in ("cpp", "cuda"):
        return torch.ops.tokenprune._instruction_attention(*args)
    if which == "triton":
        from tokenprune_kernels.triton import instruction_attention_triton

        return instruction_attention_triton(*args)
    return reference.instruction_attention_ref(*args)


def _impl(
    q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos=None, softmax_scale=None
):
    args = (q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos)
    v.check_instruction_attention(*args, softmax_scale)
    v.check_instruction_attention_values(*args)
    return run_instruction_attention(*args, softmax_scale)


def _fake(
    q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos=None, softmax_scale=None
):
    v.check_instruction_attention(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale
    )
    return q.new_empty(visual_idx.shape[0], dtype=torch.float32)


register("instruction_attention", _impl, _fake)


def instruction_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Layer-0 attention of the instruction queries on each visual token.

    Args:
        q: [Tq, Hq, D] float32/float16/bfloat16, instruction-token queries after rotary embedding.
        k: [Tk, Hk, D] same dtype, keys of every token the queries see (the sequence prefix up to
            the last instruction token), after rotary embedding. ``Hq % Hk == 0`` (GQA).
        cu_seqlens_q: [B+1] int32/int64 offsets of the queries.
        cu_seqlens_k: [B+1] int32/int64 offsets of the keys.
        visual_idx: [Tv] int32/int64, each visual token's position in its sample's key sequence,
            strictly increasing within a sample.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        q_pos: [Tq] int32/int64 position of each query in its key sequence (it sees keys
            ``0..q_pos``), or None when the queries are the last ``n_q`` keys of each sample.
        softmax_scale: logit scale; None means ``1/sqrt(D)``.

    Returns:
        [Tv] float32: per visual token, the causal softmax over ALL keys a query sees, read at
        that token's column and averaged over the ``Hq`` heads and the sample's ``n_q`` queries.
    """
    return torch.ops.tokenprune.instruction_attention(
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale
    )
