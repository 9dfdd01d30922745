"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: what the shared seam (``patch.py``) needs to know.

In transformers 5.17 - 5.23 ``Qwen*VLModel.forward`` computes the visual features, asks
``get_placeholder_mask`` where they go, ``masked_scatter``s them into ``inputs_embeds``, computes
the M-RoPE position ids (``compute_3d_position_ids`` / ``get_rope_index``, or takes the ones
``generate()`` prepared) and calls ``self.language_model(inputs_embeds=..., position_ids=...,
attention_mask=..., [visual_pos_masks=..., deepstack_visual_embeds=...])``. The seam of
``patch.py`` prunes between the merge and the language model; this module says:

- layer 0 (:func:`layer0_of`): the text model's first decoder layer (q/k norms for Qwen3), its
  M-RoPE ``rotary_emb`` and its modeling module's ``apply_rotary_pos_emb``;
- positions: the language model receives ``[3, B, L]`` t/h/w ids, or ``[4, B, L]`` with a leading
  text row that transformers only reads to detect packed sequences (``generate()`` passes those).
  Kept tokens keep their original t/h/w ids; the text row of the pruned call is replaced by
  contiguous positions so that FlashAttention does not take the gaps for sequence boundaries;
- decoding: ``rope_deltas`` stays in the UNPRUNED frame (the model's own value), as do the
  ``position_ids`` ``generate()`` carries, so a decoded token gets exactly the id it would have had
  without pruning; a continuation call that brings no ``position_ids`` gets unpruned-frame text
  positions (``cumsum(mask) - 1``, or the cache length plus the removed count) plus
  ``rope_deltas``;
- deepstack (Qwen3-VL): the features added to the first decoder layers at ``visual_pos_masks``
  are pruned with the same kept set;
- structural tokens: ``<|vision_start|>`` / ``<|vision_end|>`` (``config.vision_start_token_id``,
  ``config.vision_end_token_id``) frame each image / video (frame); they are never instruction
  tokens, so ``...<image><|vision_end|>`` with no text after it has no instruction (an error)
  rather than the instruction ``<|vision_end|>``.

Batched generation with left padding works as unpruned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune_kernels.transformers import patch as _patch
from tokenprune_kernels.transformers.patch import Continuation, FamilySpec, GenerationState
from tokenprune_kernels.transformers.prune import (
    InstructionMaskSpec,
    Layer0,
    PrunedInputs,
    TokenPruneConfig,
    layer0_from_text_model,
)

MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def layer0_of(base: nn.Module) -> Layer0:
    """The :class:`~tokenprune_kernels.transformers.prune.Layer0` of a Qwen VL model's LLM
    (``base`` = the ``Qwen*VLModel``). Its rotary takes ``[3, 1, T]`` M-RoPE ids; a leading text
    row of ``[4, 1, T]`` ids is skipped."""
    layer0 = layer0_from_text_model(base.language_model)
    rotary_emb = layer0.rotary

    def rotary(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return rotary_emb(x, position_ids)

    layer0.rotary = rotary
    return layer0


def _prefill_positions(
    position_ids: torch.Tensor | None, b: int, length: int, device: torch.device
) -> torch.Tensor:
    if position_ids is None:  # what the text model does without ids
        return torch.arange(length, device=device).view(1, 1, -1).expand(3, b, -1)
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, -1, -1)
    return position_ids


def _lm_position_ids(pruned: PrunedInputs) -> torch.Tensor:
    pos = pruned.position_ids
    if pos.shape[0] == 4:  # the text row: contiguous, not the gapped originals
        pos = torch.cat([pruned.text_positions()[None].to(pos), pos[1:]], dim=0)
    return pos


def _continuation_positions(
    base: nn.Module, st: GenerationState, call: Continuation
) -> torch.Tensor:
    """``[3, B, q]`` M-RoPE ids of the tokens of a call that continues a pruned cache, in the
    unpruned frame (what the unpruned model gives them)."""
    attention_mask, past_length, query_length, device = call
    removed = st.removed.to(device)
    b = removed.shape[0]
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.int64)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        if m.shape[-1] != st.full_length + (past_length - st.pruned_length) + query_length:
            pos = pos + removed[:, None]  # a mask in the pruned frame counts the kept tokens
        pos = pos[:, -query_length:]
    else:
        pos = (past_length + torch.arange(query_length, device=device))[None] + removed[:, None]
    deltas = base.rope_deltas
    if deltas is not None:
        deltas = deltas.to(device).reshape(-1, 1)
        pos = pos + deltas.repeat_interleave(b // deltas.shape[0], dim=0)
    return pos[None].expand(3, b, query_length)


def _prune_deepstack(a: dict[str, Any], pruned: PrunedInputs) -> None:
    """Qwen3-VL: keep the deepstack rows of the kept visual tokens; prune ``visual_pos_masks``."""
    vpm = a.get("visual_pos_masks")
    ds = a.get("deepstack_visual_embeds")
    if vpm is None:
        return
    vpm = vpm.to(pruned.keep_mask.device)
    if vpm.dim() == 3:
        vpm = vpm[..., 0]
    keep_rows = pruned.keep_mask[vpm]  # row-major over the visual positions, as the features
    a["visual_pos_masks"] = pruned.prune_like(vpm, False) & pruned.attention_mask.bool()
    if ds is not None:
        a["deepstack_visual_embeds"] = [d[keep_rows.to(d.device)] for d in ds]


def _structural_token_ids(config: Any) -> tuple[int, ...]:
    """``<|vision_start|>`` and ``<|vision_end|>``: they frame each image / video (frame)."""
    ids = (
        getattr(config, "vision_start_token_id", None),
        getattr(config, "vision_end_token_id", None),
    )
    return tuple(int(i) for i in ids if i is not None)


SPEC = FamilySpec(
    name="qwen",
    model_types=MODEL_TYPES,
    description="a Qwen VL model",
    inner_classes="Qwen2VLModel, Qwen2_5_VLModel, Qwen3VLModel",
    inner_attrs=("rope_deltas",),
    layer0=layer0_of,
    prefill_positions=_prefill_positions,
    continuation_positions=_continuation_positions,
    lm_position_ids=_lm_position_ids,
    prune_lm_kwargs=_prune_deepstack,
    structural_token_ids=_structural_token_ids,
)


def install(
    model: nn.Module, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec = None
) -> None:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL instance (or replace the config of a patched
    one). See ``patch.py`` for what is wrapped."""
    _patch.install(model, SPEC, config, instruction_mask)


uninstall = _patch.uninstall

__all__ = ["MODEL_TYPES", "SPEC", "install", "layer0_of", "uninstall"]
