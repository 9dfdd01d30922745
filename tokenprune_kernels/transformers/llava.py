"""LLaVA and LLaVA-OneVision (and, through :func:`layer0_from_text_model`, VILA-style models):
what the shared seam (``patch.py``) needs to know.

``LlavaModel.forward`` / ``LlavaOnevisionModel.forward`` (transformers 5.17 - 5.23) do::

    inputs_embeds = embed(input_ids)
    features = get_image_features(...)           # LLaVA-OV: anyres packing, image_newline
    mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features=...)
    inputs_embeds = inputs_embeds.masked_scatter(mask, features)
    (LLaVA-OV: the same again for video features)
    outputs = self.language_model(attention_mask=..., position_ids=..., past_key_values=...,
                                  inputs_embeds=inputs_embeds, **kwargs)

The seam leaves the vision tower, the projector, the anyres packing and the merge exactly as the
model does them and prunes between the merge and the language model. This module says:

- layer 0: the Llama / Qwen2 text model's first decoder layer, ``rotary_emb`` and
  ``apply_rotary_pos_emb`` (:func:`layer0_from_text_model`);
- positions: plain 1-D RoPE, ``[B, L]``; without ``position_ids`` the language model's own
  default, ``arange(L)``, is what kept tokens keep. A continuation call without ``position_ids``
  continues at the unpruned length (``arange(q) + L + decoded``);
- no structural tokens: the image newlines of LLaVA-OneVision are visual tokens (the processor
  counts them in the image placeholder), and the chat templates follow the image with text
  (``"\n" + question``), so every real token after the last visual one is instruction.

VILA1.5 and other LLaVA-style models without a transformers class
------------------------------------------------------------------
Their own model code calls the generic function instead of its ``masked_scatter`` + LLM call::

    from tokenprune_kernels.transformers import TokenPruneConfig, prune_inputs
    from tokenprune_kernels.transformers.llava import layer0_from_text_model

    layer0 = layer0_from_text_model(llm.model)        # a Llama/Qwen2-style decoder stack
    embeds = embeds.masked_scatter(visual_mask[..., None], visual_features)   # as before
    pruned = prune_inputs(embeds, visual_mask, position_ids, layer0,
                          TokenPruneConfig(keep_ratio=0.5), attention_mask=attention_mask)
    out = llm(inputs_embeds=pruned.inputs_embeds, position_ids=pruned.position_ids,
              attention_mask=pruned.attention_mask)

(always pass the pruned ``attention_mask``: with gapped position ids and no mask, transformers
would take the sequence for several packed ones; ``pruned.prune_like(labels, -100)`` prunes
labels.)
"""

from __future__ import annotations

import torch
from torch import nn

from tokenprune_kernels.transformers import patch as _patch
from tokenprune_kernels.transformers.patch import Continuation, FamilySpec, GenerationState
from tokenprune_kernels.transformers.prune import (
    InstructionMaskSpec,
    Layer0,
    TokenPruneConfig,
    layer0_from_text_model,
)

MODEL_TYPES: tuple[str, ...] = ("llava", "llava_onevision")
FAMILY = "llava"


def _layer0(inner: nn.Module) -> Layer0:
    return layer0_from_text_model(inner.language_model)


def _prefill_positions(
    position_ids: torch.Tensor | None, b: int, length: int, device: torch.device
) -> torch.Tensor:
    if position_ids is None:  # the language model's own default with an empty cache
        return torch.arange(length, device=device).expand(b, length)
    if position_ids.dim() == 2 and position_ids.shape[0] == 1 and b > 1:
        return position_ids.expand(b, length)
    return position_ids


def _continuation_positions(
    inner: nn.Module, st: GenerationState, call: Continuation
) -> torch.Tensor:
    """``[1, q]``: the unpruned model continues at ``arange(q)`` + its (unpruned) cache length."""
    start = call.past_length - st.pruned_length + st.full_length
    return torch.arange(start, start + call.query_length, device=call.device)[None]


SPEC = FamilySpec(
    name=FAMILY,
    model_types=MODEL_TYPES,
    description="a LLaVA-style transformers model",
    inner_classes="LlavaModel, LlavaOnevisionModel",
    inner_attrs=(),
    layer0=_layer0,
    prefill_positions=_prefill_positions,
    continuation_positions=_continuation_positions,
)


def install(
    model: nn.Module, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec
) -> None:
    """Patch ``model`` (a LLaVA / LLaVA-OneVision ``*ForConditionalGeneration`` or ``*Model``).

    Applying again only replaces ``config`` and ``instruction_mask`` (never patches twice).

    Raises:
        ValueError: ``config.spread_radius > 0``: the spread rule needs each visual token's
            (row, col) on its image grid, which 1-D RoPE ids do not carry (and the visual
            layout of LLaVA-OneVision's anyres tiles and newline tokens is no single grid).
    """
    if isinstance(config, TokenPruneConfig) and config.spread_radius > 0:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"spread_radius={config.spread_radius} is not supported for {model_type}: "
            "the spread rule reads the visual tokens' (t, h, w) from multi-axis rotary position "
            "ids (Qwen VL M-RoPE), and this family's are 1-D; use spread_radius=0"
        )
    _patch.install(model, SPEC, config, instruction_mask)


uninstall = _patch.uninstall

__all__ = ["FAMILY", "MODEL_TYPES", "SPEC", "install", "layer0_from_text_model", "uninstall"]
