"""Public ops: Python functions over ``torch.ops.tokenprune.*`` (importing defines them).

Each stage module defines its public op (schema, implementation, fake) and, where the op table
(:mod:`tokenprune_kernels.backend`) names a compiled kernel of it, that kernel's fake. The
functions are re-exported here by name (``import x as x``), with no second list of them.
"""

from tokenprune_kernels.ops import _library
from tokenprune_kernels.ops.attention import instruction_attention as instruction_attention
from tokenprune_kernels.ops.attention import (
    instruction_attention_heads as instruction_attention_heads,
)
from tokenprune_kernels.ops.gather import gather_kept as gather_kept
from tokenprune_kernels.ops.gather import merge_kept as merge_kept
from tokenprune_kernels.ops.mapper import mapper_forward as mapper_forward
from tokenprune_kernels.ops.prune import prune_and_merge as prune_and_merge
from tokenprune_kernels.ops.prune import prune_visual_tokens as prune_visual_tokens
from tokenprune_kernels.ops.select import mass_keep_counts as mass_keep_counts
from tokenprune_kernels.ops.select import select_topk as select_topk

_library.register_kernel_fakes()
