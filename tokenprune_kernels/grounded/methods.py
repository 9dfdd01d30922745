"""Visual-token pruning methods for the grounded-VQA Qwen2-VL, evaluated side by side.

Every method answers the same question: given one prompt (processor inputs of a batch) and a
keep ratio, which visual tokens does the language model see? The keep count is the op
contract's ``clamp(floor(r * n_v + 0.5), 1, n_v)`` for every method.

Input-level methods pick the kept visual positions; the LLM then runs on the hand-pruned
sequence (all text tokens + the kept visual tokens, original order) with the ORIGINAL M-RoPE
position ids (:func:`pruned_logits`):

- ``oracle``: the gradient-weighted relevance labels of the test sample itself (explaining the
  REFERENCE answer token; eager attention and a backward pass - an upper bound, not a method).
- ``mapper`` (ours): the trained 1-D conv mapper on the layer-0 instruction attention, through
  :func:`tokenprune_kernels.transformers.core.prune_inputs` (the inference path's code).
- ``attention`` (ours, training-free): raw layer-0 instruction attention, same path, no mapper.
- ``mapper_spread`` (ours, mapper v2) and ``attention_spread`` (ours, training-free): the same
  scores as ``mapper`` / ``attention``, selected under the spread rule (``docs/contract.md``,
  stage c: a token is passed over while a higher-ranked token within Chebyshev distance
  :data:`SPREAD_RADIUS` on the merged grid was taken) by :func:`spread_keep`.
- ``dart``: DART-like duplication removal (our implementation of the idea): pivots = the
  ``n_pivots`` visual tokens of largest LLM-input embedding L2 norm; the rest ranked by their
  highest cosine similarity to any pivot, least similar kept first.
- ``divprune``: DivPrune-like max-min diversity (our implementation): greedy farthest-point
  selection on the cosine distance of the visual embeddings, seeded with the token of largest
  mean distance to all others.
- ``random``: a uniformly random subset (``torch.Generator`` seeded per sample).
- ``uniform``: a regular 2-D subsampling of the merged token grid (``image_grid_thw`` / merge).

In-LLM methods:

- ``fastv`` (``K`` = 2) and ``fastv1`` (``K`` = 1), :data:`FASTV_LAYERS`: FastV-like: layers
  ``0 .. K-1`` run on the full sequence; the visual
  tokens are ranked by the LAST token's attention at layer ``K`` (head mean, softmax over the
  whole prefix, computed from that layer's own input norm, q/k projections and M-RoPE, never
  ``output_attentions``), the rest are dropped, and layers ``K ..`` run on the shorter sequence
  with the kept tokens' original positions (:func:`fastv_logits`).

Answers are one word = one token, so a prompt is answered from the prefill logits at its last
position: :func:`answer_token` takes the argmax over the FULL vocabulary (the first token
``generate()`` would emit).

Everything here works on ONE prompt at a time (:class:`Prepared`, batch of one, no padding);
:func:`split_batch` cuts a processor batch into such prompts and :func:`select_batch` returns
the kept visual positions per sample.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.mapper import TokenMapper
from tokenprune_kernels.ops import select_topk
from tokenprune_kernels.training.data import topk_mask
from tokenprune_kernels.transformers import default_instruction_mask_for
from tokenprune_kernels.transformers.core import Layer0, TokenPruneConfig, prune_inputs
from tokenprune_kernels.transformers.qwen import layer0_of

INPUT_METHODS: tuple[str, ...] = (
    "oracle",
    "mapper",
    "attention",
    "mapper_spread",
    "attention_spread",
    "dart",
    "divprune",
    "random",
    "uniform",
)
"""Methods that choose visual tokens at the LLM input."""
SPREAD_METHODS: dict[str, str] = {"mapper_spread": "mapper", "attention_spread": "attention"}
"""The spread-rule methods and the method whose scores they select from."""
SPREAD_RADIUS = 1
"""Radius of the spread rule (Chebyshev distance on the merged token grid) of the spread methods."""
LLM_METHODS: tuple[str, ...] = ("fastv", "fastv1")
"""Methods that prune inside the LLM."""
METHODS: tuple[str, ...] = ("none", *INPUT_METHODS, *LLM_METHODS)
"""Every method name (``none``: no pruning)."""

FASTV_LAYER = 2
"""FastV's ``K``: the visual tokens are scored by the last token's attention at layer ``K``."""
FASTV_LAYERS: dict[str, int] = {"fastv": FASTV_LAYER, "fastv1": 1}
"""The pruning layer ``K`` of each in-LLM method."""
DART_PIVOTS = 8
"""Pivot tokens of the DART-like method."""


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not hasattr(base, "language_model") or not hasattr(base, "get_rope_index"):
        raise ValueError(
            f"model must be a Qwen2-VL model (language_model, get_rope_index), got "
            f"{type(model).__name__}"
        )
    return base


def keep_count(n: int, ratio: float) -> int:
    """Visual tokens kept of ``n`` at ``ratio``: ``clamp(floor(ratio * n + 0.5), 1, n)``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {ratio!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return max(1, min(n, math.floor(float(ratio) * n + 0.5)))


@dataclass
class Prepared:
    """One prompt ready for the language model (batch of one, no padding).

    Attributes:
        inputs: the processor inputs of this prompt (``input_ids [1, L]``, ``attention_mask``,
            ``mm_token_type_ids``, ``pixel_values [P, C]``, ``image_grid_thw [1, 3]``).
        embeds: ``[1, L, H]`` LLM input embeddings with the visual features merged in.
        position_ids: ``[3, 1, L]`` int64 M-RoPE ids (the model's ``get_rope_index``).
        visual_positions: ``[n_v]`` int64 sequence positions of the visual tokens (ascending).
        grid: ``(t, h, w)`` of the MERGED visual-token grid (row-major = visual order).
    """

    inputs: dict[str, torch.Tensor]
    embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_positions: torch.Tensor
    grid: tuple[int, int, int]

    @property
    def n_visual(self) -> int:
        """Visual tokens of the prompt."""
        return int(self.visual_positions.numel())

    @property
    def visual_mask(self) -> torch.Tensor:
        """``[1, L]`` bool, True at the visual tokens."""
        mask = torch.zeros(1, self.embeds.shape[1], dtype=torch.bool, device=self.embeds.device)
        mask[0, self.visual_positions] = True
        return mask

    @property
    def visual_embeds(self) -> torch.Tensor:
        """``[n_v, H]`` the visual tokens' LLM input embeddings."""
        return self.embeds[0, self.visual_positions]


def split_batch(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Cut a padded processor batch (one image per prompt) into batch-of-one inputs without
    pads: ``pixel_values`` split by ``image_grid_thw``, pads dropped by ``attention_mask``."""
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        if not isinstance(inputs.get(key), torch.Tensor):
            raise ValueError(f"inputs must hold a tensor {key!r} (processor output)")
    ids = inputs["input_ids"]
    grid = inputs["image_grid_thw"]
    if grid.shape[0] != ids.shape[0]:
        raise ValueError(
            f"inputs must hold one image per prompt: {ids.shape[0]} prompts, {grid.shape[0]} "
            "image_grid_thw rows"
        )
    counts = grid.prod(-1).tolist()
    pixels = torch.split(inputs["pixel_values"], counts)
    mask = inputs.get("attention_mask")
    out = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool() if mask is not None else torch.ones_like(ids[b], dtype=torch.bool)
        one: dict[str, torch.Tensor] = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key == "pixel_values":
                one[key] = pixels[b]
            elif key == "image_grid_thw":
                one[key] = grid[b : b + 1]
            elif value.dim() == 2 and value.shape == ids.shape:
                one[key] = value[b : b + 1, keep]
        out.append(one)
    return out


@torch.no_grad()
def prepare(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Prepared:
    """Vision tower, merge and M-RoPE ids of ONE prompt (what the model's forward does before
    its language model).

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` (or its ``.model``).
        inputs: processor inputs of a batch of one without pads (see :func:`split_batch`).

    Returns:
        :class:`Prepared`.
    """
    base = _base(model)
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"inputs['input_ids'] must be [1, L], got {list(ids.shape)}")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("inputs must have no padding (use split_batch)")
    device = next(base.parameters()).device
    ids = ids.to(device)
    grid_thw = inputs["image_grid_thw"].to(device)
    embeds = base.get_input_embeddings()(ids)
    feats = base.get_image_features(inputs["pixel_values"].to(device), grid_thw)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), dim=0)
    feats = feats.to(embeds.dtype)
    visual = ids[0] == base.config.image_token_id
    if int(visual.sum()) != feats.shape[0]:
        raise ValueError(f"{int(visual.sum())} image tokens but {feats.shape[0]} image features")
    embeds = embeds.clone()
    embeds[0, visual] = feats
    kwargs: dict[str, Any] = {"image_grid_thw": grid_thw}
    if inputs.get("mm_token_type_ids") is not None:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"].to(device)
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    pos, _ = base.get_rope_index(ids, **kwargs)
    merge = int(base.config.vision_config.spatial_merge_size)
    t, h, w = (int(v) for v in inputs["image_grid_thw"][0].tolist())
    return Prepared(
        inputs=inputs,
        embeds=embeds,
        position_ids=pos.to(torch.int64),
        visual_positions=visual.nonzero().flatten(),
        grid=(t, h // merge, w // merge),
    )


# --------------------------------------------------------------------------------------------
# Running the language model
# --------------------------------------------------------------------------------------------


def _keep_positions(prep: Prepared, kept_visual: torch.Tensor) -> torch.Tensor:
    """All text positions plus the kept visual positions, ascending: ``[L']`` int64."""
    keep = ~prep.visual_mask[0]
    keep[kept_visual.to(keep.device)] = True
    return keep.nonzero().flatten()


@torch.no_grad()
def pruned_logits(
    model: nn.Module, prep: Prepared, kept_visual: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token logits at the last prompt position after keeping only ``kept_visual``.

    Args:
        model: the ``Qwen2VLForConditionalGeneration``.
        prep: from :func:`prepare`.
        kept_visual: ``[k]`` int64 sequence positions of the kept visual tokens (None: all).

    Returns:
        ``[V]`` float32 logits.
    """
    base = _base(model)
    embeds, pos = prep.embeds, prep.position_ids
    if kept_visual is not None:
        keep = _keep_positions(prep, kept_visual)
        embeds, pos = embeds[:, keep], pos[:, :, keep]
    out = base.language_model(
        inputs_embeds=embeds, position_ids=pos, attention_mask=None, use_cache=False
    )
    return model.lm_head(out.last_hidden_state[:, -1])[0].float()


def answer_token(logits: torch.Tensor) -> int:
    """The answer token: argmax of ``logits [V]`` over the full vocabulary."""
    return int(torch.argmax(logits))


def _rotary(lm: nn.Module, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return lm.rotary_emb(h, pos)


def _causal(lm: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """None where the attention implementation applies causality itself (sdpa without a mask),
    else an additive ``[1, 1, L, L]`` causal mask."""
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl == "sdpa":
        return None
    n = h.shape[1]
    mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
    return mask.triu(1)[None, None]


@torch.no_grad()
def fastv_select(
    model: nn.Module, prep: Prepared, hidden: torch.Tensor, keep: int, layer: int = FASTV_LAYER
) -> torch.Tensor:
    """FastV's choice from the hidden states entering decoder layer ``layer``.

    Args:
        hidden: ``[1, L, H]`` the input of layer ``layer`` (full sequence).
        keep: visual tokens to keep.

    Returns:
        ``[keep]`` int64 sequence positions (ascending) of the visual tokens with the highest
        head-mean attention from the LAST token at layer ``layer`` (softmax over all ``L`` keys;
        ties to the lower index).
    """
    base = _base(model)
    lm = base.language_model
    lay = lm.layers[layer]
    module = sys.modules[type(lay.self_attn).__module__]

    def rotary(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm.rotary_emb(x, p)

    l0 = Layer0.from_decoder_layer(lay, rotary, module.apply_rotary_pos_emb)
    n = hidden.shape[1]
    q = l0.queries(hidden[0, n - 1 :], prep.position_ids[:, :, n - 1 :])  # [1, Hq, D]
    k = l0.keys(hidden[0], prep.position_ids)  # [L, Hk, D]
    rep = l0.num_heads // l0.num_kv_heads
    k = k.repeat_interleave(rep, dim=1)  # [L, Hq, D]
    scale = l0.scaling if l0.scaling is not None else l0.head_dim**-0.5
    logits = torch.einsum("hd,lhd->hl", q[0].float(), k.float()) * scale
    attn = torch.softmax(logits, dim=-1).mean(0)  # [L]
    scores = attn[prep.visual_positions]
    return _top(scores, keep, prep)


@torch.no_grad()
def fastv_logits(
    model: nn.Module, prep: Prepared, keep: int, layer: int = FASTV_LAYER
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastV-like prefill: layers ``< layer`` on the full sequence, prune by the last token's
    attention at ``layer`` (:func:`fastv_select`), the remaining layers on the kept tokens with
    their original positions.

    Returns:
        ``(logits [V] float32 at the last position, kept visual positions [keep] int64)``.
    """
    base = _base(model)
    lm = base.language_model
    n_layers = len(lm.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    h = prep.embeds
    pos = prep.position_ids
    rope = _rotary(lm, h, pos)
    mask = _causal(lm, h)
    for i in range(layer):
        h = lm.layers[i](h, attention_mask=mask, position_embeddings=rope, use_cache=False)
    kept = fastv_select(model, prep, h, keep, layer)
    idx = _keep_positions(prep, kept)
    h, pos = h[:, idx], pos[:, :, idx]
    rope = _rotary(lm, h, pos)
    mask = _causal(lm, h)
    for i in range(layer, n_layers):
        h = lm.layers[i](h, attention_mask=mask, position_embeddings=rope, use_cache=False)
    h = lm.norm(h)
    return model.lm_head(h[:, -1])[0].float(), kept


# --------------------------------------------------------------------------------------------
# Input-level selections
# --------------------------------------------------------------------------------------------


def _top(scores: torch.Tensor, keep: int, prep: Prepared) -> torch.Tensor:
    """Sequence positions of the ``keep`` highest ``scores [n_v]`` (ties: lower index),
    ascending."""
    n = scores.numel()
    mask = topk_mask(
        scores.float().reshape(1, n),
        torch.tensor([n]),
        torch.tensor([keep]),
    )[0]
    return prep.visual_positions[mask.to(prep.visual_positions.device)]


def _from_visual_index(prep: Prepared, idx: torch.Tensor) -> torch.Tensor:
    return prep.visual_positions[torch.sort(idx.to(prep.visual_positions.device)).values]


def select_scores(prep: Prepared, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Top-``keep`` visual tokens by a given score ``[n_v]`` (e.g. the oracle labels)."""
    if scores.dim() != 1 or scores.numel() != prep.n_visual:
        raise ValueError(f"scores must be [n_v] = [{prep.n_visual}], got {list(scores.shape)}")
    return _top(scores, keep, prep)


@torch.no_grad()
def select_layer0(
    model: nn.Module, prep: Prepared, keep: int, mapper: TokenMapper | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours: layer-0 instruction attention (``mapper=None``) or the mapper on it, through
    :func:`~tokenprune_kernels.transformers.core.prune_inputs` (the code the patched model runs).

    Returns:
        ``(kept visual positions [keep] int64 ascending, scores [n_v] float32)``.
    """
    base = _base(model)
    ids = prep.inputs["input_ids"].to(prep.embeds.device)
    pruned = prune_inputs(
        prep.embeds,
        prep.visual_mask,
        prep.position_ids,
        layer0_of(base),
        TokenPruneConfig(keep_count=keep, mapper=mapper),
        instruction_mask=default_instruction_mask_for(base, ids, prep.visual_mask),
    )
    return torch.sort(pruned.kept_visual[0]).values, pruned.scores[0]


def grid_coords(grid: tuple[int, int, int]) -> torch.Tensor:
    """``[t * h * w, 3]`` int64 ``(frame, row, col)`` of a ``t x h x w`` merged token grid in
    raster order (the visual tokens' order): the spread rule's coordinates."""
    t, h, w = (int(v) for v in grid)
    if min(t, h, w) < 1:
        raise ValueError(f"grid must be (t, h, w) with every entry >= 1, got {grid!r}")
    f, r, c = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([f.flatten(), r.flatten(), c.flatten()], dim=1)


def spread_keep(
    scores: torch.Tensor, grid: tuple[int, int, int], keep: int, radius: int = SPREAD_RADIUS
) -> torch.Tensor:
    """The spread rule on one prompt: the ``keep`` tokens kept of ``scores [n_v]`` (raster
    order of the merged ``grid (t, h, w)``, ``n_v = t * h * w``) when the tokens are taken in
    score order (ties: lower index) and a token within Chebyshev distance ``radius`` of one
    already taken (same frame) waits until every other token is taken (``docs/contract.md``,
    stage c, "Spread rule").

    The ONE place the eval calls the rule: the public op, ``select_topk(scores, cu,
    keep_count=keep, spread_coords=coords, spread_radius=radius)`` (the kernel the op table
    picks; parity with :func:`tokenprune_kernels.reference.spread_select_ref` is tested).

    Returns:
        ``[keep]`` int64 indices into the visual tokens, ascending.
    """
    n = scores.numel()
    if scores.dim() != 1 or n != math.prod(grid):
        raise ValueError(f"scores must be [t * h * w] for grid {grid}, got {list(scores.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}], got {keep!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    cu = torch.tensor([0, n], dtype=torch.int64)
    coords = grid_coords(grid)
    kept, _ = select_topk(
        scores.detach().float().cpu(),
        cu,
        keep_count=keep,
        spread_coords=coords,
        spread_radius=radius,
    )
    return kept


def select_spread(
    prep: Prepared, scores: torch.Tensor, keep: int, radius: int = SPREAD_RADIUS
) -> torch.Tensor:
    """Sequence positions (ascending) of the ``keep`` visual tokens :func:`spread_keep` keeps of
    ``scores [n_v]`` on the prompt's merged grid."""
    if scores.dim() != 1 or scores.numel() != prep.n_visual:
        raise ValueError(f"scores must be [n_v] = [{prep.n_visual}], got {list(scores.shape)}")
    return _from_visual_index(prep, spread_keep(scores, prep.grid, keep, radius))


def select_random(prep: Prepared, keep: int, seed: int) -> torch.Tensor:
    """A uniformly random subset of ``keep`` visual tokens (``torch.Generator`` seeded with
    ``seed``)."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(prep.n_visual, generator=g)[:keep]
    return _from_visual_index(prep, idx)


def uniform_grid_indices(t: int, h: int, w: int, keep: int) -> torch.Tensor:
    """``keep`` row-major indices of a ``t x h x w`` token grid on a regular 2-D lattice.

    Per frame: ``r`` rows and ``c`` columns (``r / c`` close to ``h / w``, ``r * c >= keep``),
    cell centres rounded down; when the lattice has more points than needed, evenly spaced
    points of it (in raster order) are taken. ``t > 1`` splits ``keep`` evenly over frames.

    Returns:
        ``[keep]`` int64, ascending, distinct.
    """
    n = t * h * w
    if keep < 1 or keep > n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    out = []
    per = [keep // t + (1 if f < keep % t else 0) for f in range(t)]
    for f, k in enumerate(per):
        if k == 0:
            continue
        r = max(1, min(h, round(math.sqrt(k * h / w))))
        c = max(1, min(w, math.ceil(k / r)))
        if r * c < k:
            r = min(h, math.ceil(k / c))
        rows = ((torch.arange(r, dtype=torch.float64) + 0.5) * h / r).floor().to(torch.int64)
        cols = ((torch.arange(c, dtype=torch.float64) + 0.5) * w / c).floor().to(torch.int64)
        pts = (rows[:, None] * w + cols[None, :]).flatten()
        if pts.numel() > k:
            sel = torch.linspace(0, pts.numel() - 1, k, dtype=torch.float64).round().long()
            pts = pts[sel]
        out.append(pts + f * h * w)
    return torch.sort(torch.cat(out)).values


def select_uniform(prep: Prepared, keep: int) -> torch.Tensor:
    """Regular 2-D subsampling of the merged grid (:func:`uniform_grid_indices`)."""
    t, h, w = prep.grid
    if t * h * w != prep.n_visual:
        raise ValueError(f"grid {prep.grid} does not hold the {prep.n_visual} visual tokens")
    return _from_visual_index(prep, uniform_grid_indices(t, h, w, keep))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@torch.no_grad()
def select_dart(prep: Prepared, keep: int, n_pivots: int = DART_PIVOTS) -> torch.Tensor:
    """DART-like: pivots = the ``n_pivots`` visual embeddings of largest L2 norm (ties: lower
    index); the others ranked by their largest cosine similarity to a pivot, least similar
    first (ties: lower index); pivots are kept first."""
    x = prep.visual_embeds.float()
    n = x.shape[0]
    p = min(n_pivots, keep)
    norms = x.norm(dim=-1)
    piv_mask = topk_mask(norms[None], torch.tensor([n]), torch.tensor([p]))[0]
    u = _unit(x)
    sim = (u @ u[piv_mask].T).amax(-1)  # [n]
    score = torch.where(piv_mask, torch.full_like(sim, float("inf")), -sim)
    return _top(score, keep, prep)


@torch.no_grad()
def select_divprune(prep: Prepared, keep: int) -> torch.Tensor:
    """DivPrune-like: greedy max-min (farthest point) on the cosine distance of the visual
    embeddings; the first token has the largest mean distance to all (ties: lower index)."""
    u = _unit(prep.visual_embeds)
    dist = 1.0 - u @ u.T  # [n, n]
    n = dist.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    first = int(torch.argmax(dist.mean(1)))
    order = [first]
    chosen[first] = True
    mind = dist[first].clone()
    for _ in range(keep - 1):
        cand = torch.where(chosen, torch.full_like(mind, -1.0), mind)
        nxt = int(torch.argmax(cand))
        order.append(nxt)
        chosen[nxt] = True
        mind = torch.minimum(mind, dist[nxt])
    return _from_visual_index(prep, torch.tensor(order))


def select(
    method: str,
    model: nn.Module,
    prep: Prepared,
    keep_ratio: float,
    *,
    mapper: TokenMapper | None = None,
    label: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Kept visual positions of one prompt for an input-level ``method`` (or an in-LLM method
    of :data:`LLM_METHODS`: the full prefill's choice; ``none``: every visual token).

    Args:
        method: one of :data:`METHODS`.
        model: the Qwen2-VL model.
        prep: from :func:`prepare`.
        keep_ratio: in ``(0, 1]``.
        mapper: needed by ``mapper`` and ``mapper_spread``.
        label: ``[n_v]`` relevance, needed by ``oracle``.
        seed: ``random``'s seed.

    Returns:
        ``[k]`` int64 sequence positions, ascending.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    keep = keep_count(prep.n_visual, keep_ratio)
    if method == "none":
        return prep.visual_positions.clone()
    if method == "oracle":
        if label is None:
            raise ValueError("method 'oracle' needs label (the sample's relevance [n_v])")
        return select_scores(prep, label, keep)
    if method == "mapper":
        if mapper is None:
            raise ValueError("method 'mapper' needs mapper (a TokenMapper)")
        return select_layer0(model, prep, keep, mapper)[0]
    if method == "attention":
        return select_layer0(model, prep, keep, None)[0]
    if method in SPREAD_METHODS:
        if method == "mapper_spread" and mapper is None:
            raise ValueError("method 'mapper_spread' needs mapper (a TokenMapper)")
        use = mapper if method == "mapper_spread" else None
        return select_spread(prep, select_layer0(model, prep, keep, use)[1], keep)
    if method == "dart":
        return select_dart(prep, keep)
    if method == "divprune":
        return select_divprune(prep, keep)
    if method == "random":
        return select_random(prep, keep, seed)
    if method == "uniform":
        return select_uniform(prep, keep)
    return fastv_logits(model, prep, keep, FASTV_LAYERS[method])[1]


def select_batch(
    method: str,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    keep_ratio: float,
    *,
    mapper: TokenMapper | None = None,
    labels: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """:func:`select` for every prompt of a processor batch (one image each).

    Returns:
        Per sample, ``[k_b]`` int64 positions of the kept visual tokens in that sample's
        UNPADDED sequence (ascending). ``random`` uses ``seed + b`` for sample ``b``.
    """
    out = []
    for b, one in enumerate(split_batch(inputs)):
        prep = prepare(model, one)
        label = None if labels is None else labels[b]
        out.append(
            select(method, model, prep, keep_ratio, mapper=mapper, label=label, seed=seed + b)
        )
    return out


__all__ = [
    "DART_PIVOTS",
    "FASTV_LAYER",
    "FASTV_LAYERS",
    "INPUT_METHODS",
    "LLM_METHODS",
    "METHODS",
    "SPREAD_METHODS",
    "SPREAD_RADIUS",
    "Prepared",
    "answer_token",
    "fastv_logits",
    "fastv_select",
    "grid_coords",
    "keep_count",
    "prepare",
    "pruned_logits",
    "select",
    "select_batch",
    "select_dart",
    "select_divprune",
    "select_layer0",
    "select_random",
    "select_scores",
    "select_spread",
    "select_uniform",
    "split_batch",
    "spread_keep",
    "uniform_grid_indices",
]
