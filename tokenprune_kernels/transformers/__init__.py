"""One call to prune the visual tokens of a transformers multimodal model.

    from tokenprune_kernels.transformers import apply_tokenprune, revert_tokenprune

    apply_tokenprune(model, keep_ratio=0.5)                       # training-free (raw attention)
    apply_tokenprune(model, keep_ratio=0.25, mapper="qwen2vl.safetensors")   # the paper's method
    apply_tokenprune(model, keep_mass=0.9, max_keep_ratio=0.5, mapper=...)   # adaptive budget
    out = model.generate(**inputs, max_new_tokens=64)
    revert_tokenprune(model)

``apply_tokenprune`` dispatches on ``model.config.model_type`` to a family module that patches
the INSTANCE at the visual-token merge only (``qwen.py``: qwen2_vl, qwen2_5_vl, qwen3_vl;
``llava.py``: llava, llava_onevision). The language model then runs on the shorter sequence with
whatever attention implementation the model was loaded with (sdpa, flash_attention_2, eager); the
scores come from layer-0 queries and keys computed by the package, never from
``output_attentions``. Models without a transformers class (VILA1.5) call :func:`prune_inputs`
from their own code; engines that hold packed (varlen) tokens call :func:`prune_packed`.

Where things live:

- ``prune.py``: computing the pruned inputs, no model forward involved (:class:`Layer0`,
  :func:`prune_packed`, :func:`prune_inputs`, the default instruction rule);
- ``patch.py``: the one seam every family shares (placeholder recorder, language-model forward
  with its generation bookkeeping, label pruning), parameterised by a :class:`FamilySpec`;
- ``qwen.py`` / ``llava.py``: each family's spec (where layer 0 lives, position ids at prefill and
  in decoding, what else is pruned with the tokens).

A new family adds ``<family>.py`` with its ``SPEC`` and ``install``/``uninstall``, and its model
types in :data:`FAMILIES`.

Instruction tokens
------------------
The scores are the layer-0 attention of the INSTRUCTION tokens to the visual tokens. By default
they are the real tokens after the last visual token of each sample (for a chat prompt: the
user's text after the image/video and the assistant header the processor appends), except the
family's structural tokens, which mark visual content and ask nothing: Qwen VL's
``<|vision_start|>`` / ``<|vision_end|>`` (ids from the model config); LLaVA and LLaVA-OneVision
have none (the image newlines are visual tokens, and the chat template follows the image with
text). So a prompt with no text after its visual content - ``...<image><|vision_end|>`` - is an
error ("have visual tokens but no instruction tokens"), not a prompt whose instruction is
``<|vision_end|>``. ``apply_tokenprune(..., instruction_mask=...)`` overrides the rule;
:func:`default_instruction_mask_for` gives it to code that calls :func:`prune_inputs` itself.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import nn

from tokenprune_kernels.mapper import TokenMapper, load_mapper
from tokenprune_kernels.transformers.patch import (
    SUPPORTED_TRANSFORMERS,
    Continuation,
    FamilySpec,
    GenerationState,
    TokenPrunePatch,
    check_transformers_version,
    get_patch,
)
from tokenprune_kernels.transformers.prune import (
    InstructionMaskSpec,
    Layer0,
    PrunedInputs,
    PrunedPacked,
    TokenPruneConfig,
    check_instruction_mask,
    default_instruction_mask,
    layer0_from_text_model,
    packed_instruction_mask,
    prune_inputs,
    prune_packed,
)

# model_type -> family module (imported lazily).
FAMILIES: dict[str, str] = {
    "qwen2_vl": "qwen",
    "qwen2_5_vl": "qwen",
    "qwen3_vl": "qwen",
    "llava": "llava",
    "llava_onevision": "llava",
}


def _family_module(name: str) -> ModuleType:
    return importlib.import_module(f"tokenprune_kernels.transformers.{name}")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"model must be a transformers model with config.model_type, got {type(model).__name__}"
        )
    return str(model_type)


def _family_of(model: nn.Module, caller: str) -> str:
    """The family module name of ``model`` (ValueError naming ``caller`` when unsupported)."""
    model_type = _model_type(model)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by {caller}; supported: "
            f"{sorted(FAMILIES)} (other LLaVA-style models: call "
            "tokenprune_kernels.transformers.prune_inputs from the model code)"
        )
    return family


def _resolve_mapper(
    mapper: TokenMapper | str | os.PathLike[str] | None, model: nn.Module
) -> TokenMapper | None:
    if mapper is None or isinstance(mapper, TokenMapper):
        return mapper
    if isinstance(mapper, (str, os.PathLike)):
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = "cpu"
        return load_mapper(mapper, device=device)  # safetensors only
    raise TypeError(
        "mapper must be None, a TokenMapper or a path to a .safetensors mapper, got "
        f"{type(mapper).__name__}"
    )


def default_instruction_mask_for(
    model: nn.Module,
    input_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The default instruction tokens of ``model``'s family for a prompt: the real tokens after
    the last visual token, except the family's structural tokens (Qwen VL:
    ``<|vision_start|>`` / ``<|vision_end|>``; LLaVA: none - what follows the image is text).
    What the patched model uses when ``instruction_mask`` is None; for code that calls
    :func:`prune_inputs` itself on a model of a supported family.

    Args:
        model: a model whose ``config.model_type`` is in :data:`FAMILIES`.
        input_ids: ``[B, L]`` int64 token ids of the prompt.
        visual_mask: ``[B, L]`` bool, True at visual tokens.
        attention_mask: ``[B, L]`` (1 real / 0 pad) or None.

    Returns:
        ``[B, L]`` bool.
    """
    ids = _family_module(
        _family_of(model, "default_instruction_mask_for")
    ).SPEC.structural_token_ids(model.config)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', input_ids)}"
        )
    structural = torch.isin(
        input_ids, torch.tensor(ids, dtype=input_ids.dtype).to(input_ids.device)
    )
    return default_instruction_mask(visual_mask, attention_mask, structural_mask=structural)


def apply_tokenprune(
    model: nn.Module,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    mapper: TokenMapper | str | os.PathLike[str] | None = None,
    instruction_mask: InstructionMaskSpec = None,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    spread_radius: int = 0,
) -> nn.Module:
    """Patch ``model`` (in place) so that its visual tokens are pruned at the LLM input.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`FAMILIES` (the
            ``...ForConditionalGeneration`` class or the bare ``...Model``).
        keep_ratio: fraction of each sample's visual tokens to keep, in ``(0, 1]``: any real
            number (``numbers.Real`` such as float or a numpy scalar, or a 0-d tensor; not bool).
        keep_count: or a fixed count per sample, an integer ``>= 1`` (int, numpy integer or 0-d
            integer tensor; not bool).
        mapper: None (training-free: raw layer-0 instruction attention is the score), a
            :class:`~tokenprune_kernels.mapper.TokenMapper`, or a path to a ``.safetensors``
            mapper (loaded with safetensors only, onto the model's device).
        instruction_mask: None for the default rule (the real tokens after the last visual token
            of each sample, structural tokens such as ``<|vision_end|>`` excluded; see the
            module docstring), a ``[B, L]`` bool or integer tensor, or a callable
            ``(input_ids | None, visual_mask [B, L], attention_mask | None) -> [B, L] bool``;
            checked here (a tensor's ``[B, L]`` is checked against each prompt).
        keep_mass: or the adaptive budget, in ``(0, 1]``: per sample the fewest top tokens whose
            predicted relevance (the mapper's softmax; without a mapper the layer-0 attention
            normalised per sample) sums to ``keep_mass``, bounded by ``min_keep_ratio`` and
            ``max_keep_ratio`` (fractions of the sample's visual tokens, ``0 <= min <= max <= 1``;
            at least one token). Exactly one of ``keep_ratio``, ``keep_count`` and ``keep_mass``
            (see :class:`TokenPruneConfig`). Costs one more host sync per pruned prefill.
        spread_radius: the spread rule (mapper v2's selection), an integer in ``[0, 64]``: 0
            (default) keeps the top-scored tokens; ``r > 0`` first takes tokens no better token
            already taken lies within Chebyshev distance ``r`` of in the same image or video
            frame, on the (h, w) of their M-RoPE ids (:class:`TokenPruneConfig`). Qwen VL
            only; LLaVA / LLaVA-OneVision raise ValueError here.

    Returns:
        ``model`` (patched). Applying again replaces the config; it never patches twice.

    Raises:
        RuntimeError: transformers outside :data:`SUPPORTED_TRANSFORMERS`.
        ValueError: unsupported ``model_type``, bad keep ratio/count/mass or spread radius,
            ``spread_radius > 0`` on a model with 1-D RoPE.
        TypeError: an ``instruction_mask`` that is not None, a bool/integer tensor or a callable
            (ValueError for a tensor that is not ``[B, L]``).
    """
    check_transformers_version()
    check_instruction_mask(instruction_mask)
    family = _family_of(model, "apply_tokenprune")
    config = TokenPruneConfig(
        keep_ratio=keep_ratio, keep_count=keep_count, mapper=_resolve_mapper(mapper, model),
        keep_mass=keep_mass, min_keep_ratio=min_keep_ratio, max_keep_ratio=max_keep_ratio,
        spread_radius=spread_radius,
    )  # fmt: skip
    patch = get_patch(model)
    if patch is not None and patch.family != family:
        revert_tokenprune(model)
    _family_module(family).install(model, config, instruction_mask)
    return model


def revert_tokenprune(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tokenprune` exactly (every patched instance attribute is restored).
    Harmless on a model that is not patched. Returns ``model``."""
    patch = get_patch(model)
    if patch is not None:
        _family_module(patch.family).uninstall(model)
    return model


def is_tokenprune_applied(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched."""
    return get_patch(model) is not None


def last_pruned(model: nn.Module) -> PrunedInputs | None:
    """The :class:`PrunedInputs` of the patched model's last pruned prefill (which original
    positions its outputs correspond to: ``keep_mask``, ``index``), or None."""
    patch = get_patch(model)
    return None if patch is None else patch.last


__all__ = [
    "FAMILIES",
    "SUPPORTED_TRANSFORMERS",
    "Continuation",
    "FamilySpec",
    "GenerationState",
    "InstructionMaskSpec",
    "Layer0",
    "PrunedInputs",
    "PrunedPacked",
    "TokenPruneConfig",
    "TokenPrunePatch",
    "apply_tokenprune",
    "check_instruction_mask",
    "check_transformers_version",
    "default_instruction_mask",
    "default_instruction_mask_for",
    "is_tokenprune_applied",
    "last_pruned",
    "layer0_from_text_model",
    "packed_instruction_mask",
    "prune_inputs",
    "prune_packed",
    "revert_tokenprune",
]
