"""tokenprune_kernels: explainability-guided visual-token pruning for multimodal LLMs.

Importing the package registers the ``torch.ops.tokenprune.*`` ops (loading the compiled
extension when it was built). Nothing here touches a device.
"""

from tokenprune_kernels import backend, reference
from tokenprune_kernels.ops import (
    gather_kept,
    instruction_attention,
    instruction_attention_heads,
    mapper_forward,
    mass_keep_counts,
    merge_kept,
    prune_and_merge,
    prune_visual_tokens,
    select_topk,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "backend",
    "gather_kept",
    "instruction_attention",
    "instruction_attention_heads",
    "mapper_forward",
    "mass_keep_counts",
    "merge_kept",
    "prune_and_merge",
    "prune_visual_tokens",
    "reference",
    "select_topk",
]
