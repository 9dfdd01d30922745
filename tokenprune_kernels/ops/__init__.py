"""Public ops: Python functions over ``torch.ops.tokenprune.*`` (importing defines them).

Each stage module defines its public op (schema, implementation, fake) and, where the op table
(:mod:`tokenprune_kernels.backend`) names a compiled kernel of it, that kernel's fake.
"""

from tokenprune_kernels.ops import _library
from tokenprune_kernels.ops.attention import instruction_attention
from tokenprune_kernels.ops.gather import gather_kept, merge_kept
from tokenprune_kernels.ops.mapper import mapper_forward
from tokenprune_kernels.ops.prune import prune_and_merge, prune_visual_tokens
from tokenprune_kernels.ops.select import select_topk

_library.register_kernel_fakes()

__all__ = [
    "gather_kept",
    "instruction_attention",
    "mapper_forward",
    "merge_kept",
    "prune_and_merge",
    "prune_visual_tokens",
    "select_topk",
]
