"""Fakes for the compiled extension's private ops (``torch.ops.tokenprune._*``).

Their kernels are C++/CUDA (csrc/); these fakes let them be traced by ``torch.compile`` and
checked by ``torch.library.opcheck`` like the public ops. Registered only when the extension
loaded (without it these ops do not exist).
"""

from __future__ import annotations

import torch

from tokenprune_kernels import _extension
from tokenprune_kernels import validation as v
from tokenprune_kernels.ops._library import LIB


def _select_topk_fake(scores, cu_seqlens_v, keep_counts, total_kept=None):
    v.check_rank("scores", scores, 1, "[total_v]")
    v.check_dtype("scores", scores, v.FLOAT_DTYPES)
    v.check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    v.check_rank("keep_counts", keep_counts, 1, "[batch] int64")
    kept = torch.library.get_ctx().new_dynamic_size() if total_kept is None else total_kept
    return scores.new_empty(kept, dtype=torch.int64), torch.empty_like(cu_seqlens_v)


def _gather_kept_fake(visual_embeds, position_ids, kept_idx):
    v.check_gather(visual_embeds, position_ids, kept_idx)
    v.check_rank("position_ids", position_ids, 2, "[rows, total_v]")
    n = kept_idx.shape[0]
    return (
        visual_embeds.new_empty((n, visual_embeds.shape[1])),
        position_ids.new_empty((position_ids.shape[0], n)),
    )


def _merge_kept_fake(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                     cu_seqlens_v, kept_idx):  # fmt: skip
    v.check_merge(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                  cu_seqlens_v, kept_idx)  # fmt: skip
    v.check_rank("position_ids", position_ids, 2, "[rows, total_len]")
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        inputs_embeds.new_empty((n, inputs_embeds.shape[1])),
        position_ids.new_empty((position_ids.shape[0], n)),
        torch.empty_like(cu_seqlens),
        inputs_embeds.new_empty(n, dtype=torch.int64),
    )


FAKES = {
    "_select_topk": _select_topk_fake,
    "_gather_kept": _gather_kept_fake,
    "_merge_kept": _merge_kept_fake,
}

if _extension.available():
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"tokenprune::{_name}", _fake, lib=LIB)
