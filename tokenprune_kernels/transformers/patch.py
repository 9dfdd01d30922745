"""Patching a transformers model: ONE seam for every family, parameterised by a small spec.

A family module (``qwen.py``, ``llava.py``) describes its model with a :class:`FamilySpec` (where
layer 0 lives, how position ids look at prefill and in decoding, what else is pruned with the
tokens); :func:`install` patches an INSTANCE with the same four wrappers for every family, so
``revert_tokenprune`` restores it exactly and other instances of the class are unaffected:

- ``inner.get_placeholder_mask`` (``inner`` = the ``*Model`` holding the visual merge): records the
  positions the merge fills (the model's own rule, ``input_ids`` or ``inputs_embeds`` alike; the
  image mask when image features are given, the video mask when video features are given) and
  the call's ``input_ids``. Records only inside the inner forward.
- ``inner.forward``: per-call bookkeeping. A call that continues a pruned cache and brings no
  position ids gets them in the unpruned frame (``FamilySpec.continuation_positions``), before the
  model would derive them from the pruned cache length; every call opens a fresh record and
  clears it after.
- ``inner.language_model.forward``: the pruning point. At a prefill with recorded visual tokens
  it runs :func:`~tokenprune_kernels.transformers.prune.prune_inputs` (the model's own layer-0
  input norm, q/k projections and rotary embedding on the instruction queries and the keys they
  see; the ``prune_and_merge`` op) on the merged embeddings and the model's own full-sequence
  position ids, then calls the original language model on the shorter sequence with the
  attention implementation the model was loaded with (``output_attentions`` is never used).
  Kept tokens keep their original position ids; the pruned attention mask is always passed, and
  under FlashAttention a batch of one without pads also gets explicit sequence bounds, so the
  gaps in the ids are never read as packed-sequence boundaries. A call without visual tokens
  that continues a pruned cache gets its 2-D mask translated to the pruned frame.
- the outer ``forward`` (``*ForConditionalGeneration`` only): with ``labels``, prunes them like the
  sequence (``-100`` at pads) and computes the loss on the pruned logits.

Outputs (logits, hidden states) have the pruned length; ``last_pruned(model)`` says which
original positions they are (``keep_mask``, ``index``).

Generation bookkeeping
----------------------
``generate()`` keeps the UNPRUNED view of the prompt: its 2-D ``attention_mask`` is
``[B, L + t]`` and its ``position_ids`` (transformers >= 5.17 prepares them itself for the models
whose ``forward`` takes ``position_ids``) continue from the unpruned positions. After a pruned
prefill the KV cache holds only ``L'`` prompt tokens. The rule we keep:

1. Positions are never renumbered. Kept tokens keep their original ids, and a decoded token gets
   exactly the id it would have had without pruning. ``generate()``'s own ``position_ids`` already
   do this (they are the unpruned ones). Families whose model derives positions from a stored
   offset (Qwen's ``rope_deltas``) keep that offset in the UNPRUNED frame (so ``generate()``'s
   own continuation logic stays right) and hand explicit unpruned-frame position ids to
   continuation calls that bring none (``GenerationState.removed`` converts a pruned cache length
   back to the unpruned one).
2. The attention mask is translated: at prefill the state stores the pruned prompt mask
   ``[B, L']`` and the unpruned width ``L``; a later call whose ``past_key_values`` is the SAME
   cache object (identity, held through a weak reference) is a continuation, and its mask
   ``[B, L + t]`` becomes ``cat(pruned_mask, mask[:, L:])`` = ``[B, L' + t]``, which matches the
   cache. A mask that is already in the pruned frame passes unchanged; any other width is an error.
   Without a mask, one is made (``cat(pruned_mask, ones)``) when the pruned prompt has pads.
3. A call with no cache or an empty one is a new prompt and drops the state; a call with a
   different non-empty cache is not ours and passes through untouched.

Not supported, with a clear error: visual tokens arriving with a non-empty KV cache (a new image
in a continued conversation: pruning needs the whole prompt in one call), compileable (static)
caches (``generate()`` builds 4-D masks for the unpruned length before the model runs).
``generate(use_cache=False)`` re-prunes the whole sequence at every step, so the generated tokens
join the instruction tokens there. ``transformers`` 5.17 - 5.23 have no ``cache_position`` in these
models or in ``generate()``, so nothing else needs translating.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenprune_kernels.transformers.prune import (
    InstructionMaskSpec,
    Layer0,
    PrunedInputs,
    TokenPruneConfig,
    check_instruction_mask,
    default_instruction_mask,
    prune_inputs,
    resolve_instruction_mask,
)

# Only what was verified: the tests of tests/transformers pass on 5.23.0 and 5.17.0.
SUPPORTED_TRANSFORMERS = ">=5.17,<5.24"

PATCH_ATTR = "_tokenprune_patch"


def check_transformers_version(version: str | None = None) -> str:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed transformers) is in
    :data:`SUPPORTED_TRANSFORMERS`. Returns the version string."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = transformers.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"tokenprune_kernels.transformers supports transformers {SUPPORTED_TRANSFORMERS}, "
            f"but transformers {version} is installed"
        )
    return version


# --------------------------------------------------------------------------------------------
# Generation bookkeeping and the patch record
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationState:
    """What a pruned prefill leaves for the calls that continue from its KV cache.

    Attributes:
        full_length: ``L``, the unpruned prompt width.
        pruned_length: ``L'``, the pruned prompt width (= the cache length after prefill).
        attention_mask: ``[B, L']`` the pruned prompt's mask.
        removed: ``[B]`` int64 tokens removed per sample.
        pruned: the full :class:`PrunedInputs` of the prefill.
    """

    full_length: int
    pruned_length: int
    attention_mask: torch.Tensor
    removed: torch.Tensor
    pruned: PrunedInputs
    _cache_ref: Any = field(default=None, repr=False)

    def bind_cache(self, cache: Any) -> None:
        """Remember the cache object the prefill filled (weakly when possible)."""
        if cache is None:
            self._cache_ref = None
            return
        try:
            self._cache_ref = weakref.ref(cache)
        except TypeError:
            self._cache_ref = lambda: cache

    def continues(self, past_key_values: Any) -> bool:
        """True when a call with ``past_key_values`` continues from this prefill: the same
        cache object, holding at least the pruned prompt."""
        if past_key_values is None or self._cache_ref is None:
            return False
        if self._cache_ref() is not past_key_values:
            return False
        return _cache_length(past_key_values) >= self.pruned_length

    def translate_attention_mask(
        self, attention_mask: torch.Tensor | None, past_length: int, query_length: int
    ) -> torch.Tensor | None:
        """Map a continuation's mask to the pruned frame.

        Args:
            attention_mask: ``[B, W]`` with ``W = L + n`` (unpruned frame, as ``generate()``
                keeps it) or ``W = L' + n`` (already pruned), where ``n`` = tokens after the
                prompt including this call's; or None.
            past_length: the cache length before this call.
            query_length: tokens in this call.

        Returns:
            ``[B, L' + n]`` or None (no mask and no pads).
        """
        n = past_length - self.pruned_length + query_length
        if attention_mask is None:
            if not bool((self.attention_mask == 0).any()):
                return None
            b = self.attention_mask.shape[0]
            return torch.cat([self.attention_mask, self.attention_mask.new_ones(b, n)], dim=-1)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise NotImplementedError(
                "token pruning needs a 2-D attention_mask during decoding; compileable (static) "
                "caches make generate() build 4-D masks for the unpruned length: use the default "
                "DynamicCache"
            )
        w = attention_mask.shape[-1]
        if w == self.pruned_length + n:
            return attention_mask
        if w != self.full_length + n:
            raise ValueError(
                f"attention_mask has {w} columns; continuing a pruned prompt of {self.full_length} "
                f"tokens ({self.pruned_length} after pruning) with {n} new tokens expects "
                f"{self.full_length + n} (unpruned) or {self.pruned_length + n} (pruned)"
            )
        head = self.attention_mask.to(device=attention_mask.device, dtype=attention_mask.dtype)
        return torch.cat([head, attention_mask[:, self.full_length :]], dim=-1)


def _cache_length(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:  # pragma: no cover - legacy caches
        return 0


def cache_length(cache: Any) -> int:
    """Tokens held by a transformers ``Cache`` (0 for None)."""
    return 0 if cache is None else _cache_length(cache)


class TokenPrunePatch:
    """The state of one patched model instance, stored as ``model._tokenprune_patch``.

    Attributes:
        family: the family module name (``"qwen"``, ``"llava"``).
        config: the current :class:`TokenPruneConfig` (replaced by a second apply).
        instruction_mask: the ``instruction_mask`` spec given to ``apply_tokenprune``.
        generation: the :class:`GenerationState` of the last pruned prefill, or None.
        last: the :class:`PrunedInputs` of the last pruned prefill, or None.
        scratch: per-call values a family passes between its wrappers.
    """

    def __init__(
        self, family: str, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec
    ) -> None:
        self.family = family
        self.config = config
        self.instruction_mask = instruction_mask
        self.generation: GenerationState | None = None
        self.last: PrunedInputs | None = None
        self.scratch: dict[str, Any] = {}
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an INSTANCE attribute, remembering what was there for :meth:`restore`."""
        had = name in vars(obj)
        self._saved.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Undo every :meth:`set_attr`, newest first."""
        for obj, name, had, old in reversed(self._saved):
            if had:
                setattr(obj, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
        self._saved.clear()
        self.generation = None
        self.last = None
        self.scratch.clear()


def get_patch(model: nn.Module) -> TokenPrunePatch | None:
    """The :class:`TokenPrunePatch` of a patched model, else None."""
    patch = vars(model).get(PATCH_ATTR)
    return patch if isinstance(patch, TokenPrunePatch) else None


def attach_patch(model: nn.Module, patch: TokenPrunePatch) -> None:
    """Store ``patch`` on the instance (plain attribute, not a submodule)."""
    object.__setattr__(model, PATCH_ATTR, patch)


def detach_patch(model: nn.Module) -> TokenPrunePatch | None:
    """Restore and remove the patch of ``model``; returns it (None when not patched)."""
    patch = get_patch(model)
    if patch is None:
        return None
    patch.restore()
    vars(model).pop(PATCH_ATTR, None)
    return patch


# --------------------------------------------------------------------------------------------
# The family spec
# --------------------------------------------------------------------------------------------


def _same_positions(pruned: PrunedInputs) -> torch.Tensor:
    return pruned.position_ids


def _nothing_else(lm_kwargs: dict[str, Any], pruned: PrunedInputs) -> None:
    return None


def _no_structural_tokens(config: Any) -> tuple[int, ...]:
    return ()


class Continuation(NamedTuple):
    """A call that continues a pruned cache and brings no position ids: what
    :attr:`FamilySpec.continuation_positions` gets besides the inner model and the state."""

    attention_mask: torch.Tensor | None  # the call's mask, if any (pruned or unpruned frame)
    past_length: int  # the cache length before the call
    query_length: int  # the tokens the call brings
    device: torch.device


@dataclass(frozen=True)
class FamilySpec:
    """What the seam needs to know about one model family.

    Attributes:
        name: the family module's name under ``tokenprune_kernels.transformers`` (``"qwen"``).
        model_types: the ``config.model_type`` values the family patches.
        description: how errors name the family (``"a LLaVA-style transformers model"``).
        inner_classes: the transformers classes of the inner model, for error messages.
        inner_attrs: attributes the inner model has besides ``language_model`` and
            ``get_placeholder_mask`` (how it is recognised).
        layer0: ``inner -> Layer0``, the first decoder layer's query/key path.
        prefill_positions: ``(position_ids | None, B, L, device) -> ids``: the full-sequence
            position ids the language model received at prefill, in the layout
            :func:`~tokenprune_kernels.transformers.prune.prune_inputs` takes (``[B, L]`` or
            ``[R, B, L]``), the model's own default when it received none.
        continuation_positions: ``(inner, state, Continuation) -> ids``: the unpruned-frame
            position ids of a call that continues a pruned cache and brings none.
        lm_position_ids: ``PrunedInputs -> ids`` passed to the language model after pruning
            (default: ``pruned.position_ids``).
        prune_lm_kwargs: ``(language-model kwargs, PrunedInputs) -> None``, prunes any other
            per-token input of the language model in place (Qwen3-VL's deepstack features).
        structural_token_ids: ``model config -> token ids`` that mark visual content without
            asking anything (Qwen's ``<|vision_start|>`` / ``<|vision_end|>``); the default
            instruction rule never counts them (default: none).
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    inner_classes: str
    inner_attrs: tuple[str, ...]
    layer0: Callable[[nn.Module], Layer0]
    prefill_positions: Callable[[torch.Tensor | None, int, int, torch.device], torch.Tensor]
    continuation_positions: Callable[[nn.Module, GenerationState, Continuation], torch.Tensor]
    lm_position_ids: Callable[[PrunedInputs], torch.Tensor] = _same_positions
    prune_lm_kwargs: Callable[[dict[str, Any], PrunedInputs], None] = _nothing_else
    structural_token_ids: Callable[[Any], tuple[int, ...]] = _no_structural_tokens


def find_parts(model: nn.Module, spec: FamilySpec) -> tuple[nn.Module | None, nn.Module]:
    """``(outer *ForConditionalGeneration or None, the inner *Model with the merge)``.

    Raises:
        ValueError: ``model`` is neither such an inner model nor a model whose ``.model`` is one.
    """
    attrs = ("language_model", "get_placeholder_mask", *spec.inner_attrs)

    def is_inner(m: Any) -> bool:
        return (
            isinstance(m, nn.Module)
            and isinstance(getattr(m, "language_model", None), nn.Module)
            and all(hasattr(m, a) for a in attrs)
        )

    if is_inner(model):
        return None, model
    inner = getattr(model, "model", None)
    if is_inner(inner):
        return model, inner
    raise ValueError(
        f"{type(model).__name__} is not {spec.description} this version supports: expected a "
        f"module with {', '.join(attrs)} ({spec.inner_classes}) or one whose .model is one"
    )


# --------------------------------------------------------------------------------------------
# Install / uninstall
# --------------------------------------------------------------------------------------------


def install(
    model: nn.Module,
    spec: FamilySpec,
    config: TokenPruneConfig,
    instruction_mask: InstructionMaskSpec = None,
) -> None:
    """Patch ``model`` (an inner ``*Model`` of ``spec``'s family, or a model whose ``.model`` is
    one); applying again only replaces ``config`` and ``instruction_mask``.

    Raises:
        RuntimeError: transformers outside :data:`SUPPORTED_TRANSFORMERS`.
        ValueError: not a model of the family (class or ``config.model_type``).
        TypeError, ValueError: a bad ``config`` or ``instruction_mask`` (see
            :func:`~tokenprune_kernels.transformers.prune.check_instruction_mask`).
    """
    check_transformers_version()
    if not isinstance(config, TokenPruneConfig):
        raise TypeError(f"config must be a TokenPruneConfig, got {type(config).__name__}")
    check_instruction_mask(instruction_mask)
    patch = get_patch(model)
    if patch is not None and patch.family == spec.name:
        patch.config = config
        patch.instruction_mask = instruction_mask
        return
    top, inner = find_parts(model, spec)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in spec.model_types:
        raise ValueError(
            f"the {spec.name} family supports model types {list(spec.model_types)}, got "
            f"{model_type!r}"
        )
    if patch is not None:
        detach_patch(model)
    patch = TokenPrunePatch(spec.name, config, instruction_mask)
    try:
        _wrap(patch, spec, top, inner)
    except BaseException:
        patch.restore()
        raise
    attach_patch(model, patch)


def uninstall(model: nn.Module) -> None:
    """Restore every attribute :func:`install` set; harmless when ``model`` is not patched."""
    detach_patch(model)


# --------------------------------------------------------------------------------------------
# The wrappers
# --------------------------------------------------------------------------------------------


def _binder(fn: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    """Normalise (args, kwargs) of a call of ``fn`` into one dict of keyword arguments
    (positional ones by name, ``**kwargs`` flattened)."""
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
    for key in ("inputs_embeds", "input_ids"):
        value = a.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    return 0


def _visual_from_placeholder(out: Any, arguments: dict[str, Any]) -> torch.Tensor | None:
    """The ``[B, L]`` bool positions a ``get_placeholder_mask`` call is about to fill."""
    masks = out if isinstance(out, tuple) else (out,)
    if len(masks) == 1:  # LLaVA: the image mask
        chosen = [masks[0]]
    else:  # (image mask, video mask): the features given say which one is filled
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


_RECORD = ("recording", "visual", "input_ids")


def _wrap(patch: TokenPrunePatch, spec: FamilySpec, top: nn.Module | None, inner: nn.Module):
    lm = inner.language_model
    layer0 = spec.layer0(inner)
    structural = _StructuralTokens(spec.structural_token_ids(inner.config), inner)
    orig_mask, orig_inner, orig_lm = inner.get_placeholder_mask, inner.forward, lm.forward
    bind_mask, bind_inner, bind_lm = _binder(orig_mask), _binder(orig_inner), _binder(orig_lm)
    scratch = patch.scratch

    def clear_record() -> None:
        for key in _RECORD:
            scratch.pop(key, None)

    @functools.wraps(orig_mask)
    def get_placeholder_mask(*args: Any, **kwargs: Any) -> Any:
        out = orig_mask(*args, **kwargs)
        if scratch.get("recording"):
            a = bind_mask(*args, **kwargs)
            visual = _visual_from_placeholder(out, a)
            if visual is not None:
                prev = scratch.get("visual")
                if prev is not None and prev.shape == visual.shape:
                    visual = visual | prev
                scratch["visual"] = visual
                scratch["input_ids"] = a.get("input_ids")
        return out

    @functools.wraps(orig_inner)
    def inner_forward(*args: Any, **kwargs: Any) -> Any:
        a = bind_inner(*args, **kwargs)
        past = a.get("past_key_values")
        state = patch.generation
        if state is not None and state.continues(past):
            q_len = _query_length(a)
            if a.get("position_ids") is None and q_len > 0:
                # Before the model derives them from the pruned cache length.
                device = next(inner.parameters()).device
                call = Continuation(a.get("attention_mask"), cache_length(past), q_len, device)
                a["position_ids"] = spec.continuation_positions(inner, state, call)
        elif cache_length(past) == 0:
            patch.generation = None  # a new prompt: nothing to translate
        clear_record()
        scratch["recording"] = True
        try:
            return orig_inner(**a)
        finally:
            clear_record()

    @functools.wraps(orig_lm)
    def lm_forward(*args: Any, **kwargs: Any) -> Any:
        visual = scratch.pop("visual", None)
        input_ids = scratch.pop("input_ids", None)
        a = bind_lm(*args, **kwargs)
        embeds = a.get("inputs_embeds")
        if (
            visual is None
            or not isinstance(embeds, torch.Tensor)
            or tuple(visual.shape) != tuple(embeds.shape[:2])
            or not bool(visual.any())
        ):
            state = patch.generation
            past = a.get("past_key_values")
            if state is not None and state.continues(past):
                a["attention_mask"] = state.translate_attention_mask(
                    a.get("attention_mask"), cache_length(past), _query_length(a)
                )
            return orig_lm(**a)
        return _pruned_prefill(patch, spec, layer0, structural, lm, orig_lm, a, visual, input_ids)

    patch.set_attr(inner, "get_placeholder_mask", get_placeholder_mask)
    patch.set_attr(inner, "forward", inner_forward)
    patch.set_attr(lm, "forward", lm_forward)
    if top is not None:
        _wrap_labels(patch, top)


class _StructuralTokens:
    """Finds a family's structural tokens in a prompt: by id, or - when the call brings only
    ``inputs_embeds`` - by their input embedding (as transformers finds the image tokens)."""

    def __init__(self, ids: tuple[int, ...], inner: nn.Module) -> None:
        self.ids = tuple(ids)
        self.inner = inner

    def mask(self, input_ids: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]`` bool, or None when the family has no structural tokens."""
        if not self.ids:
            return None
        ids = torch.tensor(self.ids, device=embeds.device)
        if isinstance(input_ids, torch.Tensor) and input_ids.shape == embeds.shape[:2]:
            return torch.isin(input_ids.to(embeds.device), ids)
        rows = self.inner.get_input_embeddings()(ids).to(embeds.dtype)  # [n, H]
        found = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for row in rows:
            found |= (embeds == row).all(-1)
        return found


def _pruned_prefill(
    patch: TokenPrunePatch,
    spec: FamilySpec,
    layer0: Layer0,
    structural: _StructuralTokens,
    lm: nn.Module,
    orig_lm: Callable[..., Any],
    a: dict[str, Any],
    visual: torch.Tensor,
    input_ids: torch.Tensor | None,
) -> Any:
    """Prune the merged prompt and run the language model on it; leave the generation state."""
    embeds: torch.Tensor = a["inputs_embeds"]
    visual = visual.to(embeds.device)
    past = a.get("past_key_values")
    if cache_length(past) > 0:
        raise NotImplementedError(
            "token pruning: visual tokens after a non-empty KV cache (a new image in a continued "
            "conversation) are not supported; start from an empty cache or revert_tokenprune"
        )
    mask = a.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise NotImplementedError(
            "token pruning needs a 2-D [B, L] attention_mask (1 real / 0 pad) or None at prefill, "
            f"got {getattr(mask, 'shape', type(mask).__name__)}; compileable (static) caches "
            "build 4-D masks: use the default DynamicCache"
        )
    b, length = visual.shape
    position_ids = spec.prefill_positions(a.get("position_ids"), b, length, embeds.device)
    instr = resolve_instruction_mask(patch.instruction_mask, input_ids, visual, mask)
    if instr is None:
        with torch.no_grad():
            instr = default_instruction_mask(
                visual, mask, structural_mask=structural.mask(input_ids, embeds)
            )
    pruned = prune_inputs(
        embeds, visual, position_ids, layer0, patch.config,
        attention_mask=mask, instruction_mask=instr,
    )  # fmt: skip
    a["inputs_embeds"] = pruned.inputs_embeds
    a["position_ids"] = spec.lm_position_ids(pruned)
    # Always a mask: with gapped position ids, no mask and no cache, transformers would read the
    # sequence as several packed ones.
    a["attention_mask"] = pruned.attention_mask
    if "flash" in str(getattr(getattr(lm, "config", None), "_attn_implementation", "")):
        a.update(pruned.flash_kwargs())
    spec.prune_lm_kwargs(a, pruned)
    out = orig_lm(**a)

    cache = getattr(out, "past_key_values", None)
    cache = past if cache is None else cache
    patch.last = pruned
    patch.scratch["pruned"] = pruned
    if cache is None:
        patch.generation = None
    else:
        state = GenerationState(
            full_length=length,
            pruned_length=int(pruned.attention_mask.shape[1]),
            attention_mask=pruned.attention_mask,
            removed=pruned.removed,
            pruned=pruned,
        )
        state.bind_cache(cache)
        patch.generation = state
    return out


def _wrap_labels(patch: TokenPrunePatch, top: nn.Module) -> None:
    """The outer forward: with ``labels``, the loss is computed on labels pruned like the
    sequence (``-100`` at pads), with the model's own ``loss_function`` and extra kwargs."""
    orig_top = top.forward
    bind_top = _binder(orig_top)
    named = {
        p.name
        for p in inspect.signature(orig_top).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    }

    @functools.wraps(orig_top)
    def top_forward(*args: Any, **kwargs: Any) -> Any:
        a = bind_top(*args, **kwargs)
        labels = a.pop("labels", None)
        if labels is None:
            return orig_top(*args, **kwargs)
        return_dict = a.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(top.config, "return_dict", True)
        patch.scratch.pop("pruned", None)
        out = orig_top(**a, return_dict=True)
        pruned: PrunedInputs | None = patch.scratch.pop("pruned", None)
        if pruned is not None:
            labels = pruned.prune_like(labels.to(pruned.index.device), -100)
        logits = out.logits
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(
                f"labels cover {labels.shape[1]} positions but the model returned logits for "
                f"{logits.shape[1]}: pass logits_to_keep=0 when computing a loss"
            )
        loss = top.loss_function(
            logits=logits,
            labels=labels.to(logits.device),
            vocab_size=top.config.text_config.vocab_size,
            **{k: v for k, v in a.items() if k not in named},
        )
        out = type(out)(**{**dict(out.items()), "loss": loss})  # loss first, as the model orders it
        return out if return_dict else out.to_tuple()

    patch.set_attr(top, "forward", top_forward)


__all__ = [
    "PATCH_ATTR",
    "SUPPORTED_TRANSFORMERS",
    "FamilySpec",
    "GenerationState",
    "TokenPrunePatch",
    "attach_patch",
    "cache_length",
    "check_transformers_version",
    "detach_patch",
    "find_parts",
    "get_patch",
    "install",
    "uninstall",
]
