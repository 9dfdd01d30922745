"""Stage a: layer-0 instruction-to-visual attention, averaged over every head
(``tokenprune::instruction_attention``, the paper's mapper input) or per group of query heads
(``tokenprune::instruction_attention_heads``, the input of a mapper with several attention
channels)."""

from __future__ import annotations

import torch

from tokenprune_kernels import backend
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import define

SCHEMA = (
    "instruction_attention(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "Tensor visual_idx, Tensor cu_seqlens_v, Tensor? q_pos=None, float? softmax_scale=None) "
    "-> Tensor"
)


def _fake(*args, **kwargs) -> torch.Tensor:
    s = v.ScoringArgs(*args, **kwargs)
    v.check_instruction_attention(s)
    return s.q.new_empty(s.visual_idx.shape[0], dtype=torch.float32)


def _impl(*args, **kwargs) -> torch.Tensor:
    s = v.ScoringArgs(*args, **kwargs)
    v.check_instruction_attention(s)
    v.check_instruction_attention_values(s)
    return backend.call("instruction_attention", s.q.device.type, *s)


define(SCHEMA, _impl, _fake)

HEADS_SCHEMA = (
    "instruction_attention_heads(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "Tensor visual_idx, Tensor cu_seqlens_v, Tensor? q_pos=None, float? softmax_scale=None, "
    "int? head_groups=None) -> Tensor"
)


def _heads_args(*args, **kwargs) -> tuple[v.ScoringArgs, int]:
    """A call of ``instruction_attention_heads`` as (the scoring arguments, checked ``G``)."""
    n = len(v.ScoringArgs._fields)
    head_groups = kwargs.pop("head_groups", args[n] if len(args) > n else None)
    s = v.ScoringArgs(*args[:n], **kwargs)
    v.check_instruction_attention(s)
    return s, v.check_head_groups(head_groups, s.q, s.k)


def _heads_fake(*args, **kwargs) -> torch.Tensor:
    s, groups = _heads_args(*args, **kwargs)
    return s.q.new_empty(s.visual_idx.shape[0], groups, dtype=torch.float32)


def _heads_impl(*args, **kwargs) -> torch.Tensor:
    s, groups = _heads_args(*args, **kwargs)
    v.check_instruction_attention_values(s)
    return backend.call("instruction_attention_heads", s.q.device.type, *s, groups)


define(HEADS_SCHEMA, _heads_impl, _heads_fake)


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


@v.flat_args(v.ScoringArgs)
def instruction_attention_heads(s: v.ScoringArgs, head_groups: int | None = None) -> torch.Tensor:
    """Layer-0 attention of the instruction queries on each visual token, per group of heads.

    Args (flat, bound as :class:`~tokenprune_kernels.validation.ScoringArgs`, then
    ``head_groups``):
        q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale: as in
            :func:`instruction_attention`.
        head_groups: ``G``, the output channels: an int >= 1 dividing ``Hq``; None means ``Hk``
            (one channel per KV head, i.e. per GQA group).

    Returns:
        [Tv, G] float32: channel ``g`` is :func:`instruction_attention`'s quantity averaged over
        the query heads ``g * Hq / G .. (g + 1) * Hq / G - 1`` only (the heads of KV head ``g``
        when ``G = Hk``); the mean over the channels is :func:`instruction_attention`.
    """
    return torch.ops.tokenprune.instruction_attention_heads(*s, head_groups)
