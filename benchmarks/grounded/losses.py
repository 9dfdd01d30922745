"""Losses of the grounded recipe: the answer loss and the training-only auxiliary losses (none
of their parameters are part of the model).

- :func:`answer_loss`: teacher-forced next-token cross-entropy on the answer tokens and the
  ``<|im_end|>`` after each.
- :func:`shape_probe_loss`: a linear probe (:func:`shape_probe`) classifies each merged visual
  token's shape, so that the vision tower learns shapes early.
- :class:`LLMAux`: on the language model, a position probe after the first decoder layer and the
  attention of one head from the token that predicts each answer onto the objects the question
  is about.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.grounded.batches import FINE_DIGIT0, FINE_SMALL0, answer_positions
from tokenprune_kernels.grounded.model import IM_END, IMAGE_PAD, TOKEN_ID
from tokenprune_kernels.grounded.scenes import ALL_QUESTION_TYPES, COLOURS, SHAPES

SPATIAL_TYPES = ("left_of", "extreme")
"""Question types that compare positions: :class:`LLMAux`'s default ``early_types``."""
POS_SCALE = 24.0
"""Token rows / columns are divided by this (the longest side of the training grids) as the
targets of :class:`LLMAux`'s position probe."""


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the labelled positions (``logits[:, t]`` predicts
    ``labels[:, t + 1]``). ``logits [S, L, V]``, ``labels [S, L]`` int64 with -100 ignored."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def answer_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Cross-entropy of each ANSWER token (not its ``<|im_end|>``), in sequence order then
    position order (the order of the questions of the training batch). ``logits [S, L, V]``,
    ``labels [S, L]`` as for :func:`answer_loss`."""
    lab = labels[:, 1:]
    answer = (lab != -100) & (lab != TOKEN_ID[IM_END])
    rows, cols = answer.nonzero(as_tuple=True)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1][rows, cols].float(), lab[rows, cols], reduction="none"
    )
    return ce.tolist()


def shape_probe(hidden: int, classes: int = 1 + len(SHAPES)) -> torch.nn.Linear:
    """The shape probe: merged visual features ``[N, hidden]`` -> ``classes`` logits
    (background, then each shape; with ``--fine-probe``
    :data:`~benchmarks.grounded.batches.FINE_CLASSES`: each glyph digit, then each small
    object's shape after them)."""
    return torch.nn.Linear(hidden, classes)


def shape_probe_loss(
    probe: torch.nn.Module, feats: torch.Tensor, batch: dict[str, Any]
) -> torch.Tensor:
    """The probe's cross-entropy against ``batch["token_shape"]`` (see
    :func:`~benchmarks.grounded.batches.token_shape_labels`): the mean over object tokens plus a
    quarter of the mean over background tokens; with the fine classes (``--fine-probe``) plus
    the mean over glyph (digit) tokens and the mean over small-object tokens, which the objects'
    mean leaves out. ``feats [N, hidden]``, one row per visual token of the batch."""
    target = batch["token_shape"]
    if target.shape[0] != feats.shape[0]:
        raise ValueError(f"token_shape has {target.shape[0]} labels for {feats.shape[0]} tokens")
    out = probe(feats.float())
    ce = torch.nn.functional.cross_entropy(out, target, reduction="none")
    if out.shape[1] <= 1 + len(SHAPES):
        return _balanced(ce, target > 0)
    # --fine-probe: a glyph or a small object holds one to a few of a scene's ~50 - 150 object
    # tokens, so glyph tokens and small-object tokens each get a mean of their own instead of
    # vanishing in the objects' mean
    glyph = (target >= FINE_DIGIT0) & (target < FINE_SMALL0)
    small = target >= FINE_SMALL0
    rest = ~(glyph | small)
    loss = _balanced(ce[rest], target[rest] > 0)
    for few in (glyph, small):
        if few.any():
            loss = loss + ce[few].mean()
    return loss


def _balanced(loss: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over ``positive`` entries + a quarter of the mean over the others."""
    out = 0.25 * loss[~positive].mean() if (~positive).any() else loss.new_zeros(())
    return out + loss[positive].mean() if positive.any() else out


class LLMAux(torch.nn.Module):
    """Auxiliary losses on the LANGUAGE model's internals (training only; not part of the model).

    - position (``pos_weight > 0``): a linear probe reads the hidden state of every visual token
      after decoder layer ``pos_layer - 1`` (``hidden_states[pos_layer]``) and regresses its
      token row and column (divided by :data:`POS_SCALE`); mean squared error. Qwen2-VL gives
      visual tokens no absolute position (the tower and M-RoPE are relative), so a comparison
      of two objects' columns needs it computed; this teaches the first layers to write it into
      the tokens, where later layers can read it with the object's colour and shape.
    - attention (``attn_weight > 0``): head ``attn_head`` of decoder layer ``attn_layer``, from
      the position that predicts each answer (the ``assistant`` token), should put its mass on
      the visual tokens of ``batch["attn_target"]`` (the objects the question involves; for
      ``left_of`` the left object of its pair): ``-log`` of that mass, averaged over the
      questions whose target holds a token. With ``early_layer`` the questions of
      ``early_types`` (``batch["qtypes"]``) supervise head ``attn_head`` of decoder layer
      ``early_layer`` instead, and the others keep ``attn_layer``: spatial answers read
      positions early, where the position probe keeps them, shape answers read late, once an
      object's tokens have pooled its shape. With ``count_sink`` the counting questions
      (``batch["count_target"]`` not ``None``) instead take the KL divergence from their
      target distribution (:func:`~benchmarks.grounded.batches.count_weights`: ``1 / (n + 1)``
      on each of the ``n`` counted objects and on the sequence's first token, a sink) to the
      head's probabilities, so that the head's output carries the count, also for ``n = 0``;
      ``count_head`` (default ``attn_head``) names the head those questions supervise.
    - query (``query_weight > 0``; needs the attention hooks, ``attn_weight > 0``): a linear
      probe reads the input of decoder layer ``attn_layer`` (after its input norm: what its
      query projection reads) at the ``assistant`` token of each counting question and
      classifies the colour and the shape the question asks for
      (``batch["count_query"]``, :func:`~benchmarks.grounded.batches.count_query`); the sum of
      the two cross-entropies, averaged over those questions. A count head can only pick the
      asked kind's tokens if its query knows the kind.
      The probabilities of those few query rows are
      recomputed from the layers' inputs (forward pre-hooks installed by :meth:`attach`), so
      the model keeps its fast attention and never materialises attention matrices.
    """

    def __init__(
        self,
        hidden: int,
        pos_weight: float = 0.0,
        pos_layer: int = 1,
        attn_weight: float = 0.0,
        attn_layer: int = -1,
        attn_head: int = 0,
        early_layer: int | None = None,
        early_types: Sequence[str] = SPATIAL_TYPES,
        count_sink: bool = False,
        count_head: int | None = None,
        query_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.query_weight = float(query_weight)
        if self.query_weight > 0 and float(attn_weight) <= 0:
            raise ValueError("query_weight > 0 needs the attention hooks: attn_weight > 0")
        self.count_sink = bool(count_sink)
        self.count_head = int(attn_head if count_head is None else count_head)
        self.pos_weight, self.pos_layer = float(pos_weight), int(pos_layer)
        self.attn_weight, self.attn_layer = float(attn_weight), int(attn_layer)
        self.attn_head = int(attn_head)
        self.early_layer = None if early_layer is None else int(early_layer)
        unknown = sorted(set(early_types) - set(ALL_QUESTION_TYPES))
        if unknown:
            raise ValueError(f"early_types must be of {ALL_QUESTION_TYPES}, got {unknown}")
        self.early_types = tuple(early_types)
        self.pos = torch.nn.Linear(hidden, 2)
        # created only when used: the shipped recipe's parameters draw the same random numbers
        self.query = (
            torch.nn.Linear(hidden, len(COLOURS) + len(SHAPES)) if self.query_weight > 0 else None
        )
        # layer index (from 0) -> (attention module, hook handle): not submodules
        self._attn: dict[int, tuple[Any, Any]] = {}
        self._n_layers = 0  # of the attached model
        self._inputs: dict[int, dict[str, Any]] = {}
        self._apply_rotary: Any = None  # the modeling module's apply_rotary_pos_emb

    def attach(self, model: Any) -> None:
        """Hook the attention of decoder layer ``attn_layer`` (and ``early_layer``) of
        ``model`` (a Qwen2-VL) so that :meth:`answer_probs` can recompute its answer rows after
        each forward.

        Raises:
            ValueError: ``attn_layer`` or ``early_layer`` is not a decoder layer of ``model``,
                or ``attn_head`` not one of its heads.
        """
        self.detach()
        layers = model.model.language_model.layers
        for name in ("attn_layer", "early_layer"):
            index = getattr(self, name)
            if index is not None and not -len(layers) <= index < len(layers):
                raise ValueError(
                    f"{name} must index one of the {len(layers)} decoder layers, got {index}"
                )
        attn = layers[self.attn_layer].self_attn
        heads = attn.config.num_attention_heads
        if not 0 <= self.attn_head < heads:
            raise ValueError(
                f"attn_head must be in [0, {heads}) for {heads} heads, got {self.attn_head}"
            )
        if not 0 <= self.count_head < heads:
            raise ValueError(
                f"count_head must be in [0, {heads}) for {heads} heads, got {self.count_head}"
            )
        self._apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def grabber(index: int) -> Any:
            def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._inputs[index] = {
                    "hidden": kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                    "rope": kwargs.get("position_embeddings"),
                }

            return grab

        self._n_layers = len(layers)
        wanted = {self.attn_layer, self.early_layer} - {None}
        for index in {i % len(layers) for i in wanted}:  # -1 and 3 of 4 layers: one hook
            module = layers[index].self_attn
            hook = module.register_forward_pre_hook(grabber(index), with_kwargs=True)
            self._attn[index] = (module, hook)

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` (if any)."""
        for _, hook in self._attn.values():
            hook.remove()
        self._attn, self._inputs = {}, {}

    def answer_probs(
        self, batch: dict[str, Any], head: int | None = None, layer: int | None = None
    ) -> list[tuple[int, int, torch.Tensor]]:
        """``(row, col, probs [L])`` per answer, in question order: the attention
        probabilities of head ``head`` (default ``attn_head``) of layer ``layer`` (default
        ``attn_layer``; a hooked one) from the ``assistant`` token ``col`` of sequence ``row``
        over the keys ``0 .. L-1`` (0 after ``col`` and on padding), from the inputs of the last
        forward (:meth:`attach` first)."""
        layer = self.attn_layer if layer is None else int(layer)
        if self._n_layers:
            layer %= self._n_layers
        if layer not in self._attn or layer not in self._inputs:
            raise RuntimeError(
                f"LLMAux.answer_probs needs attach(model) and a forward first (layer {layer})"
            )
        attn = self._attn[layer][0]
        hidden, rope = self._inputs[layer]["hidden"], self._inputs[layer]["rope"]
        if rope is None or rope[0].dim() != 3:
            raise RuntimeError(
                "LLMAux expects the attention's position_embeddings as (cos, sin) of shape "
                "[batch, length, head_dim] (transformers >= 5)"
            )
        cos, sin = rope
        d = attn.head_dim
        group = attn.config.num_attention_heads // attn.config.num_key_value_heads
        qh = self.attn_head if head is None else int(head)
        kh = qh // group

        def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            # x [T, D], c / s [T, D]: the model's own rotary on a [1, 1, T, D] view
            y = x[None, None]
            return self._apply_rotary(y, y, c[None], s[None])[0][0, 0]

        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        answers = answer_positions(ids)
        out: list[tuple[int, int, torch.Tensor]] = []
        for row in sorted({r for r, _ in answers}):
            cols = [c for r, c in answers if r == row]
            h = hidden[row]
            k = attn.k_proj(h).view(h.shape[0], -1, d)[:, kh]
            k = rotate(k, cos[row], sin[row])
            q = attn.q_proj(h[cols]).view(len(cols), -1, d)[:, qh]
            q = rotate(q, cos[row, cols], sin[row, cols])
            logits = (q @ k.t()) * attn.scaling  # [answers, L]
            key = torch.arange(h.shape[0])
            allowed = (key[None, :] <= torch.tensor(cols)[:, None]) & real[row][None, :]
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            out.extend((row, c, probs[i]) for i, c in enumerate(cols))
        return out

    def _question_rows(
        self, batch: dict[str, Any], head: int
    ) -> list[tuple[int, int, torch.Tensor]]:
        """:meth:`answer_probs` of ``head`` per question: at ``early_layer`` for the
        ``early_types`` questions (``batch["qtypes"]``), else at ``attn_layer``."""
        probs = self.answer_probs(batch, head=head)
        if self.early_layer is None:
            return probs
        early = self.answer_probs(batch, head=head, layer=self.early_layer)
        qtypes = batch["qtypes"]
        if len(qtypes) != len(probs):
            raise ValueError(f"{len(probs)} answers for {len(qtypes)} question types")
        return [
            e if t in self.early_types else p for p, e, t in zip(probs, early, qtypes, strict=True)
        ]

    def _query_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The query probe's loss (see the class docstring); 0 without counting questions."""
        layer = self.attn_layer % self._n_layers if self._n_layers else self.attn_layer
        if self.query is None or layer not in self._inputs:
            raise RuntimeError(
                "LLMAux query probe needs query_weight > 0, attach(model) and a forward first"
            )
        hidden = self._inputs[layer]["hidden"]
        wanted = batch["count_query"]
        ids = batch["input_ids"]
        answers = answer_positions(ids)
        if len(answers) != len(wanted):
            raise ValueError(f"{len(answers)} answers for {len(wanted)} count queries")
        rows = [(r, c, w) for (r, c), w in zip(answers, wanted, strict=True) if w is not None]
        if not rows:
            return torch.zeros(())
        out = self.query(torch.stack([hidden[r, c] for r, c, _ in rows]).float())
        colour = torch.tensor([w[0] for _, _, w in rows])
        shape = torch.tensor([w[1] for _, _, w in rows])
        ce = torch.nn.functional.cross_entropy
        loss = ce(out[:, : len(COLOURS)], colour)
        if bool((shape >= 0).any()):
            loss = loss + ce(out[:, len(COLOURS) :], shape, ignore_index=-1)
        return loss

    def forward(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"pos": loss, "attn": loss}`` (the enabled ones, unweighted) from the model's
        ``outputs`` (with ``hidden_states`` for the position probe) and the batch of
        :func:`~benchmarks.grounded.batches.training_batch`."""
        ids = batch["input_ids"]
        visual = ids == TOKEN_ID[IMAGE_PAD]
        rows = visual.shape[0]
        n = int(visual[0].sum())
        if not bool((visual.sum(1) == n).all()):
            raise ValueError("every sequence of a batch must hold one image of the batch's size")
        grid = batch["image_grid_thw"][0]
        width = int(grid[2]) // 2
        losses: dict[str, torch.Tensor] = {}
        if self.pos_weight > 0:
            states = outputs.hidden_states
            if not 1 <= self.pos_layer < len(states):
                raise ValueError(
                    f"pos_layer must be in [1, {len(states) - 1}] (the hidden states after a "
                    f"decoder layer), got {self.pos_layer}"
                )
            h = states[self.pos_layer][visual].view(rows, n, -1)
            k = torch.arange(n)
            target = torch.stack([k // width, k % width], 1).float() / POS_SCALE
            pred = self.pos(h.float())
            losses["pos"] = torch.nn.functional.mse_loss(pred, target.expand_as(pred))
        if self.attn_weight > 0:
            masks = batch["attn_target"]
            positions = visual.nonzero()[:, 1].view(rows, n)  # each row's visual positions
            probs = self._question_rows(batch, self.attn_head)
            if len(probs) != len(masks):
                raise ValueError(f"{len(probs)} answers for {len(masks)} questions' masks")
            counts = batch.get("count_target") if self.count_sink else None
            if counts is None:
                counts = [None] * len(masks)
            elif len(counts) != len(masks):
                raise ValueError(f"{len(counts)} count targets for {len(masks)} questions' masks")
            if any(w is not None for w in counts) and self.count_head != self.attn_head:
                own = self._question_rows(batch, self.count_head)
                probs = [
                    c if w is not None else p for p, c, w in zip(probs, own, counts, strict=True)
                ]
            first = batch["attention_mask"].long().argmax(1)  # each row's first real token
            terms = []
            for (row, _, p), mask, weights in zip(probs, masks, counts, strict=True):
                if weights is not None:
                    terms.append(_count_kl(p, positions[row], int(first[row]), weights))
                elif mask.any():
                    terms.append(-torch.log(p[positions[row, mask]].sum() + 1e-4))
            losses["attn"] = torch.stack(terms).mean() if terms else torch.zeros(())
        if self.query_weight > 0:
            losses["query"] = self._query_loss(batch)
        return losses


def _count_kl(
    probs: torch.Tensor, visual: torch.Tensor, sink: int, weights: torch.Tensor
) -> torch.Tensor:
    """``KL(target || probs)`` of one counting question's answer row: the target puts
    ``weights [visual tokens]`` on the positions ``visual`` and the rest of the unit mass on
    position ``sink`` (``probs [L]``: the head's attention probabilities)."""
    w = weights.to(probs.dtype)
    if bool((w < 0).any()) or float(w.sum()) > 1.0 + 1e-5:
        raise ValueError(
            f"count_target weights must be >= 0 and sum to at most 1, got sum {float(w.sum())}"
        )
    target = torch.cat([(1.0 - w.sum()).clamp_min(0.0).view(1), w])  # rounding only
    p = torch.cat([probs[sink].view(1), probs[visual]])
    keep = target > 0
    t = target[keep]
    return (t * (torch.log(t) - torch.log(p[keep] + 1e-6))).sum()
