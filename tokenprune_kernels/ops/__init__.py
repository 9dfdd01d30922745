"""Public ops: Python functions over ``torch.ops.tokenprune.*`` (importing registers them)."""

from tokenprune_kernels.ops import compiled  # noqa: F401  (fakes of the private compiled ops)
from tokenprune_kernels.ops.attention import instruction_attention
from tokenprune_kernels.ops.gather import gather_kept, merge_kept
from tokenprune_kernels.ops.mapper import mapper_forward
from tokenprune_kernels.ops.prune import prune_and_merge, prune_visual_tokens
from tokenprune_kernels.ops.select import select_topk

__all__ = [
    "gather_kept",
    "instruction_attention",
    "mapper_forward",
    "merge_kept",
    "prune_and_merge",
    "prune_visual_tokens",
    "select_topk",
]
