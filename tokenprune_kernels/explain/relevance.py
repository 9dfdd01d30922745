"""Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021) of the visual tokens.

The rule (``shared/method.md``): ``R_0 = I`` over the sequence and, for every LLM layer ``l`` in
order, ``R <- R + Abar_l @ R`` with ``Abar_l = mean_heads(relu(A_l * dA_l))``, where ``A_l`` is
the layer's attention probabilities ``[H, L, L]`` and ``dA_l`` the gradient of the explained
output with respect to them. For answer token ``y_t`` the row of ``R`` at the position that
predicts it, restricted to the visual columns, is its relevance; averaged over the answer tokens
it is the label ``R_v`` (one non-negative value per visual token).

How it is computed here
-----------------------
- Only one row of ``R_L`` is needed per answer token. Unrolled, ``R_L = (I + Abar_L) ... (I +
  Abar_1)``, so row ``r`` is ``e_r (I + Abar_L) ... (I + Abar_1)``: a row vector multiplied from
  the LAST layer down to the first, ``v <- v + v @ Abar_l`` for ``l = L .. 1``
  (:func:`propagate_relevance_rows`): ``O(L_seq^2)`` per layer instead of ``O(L_seq^3)``.
  Backpropagation visits the layers in exactly that order, so with ``answer_chunk=1`` each
  layer's gradient is reduced to ``Abar_l`` and folded into ``v`` inside a tensor hook the moment
  it arrives, and then dropped: beyond the forward graph (which holds every ``A_l`` anyway) only
  one layer's ``[H, L, L]`` gradient is alive at a time. Causality lets the reduction use only
  the leading ``r + 1`` rows and columns.
- ``answer_chunk = k > 1`` explains ``k`` answer tokens per backward pass
  (``torch.autograd.grad(..., is_grads_batched=True)``, one vmapped backward); it returns every
  layer's ``[k, H, L, L]`` gradient at once (``k`` times the attention memory of the graph):
  fewer, batched backward passes for more memory; ``1`` is the memory-lean choice for long
  sequences (on 2 CPU cores it was also the faster one: tiny Qwen2-VL, 608 tokens, 16 answer
  tokens, 0.26 s at ``k = 1`` vs 0.42 s at ``k = 16``).
- The forward graph is built once per sample and kept (``retain_graph``) only across that
  sample's chunks; the last backward frees it.
- Attention probabilities come from forward hooks on the LLM decoder layers' ``self_attn``
  modules (eager attention returns ``(output, weights)``); ``output_attentions`` is not used and
  the vision tower's attention (Qwen2-VL has one) is never touched. The LLM input embeddings are
  made a leaf that requires grad and the parameters are frozen for the pass, so no parameter
  gradient and no vision-tower graph is built.

What is explained (teacher forcing)
-----------------------------------
The model is fed the prompt followed by the reference answer (teacher forcing; the last answer
token is not fed, no output depends on it). Position ``P - 1 + t`` (``P`` = prompt length)
predicts answer token ``y_t``; the explained output is the LOGIT of ``y_t`` there by default
(``target="logit"``, what Chefer et al. backpropagate: the pre-softmax score of the explained
class) or its log-probability (``target="logprob"``: the gradient also pushes against the
competing tokens). ``tokenprune explain`` only labels samples the model answers correctly and
feeds the model's own greedy tokens, so the teacher-forced sequence IS the generated one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.transformers import FAMILIES, is_tokenprune_applied

TARGETS: tuple[str, ...] = ("logit", "logprob")

#: The transformers model types supported (those of ``tokenprune_kernels.transformers``).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)

_VISUAL_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


def head_mean_relu(attn: torch.Tensor, grad: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``Abar = mean_heads(relu(attn * grad))`` in float32.

    Args:
        attn: ``[..., H, L, L]`` attention probabilities (any float dtype).
        grad: the gradient of the explained output w.r.t. ``attn``, same shape.
        size: if given, only the leading ``size`` rows and columns are computed (``[..., size,
            size]``); enough for an output at row ``size - 1`` (causal attention).

    Returns:
        ``[..., L, L]`` (or ``[..., size, size]``) float32, non-negative.
    """
    if attn.shape != grad.shape:
        raise ValueError(
            f"attn and grad must have the same shape, got {list(attn.shape)} and {list(grad.shape)}"
        )
    if size is not None:
        attn = attn[..., :size, :size]
        grad = grad[..., :size, :size]
    return (attn.float() * grad.float()).clamp_min_(0.0).mean(dim=-3)


def propagate_relevance_rows(
    abars: Sequence[torch.Tensor], rows: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Rows of ``R_L`` from the per-layer ``Abar_l``, without forming ``R``.

    ``R_0 = I``, ``R_l = R_{l-1} + Abar_l @ R_{l-1}``, hence ``R_L = (I + Abar_L) ... (I +
    Abar_1)`` and row ``r`` of ``R_L`` is ``e_r`` multiplied by ``(I + Abar_l)`` for ``l = L`` down
    to ``1``.

    Args:
        abars: ``Abar_l`` in LAYER ORDER (first layer first), each ``[L, L]`` (shared by every
            row) or ``[T, L, L]`` (one per row, e.g. per answer token); float32/float64.
        rows: ``[T]`` int, the row of ``R_L`` wanted for each of the ``T`` outputs.

    Returns:
        ``[T, L]`` in the dtype of ``abars`` (non-negative when the ``abars`` are).
    """
    if len(abars) == 0:
        raise ValueError("abars must hold at least one layer")
    rows_t = torch.as_tensor(rows, dtype=torch.int64)
    if rows_t.dim() != 1:
        raise ValueError(f"rows must be 1-D [T], got shape {list(rows_t.shape)}")
    first = abars[0]
    length = first.shape[-1]
    if first.shape[-2] != length:
        raise ValueError(f"abars must be [L, L] or [T, L, L], got {list(first.shape)}")
    if bool(((rows_t < 0) | (rows_t >= length)).any()):
        raise ValueError(f"rows must be in [0, {length}), got {rows_t.tolist()}")
    t = rows_t.numel()
    v = torch.zeros(t, length, dtype=first.dtype, device=first.device)
    v[torch.arange(t, device=v.device), rows_t.to(v.device)] = 1.0
    for abar in reversed(abars):
        if abar.shape[-2:] != (length, length) or abar.dim() not in (2, 3):
            raise ValueError(f"every Abar must be [L, L] or [T, L, L] with L = {length}")
        if abar.dim() == 2:
            v = v + v @ abar
        else:
            if abar.shape[0] != t:
                raise ValueError(f"per-row abars must be [T={t}, L, L], got {list(abar.shape)}")
            v = v + torch.bmm(v.unsqueeze(1), abar).squeeze(1)
    return v


# --------------------------------------------------------------------------------------------
# The generic core: any model whose attention modules return (output, weights)
# --------------------------------------------------------------------------------------------


class _Capture:
    """Forward hooks on the attention modules: keep each call's weights ``[1, H, L, L]``."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.weights: list[torch.Tensor | None] = [None] * len(modules)
        self.calls = [0] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[i] += 1
            w = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if not isinstance(w, torch.Tensor):
                raise RuntimeError(
                    f"attention module {i} ({type(module).__name__}) returned no attention "
                    "weights: load the model with attn_implementation='eager'"
                )
            self.weights[i] = w

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def gradient_weighted_relevance(
    forward: Callable[[], torch.Tensor],
    attention_modules: Sequence[nn.Module],
    rows: torch.Tensor | Sequence[int],
    *,
    answer_chunk: int = 1,
) -> torch.Tensor:
    """Relevance rows ``R_L[rows]`` of one sequence, for any model.

    Args:
        forward: runs the model once (gradients enabled by this function) and returns the ``[T]``
            explained outputs (e.g. the answer tokens' logits), differentiable.
        attention_modules: the attention modules of the layers that count, in layer order; each
            must be called exactly once by ``forward`` and return ``(output, weights, ...)`` with
            ``weights [1, H, L, L]`` attention probabilities that require grad.
        rows: ``[T]`` int, the sequence position whose output ``forward()[t]`` is (the row of
            ``R`` that explains it).
        answer_chunk: outputs per backward pass (>= 1; see the module docstring).

    Returns:
        ``[T, L]`` float32 non-negative: row ``rows[t]`` of ``R_L`` for output ``t``.
    """
    if isinstance(answer_chunk, bool) or not isinstance(answer_chunk, int) or answer_chunk < 1:
        raise ValueError(f"answer_chunk must be an int >= 1, got {answer_chunk!r}")
    if len(attention_modules) == 0:
        raise ValueError("attention_modules must not be empty")
    rows_t = torch.as_tensor(rows, dtype=torch.int64).flatten().cpu()
    capture = _Capture(attention_modules)
    try:
        with torch.enable_grad():
            scores = forward()
    finally:
        capture.remove()
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(
            f"forward() must return the [T] explained outputs, got "
            f"{getattr(scores, 'shape', type(scores).__name__)}"
        )
    if scores.numel() != rows_t.numel():
        raise ValueError(f"forward() returned {scores.numel()} outputs for {rows_t.numel()} rows")
    bad = [i for i, c in enumerate(capture.calls) if c != 1]
    if bad:
        raise RuntimeError(
            f"each attention module must run exactly once per forward; modules {bad} ran "
            f"{[capture.calls[i] for i in bad]} times"
        )
    weights: list[torch.Tensor] = [w for w in capture.weights if w is not None]
    length = int(weights[0].shape[-1])
    for i, w in enumerate(weights):
        if w.dim() != 4 or w.shape[0] != 1 or w.shape[-2:] != (length, length):
            raise ValueError(
                f"attention weights of module {i} must be [1, H, L, L] with L = {length}, got "
                f"{list(w.shape)} (one sample at a time)"
            )
        if not w.requires_grad:
            raise RuntimeError(
                f"attention weights of module {i} do not require grad: the forward must build "
                "a graph through the attention"
            )
    if bool(((rows_t < 0) | (rows_t >= length)).any()):
        raise ValueError(f"rows must be in [0, {length}), got {rows_t.tolist()}")

    n_out = scores.numel()
    out = torch.zeros(n_out, length, dtype=torch.float32, device=weights[0].device)
    starts = list(range(0, n_out, answer_chunk))
    if answer_chunk == 1:
        _stream_tokens(scores, weights, rows_t, out)
    else:
        for s in starts:
            idx = list(range(s, min(s + answer_chunk, n_out)))
            last = s == starts[-1]
            _batched_tokens(scores, weights, rows_t[idx], idx, out, retain=not last)
    return out


def _stream_tokens(
    scores: torch.Tensor,
    weights: list[torch.Tensor],
    rows: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """One backward per output; each layer's gradient folded into ``v`` as it arrives."""
    n_layers = len(weights)
    state: dict[str, Any] = {}

    def make_hook(i: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not state.get("active"):
                return
            size = state["size"]
            pending = state["pending"]
            with torch.no_grad():
                pending[i] = head_mean_relu(weights[i].detach()[0], grad[0], size)
                while state["next"] in pending:  # layers L .. 1 (the order backward visits)
                    abar = pending.pop(state["next"])
                    state["v"] = state["v"] + state["v"] @ abar
                    state["next"] -= 1

        return hook

    handles = [w.register_hook(make_hook(i)) for i, w in enumerate(weights)]
    try:
        for t in range(scores.numel()):
            r = int(rows[t])
            v = torch.zeros(1, r + 1, dtype=torch.float32, device=out.device)
            v[0, r] = 1.0
            state.update(active=True, size=r + 1, pending={}, next=n_layers - 1, v=v)
            torch.autograd.grad(scores[t], [weights[0]], retain_graph=t + 1 < scores.numel())
            if state["next"] != -1:
                raise RuntimeError(
                    f"backward reached only layers above {state['next']}: every layer's "
                    "attention must lie on the path to the explained output"
                )
            out[t, : r + 1] = state["v"][0]
            state.clear()
    finally:
        state.clear()
        for h in handles:
            h.remove()


def _batched_tokens(
    scores: torch.Tensor,
    weights: list[torch.Tensor],
    rows: torch.Tensor,
    idx: list[int],
    out: torch.Tensor,
    retain: bool,
) -> None:
    """``len(idx)`` outputs in one vmapped backward (every layer's gradient returned at once)."""
    k = len(idx)
    size = int(rows.max()) + 1
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grads = list(
        torch.autograd.grad(
            scores[idx], weights, grad_outputs=eye, is_grads_batched=True, retain_graph=retain
        )
    )
    abars = []
    with torch.no_grad():
        for i in range(len(weights)):
            g = grads[i][:, 0]  # [k, H, L, L]
            grads[i] = None  # free each layer's gradient once reduced
            a = weights[i].detach()[0].unsqueeze(0).expand_as(g)
            abars.append(head_mean_relu(a, g, size))
        out[idx, :size] = propagate_relevance_rows(abars, rows)


# --------------------------------------------------------------------------------------------
# transformers models
# --------------------------------------------------------------------------------------------


@dataclass
class Relevance:
    """The relevance of one sample's visual tokens.

    Attributes:
        relevance: ``[n_v]`` float32 >= 0, averaged over the answer tokens (the label ``R_v``).
        per_token: ``[T, n_v]`` float32 >= 0, one row per answer token.
        visual_positions: ``[n_v]`` int64, where the visual tokens sit in the prompt.
        rows: ``[T]`` int64, the position predicting each answer token (``P - 1 + t``).
        answer_ids: ``[T]`` int64, the explained (teacher-forced) answer tokens.
        target: ``"logit"`` or ``"logprob"``.
    """

    relevance: torch.Tensor
    per_token: torch.Tensor
    visual_positions: torch.Tensor
    rows: torch.Tensor
    answer_ids: torch.Tensor
    target: str


def model_type_of(model: nn.Module) -> str:
    """``model.config.model_type``; ``ValueError`` listing the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def text_model_of(model: nn.Module) -> nn.Module:
    """The LLM decoder stack (``.layers``) of a supported multimodal model."""
    for cand in (
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
    ):
        if isinstance(cand, nn.Module) and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise ValueError(
        f"{type(model).__name__} has no language model with decoder layers (expected "
        "model.model.language_model.layers or model.language_model.layers)"
    )


def visual_token_ids(model: nn.Module) -> list[int]:
    """The placeholder token ids of images and videos in the model's config."""
    config = model.config
    ids = []
    for name in _VISUAL_TOKEN_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    if not ids:
        raise ValueError(f"{type(model).__name__}'s config names no image/video token id")
    return ids


def visual_positions_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[n_v]`` int64 positions of the image/video placeholder tokens in ``input_ids [1, L]``."""
    ids = torch.tensor(visual_token_ids(model), device=input_ids.device)
    return torch.isin(input_ids[0], ids).nonzero().flatten().to(torch.int64)


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _leaf_embeddings_hook(
    module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    embeds = kwargs.get("inputs_embeds")
    if not isinstance(embeds, torch.Tensor):
        raise RuntimeError("the language model was called without inputs_embeds")
    kwargs["inputs_embeds"] = embeds.detach().requires_grad_(True)
    return args, kwargs


def _extend_inputs(inputs: Mapping[str, Any], extra: torch.Tensor) -> dict[str, Any]:
    """Append ``extra [n]`` token ids to a batch-of-one prompt (mask 1, token types 0)."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    out = dict(inputs)
    if extra.numel() == 0:
        return out
    extra = extra.to(device=ids.device, dtype=ids.dtype)[None]
    for key, value in inputs.items():
        if key == "input_ids":
            out[key] = torch.cat([ids, extra], dim=1)
        elif (
            isinstance(value, torch.Tensor)
            and value.dim() == 2
            and tuple(value.shape) == (1, length)
            and not value.dtype.is_floating_point
        ):
            fill = 1 if key == "attention_mask" else 0  # token types: text
            out[key] = torch.cat([value, value.new_full((1, extra.shape[1]), fill)], dim=1)
    return out


def explain_relevance(
    model: nn.Module,
    inputs: Mapping[str, Any],
    answer_ids: torch.Tensor | Sequence[int],
    *,
    target: str = "logit",
    answer_chunk: int = 1,
) -> Relevance:
    """Gradient-weighted relevance of the visual tokens of one prompt for a given answer.

    Args:
        model: a supported transformers model (:data:`SUPPORTED_MODEL_TYPES`, the
            ``...ForConditionalGeneration`` class) whose LLM runs eager attention (load with
            ``attn_implementation="eager"``), not patched by ``apply_tokenprune``. Any device and
            float dtype; gradients are taken w.r.t. the attention only (parameters are frozen
            for the call and restored).
        inputs: the processor's output for ONE prompt ending with the generation prompt:
            ``input_ids [1, P]``, ``attention_mask [1, P]`` and the pixel inputs
            (``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
            ``image_sizes``, ``mm_token_type_ids``, ...), on the model's device.
        answer_ids: ``[T]`` int (T >= 1), the reference answer's tokens (teacher-forced), no
            image/video placeholder ids.
        target: ``"logit"`` (default) or ``"logprob"`` of ``y_t`` is explained.
        answer_chunk: answer tokens per backward pass (1: least memory).

    Returns:
        :class:`Relevance` (tensors on the model's device).
    """
    model_type_of(model)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if is_tokenprune_applied(model):
        raise ValueError("model is patched by apply_tokenprune: revert_tokenprune(model) first")
    text_model = text_model_of(model)
    impl = getattr(text_model.config, "_attn_implementation", None)
    if impl != "eager":
        raise ValueError(
            f"the language model runs {impl!r} attention; relevance needs the attention "
            "probabilities: load the model with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager'))"
        )
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(
            "inputs['input_ids'] must be a [1, P] tensor (one sample), got "
            f"{getattr(ids, 'shape', type(ids).__name__)}"
        )
    if "position_ids" in inputs or "past_key_values" in inputs:
        raise ValueError("inputs must not carry position_ids or past_key_values")
    answer = torch.as_tensor(answer_ids, dtype=torch.int64).flatten().to(ids.device)
    if answer.numel() == 0:
        raise ValueError("answer_ids must hold at least one token")
    visual_ids = visual_token_ids(model)
    if bool(torch.isin(answer, torch.tensor(visual_ids, device=answer.device)).any()):
        raise ValueError(f"answer_ids must not contain image/video placeholder ids {visual_ids}")
    vis_pos = visual_positions_of(model, ids)
    if vis_pos.numel() == 0:
        raise ValueError("the prompt has no image/video placeholder tokens")
    prompt_len = ids.shape[1]
    n_ans = answer.numel()
    rows = torch.arange(n_ans, dtype=torch.int64) + (prompt_len - 1)
    full = _extend_inputs(inputs, answer[:-1])

    def forward() -> torch.Tensor:
        out = model(**full, use_cache=False, logits_to_keep=n_ans)
        logits = out.logits[0, -n_ans:]  # [T, V]: positions P-1 .. P+T-2
        if target == "logprob":
            logits = torch.log_softmax(logits.float(), dim=-1)
        return logits.gather(-1, answer[:, None]).squeeze(-1)

    base = getattr(model, "model", model)
    if getattr(base, "rope_deltas", None) is not None:
        base.rope_deltas = None  # Qwen: positions of this sequence, never a previous call's
    modules = [layer.self_attn for layer in text_model.layers]
    hook = text_model.register_forward_pre_hook(_leaf_embeddings_hook, with_kwargs=True)
    try:
        with _frozen_parameters(model):
            rel_rows = gradient_weighted_relevance(
                forward, modules, rows, answer_chunk=answer_chunk
            )
    finally:
        hook.remove()
    per_token = rel_rows[:, vis_pos.to(rel_rows.device)]
    return Relevance(
        relevance=per_token.mean(0),
        per_token=per_token,
        visual_positions=vis_pos,
        rows=rows,
        answer_ids=answer,
        target=target,
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TARGETS",
    "Relevance",
    "explain_relevance",
    "gradient_weighted_relevance",
    "head_mean_relu",
    "model_type_of",
    "propagate_relevance_rows",
    "text_model_of",
    "visual_positions_of",
    "visual_token_ids",
]
