"""Stage d: gather of the kept tokens, and the merge that builds the pruned input sequence.

``torch.ops.tokenprune.gather_kept`` and ``torch.ops.tokenprune.merge_kept``; also the Python
side of their compiled kernels ``_gather_kept`` and ``_merge_kept``: fakes, and the adapters that
give them the stage's calling convention (the kernels take ``[R, T]`` position ids only); and of
the CUDA-only fused kernels ``_select_gather_kept`` / ``_select_merge_kept`` (selection fused with
the gather / the merge, sized by the host-known ``total_kept``: no synchronisation).
"""

from __future__ import annotations

import torch

from tokenprune_kernels import backend
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import define
from tokenprune_kernels.ops.select import _select_topk_fake

GATHER_SCHEMA = (
    "gather_kept(Tensor visual_embeds, Tensor position_ids, Tensor kept_idx) -> (Tensor, Tensor)"
)
MERGE_SCHEMA = (
    "merge_kept(Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, "
    "Tensor visual_embeds, Tensor visual_idx, Tensor cu_seqlens_v, Tensor kept_idx) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def fake_gathered(visual_embeds, position_ids, n):
    """Empty outputs of a gather of ``n`` rows: [n, H] and [n] or [R, n]."""
    embeds = visual_embeds.new_empty((n, visual_embeds.shape[1]))
    return embeds, position_ids.new_empty((*position_ids.shape[:-1], n))


def _gather_fake(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    return fake_gathered(visual_embeds, position_ids, kept_idx.shape[0])


def _gather_impl(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    v.check_kept_idx_values(kept_idx, visual_embeds.shape[0])
    device = visual_embeds.device.type
    return backend.call("gather_kept", device, visual_embeds, position_ids, kept_idx)


define(GATHER_SCHEMA, _gather_impl, _gather_fake)


def fake_merged(inputs_embeds, position_ids, cu_seqlens):
    """Empty outputs of a merge (a data-dependent number of rows)."""
    n = torch.library.get_ctx().new_dynamic_size()
    embeds, pos = fake_gathered(inputs_embeds, position_ids, n)
    return embeds, pos, torch.empty_like(cu_seqlens), inputs_embeds.new_empty(n, dtype=torch.int64)


def _merge_fake(*args, **kwargs):
    a = v.MergeArgs(*args, **kwargs)
    v.check_merge(a)
    return fake_merged(a.inputs_embeds, a.position_ids, a.cu_seqlens)


def _merge_impl(*args, **kwargs):
    a = v.MergeArgs(*args, **kwargs)
    v.check_merge(a)
    v.check_merge_values(a)
    return backend.call("merge_kept", a.inputs_embeds.device.type, *a)


define(MERGE_SCHEMA, _merge_impl, _merge_fake)


# ------------------------------------------------------------------ the compiled kernels' side


def _gather_kept_fake(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    v.check_rank("position_ids", position_ids, 2, "[rows, total_v]")
    return fake_gathered(visual_embeds, position_ids, kept_idx.shape[0])


def _merge_kept_fake(*args, **kwargs):
    a = v.MergeArgs(*args, **kwargs)
    v.check_merge(a)
    v.check_rank("position_ids", a.position_ids, 2, "[rows, total_len]")
    return fake_merged(a.inputs_embeds, a.position_ids, a.cu_seqlens)


def _rows2d(position_ids: torch.Tensor) -> torch.Tensor:
    return position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)


def _like(out: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return out if position_ids.dim() == 2 else out.squeeze(0)


def _gather_kept_compiled(visual_embeds, position_ids, kept_idx):
    """``_gather_kept`` in the stage's convention (1-D position ids too)."""
    embeds, pos = torch.ops.tokenprune._gather_kept(visual_embeds, _rows2d(position_ids), kept_idx)
    return embeds, _like(pos, position_ids)


def _merge_kept_compiled(*args):
    """``_merge_kept`` in the stage's convention (1-D position ids too)."""
    a = v.MergeArgs(*args)
    embeds, pos, cu_out, src = torch.ops.tokenprune._merge_kept(
        *a._replace(position_ids=_rows2d(a.position_ids))
    )
    return embeds, _like(pos, a.position_ids), cu_out, src


def _select_gather_kept_fake(scores, cu_seqlens_v, keep_counts, total_kept, visual_embeds,
                             position_ids):  # fmt: skip
    """Fake of ``_select_gather_kept`` (its schema's order: ``total_kept`` after the counts)."""
    kept, cu_kept = _select_topk_fake(scores, cu_seqlens_v, keep_counts, total_kept)
    embeds, pos = _gather_kept_fake(visual_embeds, position_ids, kept)
    return embeds, pos, kept, cu_kept


def _select_merge_kept_fake(scores, cu_seqlens_v, keep_counts, total_kept, inputs_embeds,
                            position_ids, cu_seqlens, visual_embeds, visual_idx):  # fmt: skip
    """Fake of ``_select_merge_kept``: the merge keeps every text row and ``total_kept`` visual
    rows, so its size is known without the data."""
    kept, _ = _select_topk_fake(scores, cu_seqlens_v, keep_counts, total_kept)
    v.check_rank("position_ids", position_ids, 2, "[rows, total_len]")
    n = inputs_embeds.shape[0] - visual_embeds.shape[0] + total_kept
    return (
        inputs_embeds.new_empty((n, inputs_embeds.shape[1])),
        position_ids.new_empty((position_ids.shape[0], n)),
        torch.empty_like(cu_seqlens),
        inputs_embeds.new_empty(n, dtype=torch.int64),
        kept,
    )


def _total(keep_counts: torch.Tensor, total_kept: int | None) -> int:
    # Only when the caller did not pass the total: one device read (a synchronisation).
    return int(keep_counts.sum()) if total_kept is None else total_kept


def _select_gather_kept_compiled(
    scores, cu_seqlens_v, keep_counts, visual_embeds, position_ids, *, total_kept=None
):
    """``_select_gather_kept`` in the fused pair's convention (``total_kept`` a keyword, 1-D
    position ids too): (embeds, position ids, kept_idx, cu_seqlens_kept)."""
    embeds, pos, kept, cu_kept = torch.ops.tokenprune._select_gather_kept(
        scores, cu_seqlens_v, keep_counts, _total(keep_counts, total_kept), visual_embeds,
        _rows2d(position_ids),
    )  # fmt: skip
    return embeds, _like(pos, position_ids), kept, cu_kept


def _select_merge_kept_compiled(
    scores, cu_seqlens_v, keep_counts, inputs_embeds, position_ids, cu_seqlens, visual_embeds,
    visual_idx, *, total_kept=None
):  # fmt: skip
    """``_select_merge_kept`` in the fused pair's convention (``total_kept`` a keyword, 1-D
    position ids too): (embeds, position ids, cu_seqlens, src_idx, kept_idx)."""
    embeds, pos, cu_out, src, kept = torch.ops.tokenprune._select_merge_kept(
        scores, cu_seqlens_v, keep_counts, _total(keep_counts, total_kept), inputs_embeds,
        _rows2d(position_ids), cu_seqlens, visual_embeds, visual_idx,
    )  # fmt: skip
    return embeds, _like(pos, position_ids), cu_out, src, kept


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
