"""Compatibility names: the model-agnostic core of the transformers integration now lives in
``prune.py`` (computing the pruned inputs: :class:`TokenPruneConfig`, :class:`Layer0`,
:func:`prune_packed`, :func:`prune_inputs`, the instruction rule) and ``patch.py`` (patching a
model: the shared seam, the patch record and the generation bookkeeping). Import from there or
from ``tokenprune_kernels.transformers``; the names below keep working."""

from __future__ import annotations

from tokenprune_kernels.transformers.patch import (
    PATCH_ATTR,
    SUPPORTED_TRANSFORMERS,
    GenerationState,
    TokenPrunePatch,
    attach_patch,
    cache_length,
    check_transformers_version,
    detach_patch,
    get_patch,
)
from tokenprune_kernels.transformers.prune import (
    InstructionMaskSpec,
    Layer0,
    PrunedInputs,
    TokenPruneConfig,
    default_instruction_mask,
    prune_inputs,
    resolve_instruction_mask,
)

__all__ = [
    "PATCH_ATTR",
    "SUPPORTED_TRANSFORMERS",
    "GenerationState",
    "InstructionMaskSpec",
    "Layer0",
    "PrunedInputs",
    "TokenPruneConfig",
    "TokenPrunePatch",
    "attach_patch",
    "cache_length",
    "check_transformers_version",
    "default_instruction_mask",
    "detach_patch",
    "get_patch",
    "prune_inputs",
    "resolve_instruction_mask",
]
