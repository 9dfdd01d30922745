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


def _instruction_attention_fake(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v,
                                q_pos=None, softmax_scale=None):  # fmt: skip
    v.check_instruction_attention(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v,
                                  q_pos, softmax_scale)  # fmt: skip
    return q.new_empty(visual_idx.shape[0], dtype=torch.float32)


def _mapper_forward_fake(attn, cu_seqlens_v, params, kernel_size, input_eps):
    v.check_mapper(attn, cu_seqlens_v, params, kernel_size, input_eps)
    return torch.empty_like(attn)


def _select_gather_kept_fake(scores, cu_seqlens_v, keep_counts, total_kept, visual_embeds,
                             position_ids):  # fmt: skip
    kept, cu_kept = _select_topk_fake(scores, cu_seqlens_v, keep_counts, total_kept)
    embeds, pos = _gather_kept_fake(visual_embeds, position_ids, kept)
    return embeds, pos, kept, cu_kept


def _select_merge_kept_fake(scores, cu_seqlens_v, keep_counts, total_kept, inputs_embeds,
                            position_ids, cu_seqlens, visual_embeds, visual_idx):  # fmt: skip
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


FAKES = {
    "_instruction_attention": _instruction_attention_fake,
    "_mapper_forward": _mapper_forward_fake,
    "_select_topk": _select_topk_fake,
    "_gather_kept": _gather_kept_fake,
    "_merge_kept": _merge_kept_fake,
    "_select_gather_kept": _select_gather_kept_fake,  # CUDA kernels only
    "_select_merge_kept": _select_merge_kept_fake,  # CUDA kernels only
}

if _extension.available():
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"tokenprune::{_name}", _fake, lib=LIB)
