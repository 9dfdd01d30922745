"""Stage d: gather of the kept tokens, and the merge that builds the pruned input sequence.

``torch.ops.tokenprune.gather_kept`` and ``torch.ops.tokenprune.merge_kept``.
"""

from __future__ import annotations

import torch

from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import register


def run_gather_kept(visual_embeds, position_ids, kept_idx):
    """Stage d on the chosen backend; the arguments are already validated."""
    which = backend.choose("gather_kept", visual_embeds.device.type)
    if which == "triton":
        from tokenprune_kernels.triton import gather_kept_triton

        return gather_kept_triton(visual_embeds, position_ids, kept_idx)
    if which in ("cpp", "cuda"):
        pos2d = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        embeds, pos = torch.ops.tokenprune._gather_kept(visual_embeds, pos2d, kept_idx)
        return embeds, (pos if position_ids.dim() == 2 else pos.squeeze(0))
    return reference.gather_kept_ref(visual_embeds, position_ids, kept_idx)


def _gather_impl(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    v.check_kept_idx_values(kept_idx, visual_embeds.shape[0])
    return run_gather_kept(visual_embeds, position_ids, kept_idx)


def _gather_fake(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    n = kept_idx.shape[0]
    embeds = visual_embeds.new_empty((n, visual_embeds.shape[1]))
    return embeds, position_ids.new_empty((*position_ids.shape[:-1], n))


register("gather_kept", _gather_impl, _gather_fake)


def gather_kept(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept visual embeddings and their ORIGINAL position ids.

    Args:
        visual_embeds: [Tv, H] float32/float16/bfloat16.
        position_ids: [Tv] (1-D RoPE) or [R, Tv] (e.g. Qwen M-RoPE t/h/w) int32/int64.
        kept_idx: [Tkept] int64 global indices (from :func:`select_topk`).

    Returns:
        ([Tkept, H], [Tkept] or [R, Tkept]) in the input dtypes; the offsets are
        ``select_topk``'s ``cu_seqlens_kept``.
    """
    return torch.ops.tokenprune.gather_kept(visual_embeds, position_ids, kept_idx)


def run_merge_kept(
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
):
    """The merge on the chosen backend; the arguments are already validated."""
    which = backend.choose("merge_kept", inputs_embeds.device.type)
    if which == "triton":
        from tokenprune_kernels.triton import merge_kept_triton

        return merge_kept_triton(
            inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v,
            kept_idx,
        )  # fmt: skip
    if which in ("cpp", "cuda"):
        pos2d = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        embeds, pos, cu_out, src = torch.ops.tokenprune._merge_kept(
            inputs_embeds, pos2d, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
        )
        return embeds, (pos if position_ids.dim() == 2 else pos.squeeze(0)), cu_out, src
    return reference.merge_kept_ref(
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
    )


def _merge_impl(
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
):
    args = (
        inputs_embeds,
        position_ids,
        cu_seqlens,
        visual_embeds,
        visual_idx,
        cu_seqlens_v,
        kept_idx,
    )
    v.check_merge(*args)
    v.check_merge_values(inputs_embeds, cu_seqlens, visual_idx, cu_seqlens_v, kept_idx)
    return run_merge_kept(*args)


def _merge_fake(
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
):
    v.check_merge(
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
    )
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        inputs_embeds.new_empty((n, inputs_embeds.shape[1])),
        position_ids.new_empty((*position_ids.shape[:-1], n)),
        torch.empty_like(cu_seqlens),
        inputs_embeds.new_empty(n, dtype=torch.int64),
    )


register("merge_kept", _merge_impl, _merge_fake)


def merge_kept(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the pruned input sequence: every text row and every kept visual row, in order.

    This replaces a model's ``inputs_embeds.masked_scatter(visual_mask, visual_embeds)``.

    Args:
        inputs_embeds: [Tl, H] float32/float16/bfloat16, the full sequences' embeddings (rows at
            visual positions are placeholders and ignored).
        position_ids: [Tl] or [R, Tl] int32/int64, the full sequences' original position ids.
        cu_seqlens: [B+1] int32/int64 offsets of the full sequences.
        visual_embeds: [Tv, H] dtype of ``inputs_embeds``, the visual features.
        visual_idx: [Tv] int32/int64, each visual token's position in its sample's sequence,
            strictly increasing within a sample.
        cu_seqlens_v: [B+1] int32/int64 offsets of the visual tokens.
        kept_idx: [Tkept] int64 global visual indices to keep (from :func:`select_topk`).

    Returns:
        embeds: [To, H]; position_ids_out: [To] or [R, To] (gathered, never recomputed);
        cu_seqlens_out: [B+1], dtype of ``cu_seqlens``; src_idx: [To] int64, the packed
        full-sequence row each output row came from.
    """
    return torch.ops.tokenprune.merge_kept(
        inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx
    )
