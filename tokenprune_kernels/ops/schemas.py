"""Schemas of every public op in ``torch.ops.tokenprune``.

``csrc/torch_bindings.cpp`` defines the same strings with ``TORCH_LIBRARY`` when the compiled
extension is built; when it is absent, :mod:`tokenprune_kernels.ops._library` defines them from this
table so the package still works on the reference path. ``tests/ops/test_schemas.py`` checks that
the two copies agree.

Packed ("varlen") layout, as in FlashAttention's varlen API: sample ``b`` owns rows
``cu_seqlens[b]:cu_seqlens[b + 1]`` of a packed tensor; ``cu_seqlens`` is int32 or int64, starts
at 0, never decreases and ends at the packed length.
"""

from __future__ import annotations

NAMESPACE = "tokenprune"

#: Public ops, name -> schema (without the namespace).
PUBLIC_SCHEMAS: dict[str, str] = {
    "instruction_attention": (
        "instruction_attention(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor visual_idx, Tensor cu_seqlens_v, Tensor? q_pos=None, float? softmax_scale=None) "
        "-> Tensor"
    ),
    "mapper_forward": (
        "mapper_forward(Tensor attn, Tensor cu_seqlens_v, Tensor[] params, int kernel_size, "
        "float input_eps) -> Tensor"
    ),
    "select_topk": (
        "select_topk(Tensor scores, Tensor cu_seqlens_v, float? keep_ratio=None, "
        "int? keep_count=None) -> (Tensor, Tensor)"
    ),
    "gather_kept": (
        "gather_kept(Tensor visual_embeds, Tensor position_ids, Tensor kept_idx) "
        "-> (Tensor, Tensor)"
    ),
    "merge_kept": (
        "merge_kept(Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, "
        "Tensor visual_embeds, Tensor visual_idx, Tensor cu_seqlens_v, Tensor kept_idx) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "prune_visual_tokens": (
        "prune_visual_tokens(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor visual_idx, Tensor cu_seqlens_v, Tensor visual_embeds, Tensor visual_position_ids, "
        "Tensor[] mapper_params, int mapper_kernel_size=5, float mapper_input_eps=0.0001, "
        "float? keep_ratio=None, int? keep_count=None, Tensor? q_pos=None, "
        "float? softmax_scale=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "prune_and_merge": (
        "prune_and_merge(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, Tensor visual_embeds, "
        "Tensor visual_idx, Tensor cu_seqlens_v, Tensor[] mapper_params, "
        "int mapper_kernel_size=5, float mapper_input_eps=0.0001, float? keep_ratio=None, "
        "int? keep_count=None, Tensor? q_pos=None, float? softmax_scale=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}

#: Private ops that exist only in the compiled extension (CPU and, when built, CUDA kernels).
#: Inputs are validated by the public op before these run; they re-check what memory safety needs.
COMPILED_SCHEMAS: dict[str, str] = {
    "_select_topk": (
        "_select_topk(Tensor scores, Tensor cu_seqlens_v, Tensor keep_counts, "
        "int? total_kept=None) -> (Tensor, Tensor)"
    ),
    "_gather_kept": (
        "_gather_kept(Tensor visual_embeds, Tensor position_ids, Tensor kept_idx) "
        "-> (Tensor, Tensor)"
    ),
    "_merge_kept": (
        "_merge_kept(Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, "
        "Tensor visual_embeds, Tensor visual_idx, Tensor cu_seqlens_v, Tensor kept_idx) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
}
