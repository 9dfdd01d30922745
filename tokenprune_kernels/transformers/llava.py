"""LLaVA and LLaVA-OneVision (and, through :func:`layer0_from_text_model`, VILA-style models).

The seam
--------
``LlavaModel.forward`` / ``LlavaOnevisionModel.forward`` (transformers 5.17 - 5.23) do::

    inputs_embeds = embed(input_ids)
    features = get_image_features(...)           # LLaVA-OV: anyres packing, image_newline
    mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features=...)
    inputs_embeds = inputs_embeds.masked_scatter(mask, features)
    (LLaVA-OV: the same again for video features)
    outputs = self.language_model(attention_mask=..., position_ids=..., past_key_values=...,
                                  inputs_embeds=inputs_embeds, **kwargs)

The patch leaves the vision tower, the projector, the anyres packing and the merge exactly as the
model does them, and acts between the merge and the language model. Three INSTANCE attributes of
the inner ``*Model`` are set (the class is never touched):

- ``get_placeholder_mask``: calls the model's own and records which positions it filled (the
  image mask when image features were given, the video mask when video features were given);
- ``language_model.forward``: at a prefill that has visual tokens, calls
  :func:`~tokenprune_kernels.transformers.core.prune_inputs` (the model's own layer-0 input norm,
  q/k projections and rotary embedding on the needed rows only, then
  ``torch.ops.tokenprune.prune_and_merge``) and runs the language model on the pruned sequence
  with the attention implementation the model was loaded with. Kept tokens keep their ORIGINAL
  position ids (LLaVA uses 1-D RoPE; without ``position_ids`` the language model's own default,
  ``arange(L)``, is what is gathered). On later calls that continue the same KV cache, the
  unpruned attention mask that ``generate()`` carries is translated to the pruned frame and the
  default positions continue at the unpruned length (``GenerationState`` of ``core.py``);
- ``forward`` of the inner model: a scope that clears the per-call record, so nothing leaks from
  one call to the next.

On a ``*ForConditionalGeneration`` the top-level ``forward`` is also wrapped, only to prune
``labels`` like the sequence (``-100`` at pads) before the loss is computed.

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

import functools
import inspect
import sys
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

MODEL_TYPES: tuple[str, ...] = ("llava", "llava_onevision")
FAMILY = "llava"

__all__ = ["FAMILY", "MODEL_TYPES", "install", "layer0_from_text_model", "uninstall"]


def _inner_model(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` / ``LlavaOnevisionModel`` of ``model`` (itself, or ``model.model``)."""
    for candidate in (model, getattr(model, "model", None)):
        if (
            isinstance(candidate, nn.Module)
            and hasattr(candidate, "get_placeholder_mask")
            and isinstance(getattr(candidate, "language_model", None), nn.Module)
        ):
            return candidate
    raise ValueError(
        f"{type(model).__name__} is not a LLaVA-style transformers model: expected a module with "
        "get_placeholder_mask and language_model (LlavaModel, LlavaOnevisionModel) or one whose "
        ".model is such a module"
    )


def _apply_rotary_of(text_model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``apply_rotary_pos_emb`` of the text model's own modeling module (Llama's otherwise)."""
    module = sys.modules.get(type(text_model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


def layer0_from_text_model(text_model: nn.Module) -> Layer0:
    """:class:`Layer0` of a Llama/Qwen2-style decoder stack (``LlamaModel``, ``Qwen2Model``, or
    any module with ``layers[0]`` of that shape and a ``rotary_emb``).

    Args:
        text_model: the language model WITHOUT the lm_head (e.g. ``model.model.language_model``
            of LLaVA, ``llm.model`` of a ``LlamaForCausalLM``).

    Returns:
        A :class:`Layer0` using the model's own ``layers[0].input_layernorm``,
        ``self_attn.{q_proj, k_proj}``, ``rotary_emb`` and ``apply_rotary_pos_emb`` (1-D RoPE,
        position ids ``[B, L]``).
    """
    layers = getattr(text_model, "layers", None)
    rotary = getattr(text_model, "rotary_emb", None)
    if layers is None or len(layers) == 0 or rotary is None:
        raise ValueError(
            f"text_model must be a Llama/Qwen2-style decoder stack with .layers and .rotary_emb, "
            f"got {type(text_model).__name__}"
        )
    return Layer0.from_decoder_layer(layers[0], rotary, _apply_rotary_of(text_model))


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bind(sig: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call by name (positional ones included), ``**kwargs`` flattened."""
    if not args or sig is None:
        return dict(kwargs)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _visual_from_placeholder(out: Any, arguments: dict[str, Any]) -> torch.Tensor | None:
    """The ``[B, L]`` bool positions a ``get_placeholder_mask`` call is about to fill."""
    masks = out if isinstance(out, tuple) else (out,)
    if len(masks) == 1:  # LLaVA: the image mask
        chosen = [masks[0]]
    else:  # LLaVA-OneVision: (image mask, video mask); the features given say which is filled
        chosen = []
        if arguments.get("image_features") is not None:
            chosen.append(masks[0])
        if arguments.get("video_features") is not None:
            chosen.append(masks[1])
    visual = None
    for m in chosen:
        if isinstance(m, torch.Tensor):
            m = m[..., 0] if m.dim() == 3 else m
            visual = m.bool() if visual is None else (visual | m.bool())
    return visual


def install(
    model: nn.Module, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec
) -> None:
    """Patch ``model`` (a LLaVA / LLaVA-OneVision ``*ForConditionalGeneration`` or ``*Model``).

    Applying again only replaces ``config`` and ``instruction_mask`` (never patches twice).
    """
    patch = get_patch(model)
    if patch is not None and patch.family == FAMILY:
        patch.config = config
        patch.instruction_mask = instruction_mask
        return
    if patch is not None:
        detach_patch(model)
    inner = _inner_model(model)
    lm = inner.language_model
    layer0 = layer0_from_text_model(lm)
    patch = TokenPrunePatch(FAMILY, config, instruction_mask)

    orig_placeholder = inner.get_placeholder_mask
    orig_inner_forward = inner.forward
    orig_lm_forward = lm.forward
    sig_placeholder, sig_lm = _signature(orig_placeholder), _signature(orig_lm_forward)
    scratch = patch.scratch

    @functools.wraps(orig_placeholder)
    def get_placeholder_mask(*args: Any, **kwargs: Any) -> Any:
        out = orig_placeholder(*args, **kwargs)
        arguments = _bind(sig_placeholder, args, kwargs)
        visual = _visual_from_placeholder(out, arguments)
        if visual is not None:
            prev = scratch.get("visual")
            if prev is not None and prev.shape == visual.shape:
                visual = visual | prev
            scratch["visual"] = visual
            scratch["input_ids"] = arguments.get("input_ids")
        return out

    @functools.wraps(orig_inner_forward)
    def inner_forward(*args: Any, **kwargs: Any) -> Any:
        scratch.pop("visual", None)
        scratch.pop("input_ids", None)
        try:
            return orig_inner_forward(*args, **kwargs)
        finally:
            scratch.pop("visual", None)
            scratch.pop("input_ids", None)

    @functools.wraps(orig_lm_forward)
    def lm_forward(*args: Any, **kwargs: Any) -> Any:
        visual = scratch.pop("visual", None)
        input_ids = scratch.pop("input_ids", None)
        if args:  # LLaVA calls its language model with keywords only; be safe anyway
            kwargs = _bind(sig_lm, args, kwargs)
            args = ()
        embeds = kwargs.get("inputs_embeds")
        past = kwargs.get("past_key_values")
        if (
            visual is not None
            and isinstance(embeds, torch.Tensor)
            and tuple(visual.shape) == tuple(embeds.shape[:2])
            and bool(visual.any())
        ):
            return _pruned_prefill(patch, layer0, orig_lm_forward, kwargs, visual, input_ids)
        state = patch.generation
        if state is not None and state.continues(past):
            q_len = _query_length(kwargs)
            past_len = cache_length(past)
            kwargs["attention_mask"] = state.translate_attention_mask(
                kwargs.get("attention_mask"), past_len, q_len
            )
            if kwargs.get("position_ids") is None:
                # The unpruned model would continue at arange(q) + its cache length.
                start = past_len - state.pruned_length + state.full_length
                device = embeds.device if isinstance(embeds, torch.Tensor) else None
                kwargs["position_ids"] = torch.arange(start, start + q_len, device=device)[None]
        elif past is None or cache_length(past) == 0:
            patch.generation = None  # a new prompt without visual tokens: nothing to translate
        return orig_lm_forward(**kwargs)

    patch.set_attr(inner, "get_placeholder_mask", get_placeholder_mask)
    patch.set_attr(inner, "forward", inner_forward)
    patch.set_attr(lm, "forward", lm_forward)
    if inner is not model:
        orig_outer_forward = model.forward
        sig_outer = _signature(orig_outer_forward)

        @functools.wraps(orig_outer_forward)
        def outer_forward(*args: Any, **kwargs: Any) -> Any:
            arguments = _bind(sig_outer, args, kwargs)
            labels = arguments.get("labels")
            if labels is None:
                return orig_outer_forward(*args, **kwargs)
            return _forward_with_labels(model, patch, orig_outer_forward, arguments)

        patch.set_attr(model, "forward", outer_forward)
    attach_patch(model, patch)


def uninstall(model: nn.Module) -> None:
    """Restore every attribute :func:`install` set; harmless when ``model`` is not patched."""
    detach_patch(model)


def _query_length(kwargs: dict[str, Any]) -> int:
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return int(embeds.shape[1])
    ids = kwargs.get("input_ids")
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) else 1


def _pruned_prefill(
    patch: TokenPrunePatch,
    layer0: Layer0,
    orig_lm_forward: Callable[..., Any],
    kwargs: dict[str, Any],
    visual: torch.Tensor,
    input_ids: torch.Tensor | None,
) -> Any:
    """Prune the merged prompt and run the language model on it."""
    embeds: torch.Tensor = kwargs["inputs_embeds"]
    past = kwargs.get("past_key_values")
    if cache_length(past) > 0:
        raise NotImplementedError(
            "token pruning: visual tokens after a non-empty KV cache (a new image in a continued "
            "conversation) are not supported; start from an empty cache or revert_tokenprune"
        )
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        raise NotImplementedError(
            "token pruning needs a 2-D [B, L] attention_mask (1 real / 0 pad) or None at prefill, "
            f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}; compileable "
            "(static) caches build 4-D masks: use the default DynamicCache"
        )
    b, length = embeds.shape[:2]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # the language model's own default with an empty cache
        position_ids = torch.arange(length, device=embeds.device).expand(b, length)
    elif position_ids.dim() == 2 and position_ids.shape[0] == 1 and b > 1:
        position_ids = position_ids.expand(b, length)
    visual = visual.to(embeds.device)
    instr = resolve_instruction_mask(patch.instruction_mask, input_ids, visual, attention_mask)
    pruned: PrunedInputs = prune_inputs(
        embeds,
        visual,
        position_ids,
        layer0,
        patch.config,
        attention_mask=attention_mask,
        instruction_mask=instr,
    )
    kwargs["inputs_embeds"] = pruned.inputs_embeds
    kwargs["position_ids"] = pruned.position_ids
    # Always a mask: with gapped position ids, no mask and no cache, transformers would read the
    # sequence as several packed ones.
    kwargs["attention_mask"] = pruned.attention_mask
    lm_config = getattr(orig_lm_forward.__self__, "config", None)
    if "flash" in str(getattr(lm_config, "_attn_implementation", "")):
        kwargs.update(pruned.flash_kwargs())
    out = orig_lm_forward(**kwargs)
    state = GenerationState(
        full_length=length,
        pruned_length=int(pruned.inputs_embeds.shape[1]),
        attention_mask=pruned.attention_mask,
        removed=pruned.removed,
        pruned=pruned,
    )
    cache = getattr(out, "past_key_values", None)
    state.bind_cache(cache if cache is not None else past)
    patch.generation = state
    patch.last = pruned
    patch.scratch["pruned"] = pruned
    return out


def _forward_with_labels(
    model: nn.Module,
    patch: TokenPrunePatch,
    orig_forward: Callable[..., Any],
    arguments: dict[str, Any],
) -> Any:
    """Top-level forward with ``labels``: the loss is computed on labels pruned like the
    sequence (``-100`` at removed positions' pads)."""
    labels: torch.Tensor = arguments.pop("labels")
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    patch.scratch.pop("pruned", None)
    out = orig_forward(**arguments, return_dict=True)
    pruned: PrunedInputs | None = patch.scratch.pop("pruned", None)
    if pruned is not None:
        labels = pruned.prune_like(labels.to(pruned.index.device), -100)
    logits = out.logits
    if logits.shape[1] != labels.shape[1]:
        raise ValueError(
            f"labels cover {labels.shape[1]} positions but the model returned logits for "
            f"{logits.shape[1]}: pass logits_to_keep=0 when computing a loss"
        )
    loss_kwargs = {
        k: arguments[k] for k in ("num_items_in_batch", "ignore_index") if k in arguments
    }
    loss = model.loss_function(
        logits=logits,
        labels=labels.to(logits.device),
        vocab_size=model.config.text_config.vocab_size,
        **loss_kwargs,
    )
    out = type(out)(**{**dict(out.items()), "loss": loss})  # loss first, as the model orders it
    return out if return_dict else out.to_tuple()
