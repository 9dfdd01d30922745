"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: prune the visual tokens at the LLM input.

The seam
--------
In transformers 5.17 - 5.23 ``Qwen*VLModel.forward`` computes the visual features, asks
``get_placeholder_mask`` where they go, ``masked_scatter``s them into ``inputs_embeds``, computes
the M-RoPE position ids (``compute_3d_position_ids`` / ``get_rope_index``, or takes the ones
``generate()`` prepared) and calls ``self.language_model(inputs_embeds=..., position_ids=...,
attention_mask=..., [visual_pos_masks=..., deepstack_visual_embeds=...])``. We patch the
INSTANCE (never the class) with thin wrappers, so ``revert_tokenprune`` restores it exactly:

- ``base.get_placeholder_mask``: records the image / video masks the merge used (the model's own
  rule, ``input_ids`` or ``inputs_embeds`` alike).
- ``base.language_model.forward``: the pruning point. It receives the merged embeddings and the
  FULL-sequence position ids computed by the model itself, runs :func:`core.prune_inputs` (the
  model's own layer-0 input norm, q/k projections, q/k norms for Qwen3 and rotary embedding on
  the instruction queries and the keys they see; the ``prune_and_merge`` op) and calls the
  original language model on the shorter sequence. Kept tokens keep their original t/h/w ids.
  The attention implementation is whatever the model was loaded with; ``output_attentions`` is
  never used. With 4-row ids (``generate()`` prepends a text row that transformers only reads to
  detect packed sequences) the text row is replaced by contiguous positions so FlashAttention
  does not take the gaps for sequence boundaries; 3-row ids carry no text row.
  Qwen3-VL's deepstack features (added to the first decoder layers at ``visual_pos_masks``)
  are pruned with the same kept set.
- ``base.forward``: per-call bookkeeping (which call is a new prefill, which continues a pruned
  cache: translate the mask, supply positions).
- the outer ``forward`` (``...ForConditionalGeneration`` only): when ``labels`` are given, prunes
  them the same way (``-100`` at pads) and computes the loss on the pruned logits.

Outputs (logits, hidden states) have the pruned length; ``last_pruned(model)`` says which
original positions they are (``keep_mask``, ``index``).

Generation
----------
``rope_deltas`` stays in the UNPRUNED frame (the model's own value), as do the ``position_ids``
``generate()`` carries, so a decoded token gets exactly the id it would have had without pruning.
A call that continues the pruned cache (same cache object) gets its 2-D mask translated to the
pruned frame (:class:`core.GenerationState`); when such a call brings no ``position_ids`` we
supply them: unpruned-frame text positions (``cumsum(mask) - 1``, or the cache length plus the
removed count) plus ``rope_deltas``. Batched generation with left padding works as unpruned.
Not supported: compileable (static) caches (clear error); visual tokens arriving after a
non-empty cache (warned, run unpruned); ``generate(use_cache=False)`` re-prunes the whole
sequence at every step, so the generated tokens join the instruction tokens there.

Instruction tokens
------------------
By default the real tokens after the last visual token of each sample (the user's text after the
image/video and the assistant header); ``apply_tokenprune(..., instruction_mask=...)`` overrides.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.transformers.core import (
    GenerationState,
    InstructionMaskSpec,
    Layer0,
    PrunedInputs,
    TokenPruneConfig,
    TokenPrunePatch,
    attach_patch,
    cache_length,
    detach_patch,
    get_patch,
    prune_inputs,
    resolve_instruction_mask,
)

MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(outer ...ForConditionalGeneration or None, the ...Model with the merge)."""

    def is_base(m: Any) -> bool:
        return all(hasattr(m, a) for a in ("language_model", "get_placeholder_mask", "rope_deltas"))

    if is_base(model):
        return None, model
    inner = getattr(model, "model", None)
    if inner is not None and is_base(inner):
        return model, inner
    raise ValueError(
        f"{type(model).__name__} is not a Qwen VL model this version supports: expected a "
        "...VLModel (language_model, get_placeholder_mask, rope_deltas) or a model whose .model "
        "is one"
    )


def layer0_of(base: nn.Module) -> Layer0:
    """The :class:`~tokenprune_kernels.transformers.core.Layer0` of a Qwen VL model's LLM.

    Uses the first decoder layer's modules, the text model's rotary embedding (M-RoPE; a leading
    text row of 4-row ids is skipped) and the modeling module's ``apply_rotary_pos_emb``.
    """
    lm = base.language_model
    layer = lm.layers[0]
    module = sys.modules[type(layer.self_attn).__module__]
    rotary_emb = lm.rotary_emb

    def rotary(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return rotary_emb(x, position_ids)

    return Layer0.from_decoder_layer(layer, rotary, module.apply_rotary_pos_emb)


def _binder(fn: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    """Normalise (args, kwargs) of ``fn`` into one dict of keyword arguments."""
    sig = inspect.signature(fn)
    var_kw = next(
        (p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    def bind(*args: Any, **kwargs: Any) -> dict[str, Any]:
        bound = sig.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        if var_kw is not None:
            out.update(out.pop(var_kw, {}))
        return out

    return bind


def _query_length(a: dict[str, Any]) -> int:
    if a.get("inputs_embeds") is not None:
        return int(a["inputs_embeds"].shape[1])
    if a.get("input_ids") is not None:
        return int(a["input_ids"].shape[1])
    return 0


def _continuation_positions(
    base: nn.Module,
    st: GenerationState,
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    device: torch.device,
) -> torch.Tensor:
    """``[3, B, q]`` M-RoPE ids of the tokens of a call that continues a pruned cache, in the
    unpruned frame (what the unpruned model gives them)."""
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


def _prune_deepstack(a: dict[str, Any], visual: torch.Tensor, pruned: PrunedInputs) -> None:
    """Qwen3-VL: keep the deepstack rows of the kept visual tokens; prune ``visual_pos_masks``."""
    vpm = a.get("visual_pos_masks")
    ds = a.get("deepstack_visual_embeds")
    if vpm is None:
        return
    vpm = vpm.to(visual.device)
    if vpm.dim() == 3:
        vpm = vpm[..., 0]
    keep_rows = pruned.keep_mask[vpm]  # row-major over the visual positions, as the features
    new_vpm = pruned.prune_like(vpm, False) & pruned.attention_mask.bool()
    a["visual_pos_masks"] = new_vpm
    if ds is not None:
        a["deepstack_visual_embeds"] = [d[keep_rows.to(d.device)] for d in ds]


def _make_wrappers(patch: TokenPrunePatch, top: nn.Module | None, base: nn.Module) -> None:
    lm = base.language_model
    orig_lm = lm.forward
    orig_base = base.forward
    orig_mask = base.get_placeholder_mask
    bind_lm, bind_base, bind_mask = _binder(orig_lm), _binder(orig_base), _binder(orig_mask)

    @functools.wraps(orig_mask)
    def get_placeholder_mask(*args: Any, **kwargs: Any) -> Any:
        image_mask, video_mask = orig_mask(*args, **kwargs)
        record = patch.scratch.get("masks")
        if record is not None:
            a = bind_mask(*args, **kwargs)
            if a.get("image_features") is not None:
                record.append(image_mask)
            if a.get("video_features") is not None:
                record.append(video_mask)
        return image_mask, video_mask

    @functools.wraps(orig_base)
    def base_forward(*args: Any, **kwargs: Any) -> Any:
        a = bind_base(*args, **kwargs)
        past = a.get("past_key_values")
        st = patch.generation
        patch.scratch.pop("masks", None)
        patch.scratch.pop("input_ids", None)
        if st is not None and st.continues(past):
            past_len, q_len = cache_length(past), _query_length(a)
            mask = a.get("attention_mask")
            if a.get("position_ids") is None and q_len > 0:
                device = next(base.parameters()).device
                a["position_ids"] = _continuation_positions(base, st, mask, past_len, q_len, device)
            a["attention_mask"] = st.translate_attention_mask(mask, past_len, q_len)
            return orig_base(**a)
        patch.scratch["masks"] = []
        patch.scratch["input_ids"] = a.get("input_ids")
        try:
            return orig_base(**a)
        finally:
            patch.scratch.pop("masks", None)
            patch.scratch.pop("input_ids", None)

    @functools.wraps(orig_lm)
    def lm_forward(*args: Any, **kwargs: Any) -> Any:
        masks = patch.scratch.get("masks")
        if not masks:
            return orig_lm(*args, **kwargs)
        a = bind_lm(*args, **kwargs)
        embeds = a.get("inputs_embeds")
        if embeds is None:
            return orig_lm(**a)
        visual = masks[0][..., 0] if masks[0].dim() == 3 else masks[0]
        for m in masks[1:]:
            visual = visual | (m[..., 0] if m.dim() == 3 else m)
        visual = visual.to(embeds.device)
        if not bool(visual.any()):
            return orig_lm(**a)
        past = a.get("past_key_values")
        if cache_length(past) > 0:
            warnings.warn(
                "tokenprune: visual tokens arrive after a non-empty KV cache; pruning needs the "
                "whole prompt in one call, so this call runs unpruned",
                stacklevel=2,
            )
            return orig_lm(**a)
        mask = a.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise NotImplementedError(
                "token pruning needs a 2-D attention_mask (1 real / 0 pad); compileable (static) "
                "caches make generate() pass 4-D masks for the unpruned length: use the default "
                "DynamicCache"
            )
        b, length = visual.shape
        pos = a.get("position_ids")
        if pos is None:  # what the text model does without ids
            pos = torch.arange(length, device=embeds.device).view(1, 1, -1).expand(3, b, -1)
        elif pos.dim() == 2:
            pos = pos[None].expand(3, -1, -1)
        instr = resolve_instruction_mask(
            patch.instruction_mask, patch.scratch.get("input_ids"), visual, mask
        )
        pruned = prune_inputs(
            embeds, visual, pos, layer0_of(base), patch.config,
            attention_mask=mask, instruction_mask=instr,
        )  # fmt: skip
        new_pos = pruned.position_ids
        if new_pos.shape[0] == 4:
            new_pos = torch.cat([pruned.text_positions()[None].to(new_pos), new_pos[1:]], dim=0)
        a["inputs_embeds"] = pruned.inputs_embeds
        a["position_ids"] = new_pos
        a["attention_mask"] = (
            pruned.attention_mask if mask is not None or pruned.has_padding else None
        )
        _prune_deepstack(a, visual, pruned)
        out = orig_lm(**a)

        cache = getattr(out, "past_key_values", None)
        cache = past if cache is None else cache
        patch.last = pruned
        patch.scratch["pruned"] = pruned
        if cache is None:
            patch.generation = None
        else:
            st = GenerationState(
                full_length=length,
                pruned_length=pruned.attention_mask.shape[1],
                attention_mask=pruned.attention_mask,
                removed=pruned.removed,
                pruned=pruned,
            )
            st.bind_cache(cache)
            patch.generation = st
        return out

    patch.set_attr(base, "get_placeholder_mask", get_placeholder_mask)
    patch.set_attr(base, "forward", base_forward)
    patch.set_attr(lm, "forward", lm_forward)

    if top is None:
        return
    orig_top = top.forward
    bind_top = _binder(orig_top)
    named = set(inspect.signature(orig_top).parameters)

    @functools.wraps(orig_top)
    def top_forward(*args: Any, **kwargs: Any) -> Any:
        a = bind_top(*args, **kwargs)
        labels = a.pop("labels", None)
        if labels is None:
            return orig_top(**a)
        return_dict = a.pop("return_dict", None)
        patch.scratch.pop("pruned", None)
        out = orig_top(**a, return_dict=True)
        pruned = patch.scratch.pop("pruned", None)
        if pruned is not None:
            labels = pruned.prune_like(labels.to(out.logits.device), -100)
        loss_kwargs = {k: v for k, v in a.items() if k not in named}
        out.loss = top.loss_function(
            logits=out.logits,
            labels=labels,
            vocab_size=top.config.text_config.vocab_size,
            **loss_kwargs,
        )
        use_dict = getattr(top.config, "return_dict", True) if return_dict is None else return_dict
        return out if use_dict else out.to_tuple()

    patch.set_attr(top, "forward", top_forward)


def install(
    model: nn.Module, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec = None
) -> None:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL instance (or replace the config of a patched
    one). See the module docstring for what is wrapped."""
    if getattr(getattr(model, "config", None), "model_type", None) not in MODEL_TYPES:
        raise ValueError(
            f"qwen.install supports model types {list(MODEL_TYPES)}, got "
            f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}"
        )
    patch = get_patch(model)
    if patch is not None:
        patch.config = config
        patch.instruction_mask = instruction_mask
        return
    top, base = _parts(model)
    patch = TokenPrunePatch("qwen", config, instruction_mask)
    try:
        _make_wrappers(patch, top, base)
    except BaseException:
        patch.restore()
        raise
    attach_patch(model, patch)


def uninstall(model: nn.Module) -> None:
    """Restore every attribute :func:`install` set; harmless when not patched."""
    detach_patch(model)


__all__ = ["MODEL_TYPES", "install", "layer0_of", "uninstall"]
