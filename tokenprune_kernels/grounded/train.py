"""Train the grounded-VQA Qwen2-VL from scratch on the CPU; evaluate it with greedy ``generate``.

    python -m tokenprune_kernels.grounded.train --out runs/grounded --threads 1

The defaults are the shipped model's recipe (``assets/train_log.json`` holds its exact command,
versions, per-step losses and test accuracy): 3800 steps, 75 min of training on one thread of
the 2-core CI machine, an AMD EPYC (the other core busy with a second run most of the time;
the previous recipe took 79 min there and 49 min on an Intel Xeon); test accuracy 89.6%.
``bash scripts/grounded_pipeline.sh runs/grounded`` ships a retrained model (and regenerates its
mapper, evaluations and demo). The same command and thread count on the same torch and CPU
vector ISA give the same weights (tested on a tiny configuration; see below for other CPUs).

Earlier recipes (initial std 0.02, training sizes only, no auxiliary loss, M-RoPE base 100) sat
near chance for 15-20 min runs. The shipped recipe differs in four ways, chosen together (not
ablated one by one): initial weights of std 0.08; a warm-up on SMALL canvases (:data:`WARM_SIZES`,
64 - 120 visual tokens, objects as many pixels wide as on a 224 px image) that give way linearly
to the training sizes over ``--warm`` of the steps (cheap steps, strong gradients on the
objects); an auxiliary per-token shape loss on the merged visual features (:class:`AuxProbe`, a
linear probe that is not part of the model) so that the vision tower learns shapes early; an
M-RoPE base of 10000 (most rotary frequencies slow, so text-to-image attention can match
content). Measured limit: with that base the column position reaches the language model only
through very slow frequencies, and the spatial questions (``left_of``, ``extreme``) stay near
chance. A full run with sections ``2,3,11`` (``--mrope``; faster column frequencies) learnt them
no better (test 60.0% against 60.8%); runs with base 30 and sections ``8,4,4`` were behind at
equal steps when stopped (before step 1400).

The recipe adds two auxiliary losses on the LANGUAGE model (:class:`LLMAux`, training only):
the attention of head 0 of the last decoder layer, from the token that predicts each answer,
is pushed onto the visual tokens of the objects the question involves (``--aux-attn 0.5``), and
a linear probe regresses each visual token's row and column from the hidden states after the
first decoder layer (``--aux-pos 1``). With them the model went from 60.8% to 73.1% test
accuracy (same steps, same everything else): colour of a shape 46.2% -> 100%, shape of a colour
86.5% -> 100%, count 80.8% -> 82.7%; the spatial types stayed at chance (``left_of`` 40.4%,
``extreme`` 42.3%). Interleaved M-RoPE sections (:data:`SHIPPED_MROPE`, below) then took it to
77.3% (``left_of`` 65.4%, ``extreme`` 44.2%, count 76.9%, colour and shape 100%; 260 test
questions, so about 2.6 points of standard error). Supervising the answer attention of the
spatial questions and of colour-of-a-shape at decoder layer 1 instead, where the position probe
keeps each token's row and column (``--aux-attn-early-layer 1``, ``--aux-attn-early-types``
:data:`SHIPPED_EARLY_TYPES`), and ``left_of``'s onto the left object of its pair only
(``--aux-attn-left``), took it to 89.6%: the shipped model (colour of a shape 100%, shape of a
colour 98.1%, count 80.8%, ``left_of`` 73.1%, ``extreme`` 96.2%; best validation 92.6% at the
last step; 4499 s on an AMD EPYC). Its ``left_of`` answer CE left ln 2 from step 2200 (0.65;
0.48 at step 3200): the first run whose ``left_of`` learnt a comparison. One run, one draw
(below). Measured on the 73.1% model
(least squares on 8 validation images of
320 x 320): token position is linearly readable after layer 0 (RMSE 1.1 rows, 3.0 columns) and
mostly gone after layer 2 (4.0 rows, 5.4 columns, of a 20 x 20 grid), and head 0 of the last
layer puts 34% of its mass on the object it should for ``extreme`` (99% for colour-of-shape).
The column reaches the language model only through the slowest M-RoPE frequencies (the ``w``
section is the lowest of ``[2, 7, 7]`` at base 10000). A run with base 50, sections ``8,4,4``
and the position probe after layer 2 (``--aux-pos-layer 3``) learnt ``extreme`` early (answer
CE 0.40 against 0.67 at step 2800) but colour and shape matching far more slowly (colour of a
shape CE 0.81 against 0.01), and was stopped. Splitting ``left_of``'s two objects over two heads
(``--aux-attn-split``) was slower on every type at equal steps up to step 1400 and was stopped.

Rotary frequencies, measured against the 73.1% recipe (sections ``2,7,7``) at equal steps
(answer CE per type: colour of a shape, shape of a colour, count, left of, extreme; mean of the
logged steps in the 200 before):

- base 30, sections ``2,7,7`` (every frequency fast): ``extreme`` learnt (CE 0.11 at step 2000,
  validation 10/10 and 9/10 at steps 1500 and 2000), but colour / shape / count did not
  (0.94 / 1.39 / 1.26 against 0.06 / 0.08 / 0.40), and the supervised head's attention loss
  stayed at 0.88-0.97 (0.42 here): text-to-image attention that matches CONTENT needs slow
  frequencies, since the query's position changes with the turn and the image size.
- base 100 (``2,7,7``) and base 30 with ``6,5,5``: behind on every type at step 1400.
- base 10000 with ``1,4,11`` / ``1,5,10`` (faster column frequencies, slow ones kept):
  content learnt, ``extreme`` not (CE 0.85 / 0.89 at step 2000 against 0.77).
- interleaved sections (``--mrope 1,1,1,0,1,1,0,1,1,0,1,1,7,0,0``: rows and columns each get
  4 of the 9 fastest frequencies, ``t`` the 7 slowest): tracks this recipe on content; spatial
  answer CE at step 3000 0.70 / 0.69 (against 0.70 / 0.66); full run (3011 s): test 77.3%
  (left of 65.4%, extreme 44.2%, count 76.9%; best validation at step 2500): the model shipped
  before this one, and these sections are the ``--mrope`` default.
- interleaved sections with the position probe after layer 2 (``--aux-pos-layer 3``), on the
  Intel Xeon that trained the 77.3% model: ``extreme`` learnt (CE 0.39 against 0.75 at step
  2400, 0.02 at step 3450; validation 10/10), content a little later (colour of a shape 0.26
  against 0.02 at step 2400, 0.03 at 3450); its test result was not recorded (the run's
  directory was lost). The same command on an AMD EPYC: colour of a shape not learnt (CE 0.57
  against 0.01 at step 3600), nor ``extreme`` (0.62); test 57.7% (colour of a shape 36.5%,
  shape of a colour 94.2%, count 65.4%, left of 51.9%, extreme 40.4%; best validation at step
  2000; 4893 s). With ``--aux-attn-split`` as well (AMD): the same picture to step 3400
  (colour of a shape 0.63, extreme 0.63); stopped. So one run is one draw: which question types
  a run learns changed with the CPU's floating-point rounding alone.
- 2 heads of dim 64 with interleaved sections (7 fast row and 7 fast column frequencies, 17
  slow ``t`` ones): count learnt faster (0.27 against 0.34 at step 2200) but colour and shape
  not (0.83 / 1.27), spatial types at chance; stopped.
- this recipe on the spatial types alone (``--types left_of,extreme``): ``extreme`` CE 0.82 at
  step 1600, not learnt either.

Where the answer attention is supervised (AMD EPYC, interleaved sections, every other option
the 77.3% recipe's; answer CE per type as above). The 77.3% run's ``left_of`` CE never left
ln 2 (0.70 at step 3600): its 65.4% on 52 test questions was not a learnt comparison.

- all types at decoder layer 1 (``--aux-attn-layer 1``), where the position probe
  (``--aux-pos-layer 1``) keeps the token positions: ``extreme`` learnt early (CE 0.22 at step
  1400 against 0.79; validation 9/10 at step 1500), colour of a shape too (0.04 at 1800), but
  shape of a colour stalled (1.08 at 1800 against 0.23) and count went back (1.23 against
  0.55); ``left_of`` at chance. Stopped at step 2400. With ``--aux-attn-split`` as well: nothing
  spatial learnt by step 1800; stopped.
- the same with ``--aux-attn-left`` (a ``left_of`` question supervises the attention onto the
  LEFT object of its pair only, the pair's leftmost, as ``extreme`` finds the scene's): test
  71.2% (4502 s): ``extreme`` 100% (the first run to learn it on test), colour of a shape 100%,
  shape of a colour 78.8%, count 23.1%, ``left_of`` 53.8% (CE at ln 2 throughout).
- ``left_of`` and ``extreme`` at layer 1, the others at the last layer
  (``--aux-attn-early-layer 1 --aux-attn-early-types left_of,extreme --aux-attn-left``):
  ``extreme`` learnt (0.20 at step 1800), but colour of a shape not (0.95 against 0.20), nor
  count (1.20); stopped at step 1900.
- ``left_of``, ``extreme`` AND colour of a shape at layer 1 (a colour is read from single tokens;
  a shape needs an object's tokens pooled, so shape of a colour and count stay at the last
  layer), with ``--aux-attn-left``: every type learnt (at step 2800: 0.13 / 0.007 / 0.30 / 0.54
  / 0.14); test 89.6%, the shipped recipe (above).

Each step draws ONE image size from ``--sizes`` (default
:data:`~tokenprune_kernels.grounded.scenes.TRAIN_SIZES`; size buckets: no padding of pixels) and
``--images`` scenes of that size with up to ``--questions`` questions each (balanced answers; no
object asked about twice, see :func:`~tokenprune_kernels.grounded.scenes.make_training_scene`).
A scene's questions form ONE chat sequence, turn after turn (the first turn is exactly the
evaluation prompt + answer + ``<|im_end|>``), so its visual tokens go through the vision tower
and the language model once for all its questions; ``--single-turn`` gives one sequence per
question instead (their image's tower features are computed once and repeated, through the
model's ``mm_encoder_outputs`` input where the transformers version has it). The loss is the
teacher-forced next-token cross-entropy on the answer tokens and the ``<|im_end|>`` after each,
plus ``--aux-weight`` times the probe's loss. AdamW, linear warm-up then cosine decay to 10%,
gradient-norm clipping (``--clip``).

Curriculum (the first ``--curriculum`` share of the steps): scenes start with 1 - 2 objects
``--start-scale`` times their final size and grow to 3 - 6 objects of the evaluation size. With
one object a colour question needs no binding, so attention to objects is learnt first; the
tower's shape features then get gradients through it. ``--aug-prob`` of the scenes keep objects
up to ``--aug-max`` times larger all along (objects as many pixels wide as the large test images
show them).

Everything is seeded: step ``i`` draws its data from ``sample_rng("train", i, seed)``, weights
from ``torch.manual_seed(seed)``; the same command and thread count on the same torch and CPU
give the same weights. Another CPU may round differently: the 77.3% model's recipe, rerun on an
AMD EPYC (torch's AVX2 kernels) against the Intel Xeon that trained it, differs in the 7th digit
of the loss at step 25 and in the 5th by step 300, and the run then follows another trajectory:
the full rerun there (4748 s) scored 72.7% on the same test set (colour of a shape 100%, shape of
a colour 98.1%, count 76.9%, left of 46.2%, extreme 42.3%) against that run's 77.3%. The shipped
89.6% model was trained on the AMD EPYC.
Every ``--eval-every`` steps the validation set (``--val-per-size`` scenes per training size,
fixed) is answered by ``model.generate`` (greedy, the real model on processor inputs) and the
best model by validation accuracy is kept. At the end the test set (``--test-per-size`` per size,
training sizes and the large 1024 - 2304-token sizes) is answered the same way.

Outputs in ``--out``: the model directory (``save_pretrained`` safetensors + processor files),
``train_log.json`` (command, versions, config, per-step loss, validation accuracy per
evaluation, wall time, test accuracy per question type, per size and per token range) and
``test_predictions.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprune_kernels.bench import cpu_model
from tokenprune_kernels.grounded.model import (
    CHAT_TEMPLATE,
    IM_END,
    IMAGE_PAD,
    TOKEN_ID,
    build_config,
    build_model,
    build_processor,
    check_mrope_section,
    generate_answers,
    save_model_dir,
)
from tokenprune_kernels.grounded.scenes import (
    COLOURS,
    MAX_OBJECTS,
    MIN_OBJECTS,
    QUESTION_TYPES,
    SHAPES,
    SPLIT_SIZES,
    TOKEN_PX,
    TRAIN_SIZES,
    Question,
    Scene,
    make_sample,
    make_training_scene,
    parse_size,
    render_scene,
    sample_rng,
    visual_tokens,
)

LOG_FILE = "train_log.json"
SPATIAL_TYPES = ("left_of", "extreme")
"""Question types that compare positions: :class:`LLMAux`'s default ``early_types``."""
SHIPPED_EARLY_TYPES = ("colour_of_shape", "left_of", "extreme")
"""Default ``--aux-attn-early-types``: the question types whose answer attention is supervised
at ``--aux-attn-early-layer`` (1): the spatial ones and the one answered by a colour read from
single tokens."""
REF_SHORT = 224
"""Shorter side (px) whose object pixel sizes the small warm-up canvases reproduce."""
WARM_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (128, 160), (160, 160), (160, 192))
"""Small canvases of the warm-up phase: 64 - 120 visual tokens."""
SHIPPED_MROPE: tuple[int, ...] = (1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 7, 0, 0)
"""Default ``--mrope`` at the default head dim (32): interleaved chunks (t, h, w, t, h, w, ...
of the 16 rotary frequencies, fastest first): rows and columns each get 4 of the 9 fastest,
``t`` the 7 slowest. Other head dims default to :func:`build_config`'s ``[t, h, w]`` split."""


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def conversation_text(questions: Sequence[str], answers: Sequence[str]) -> str:
    """The chat text of one image and several question / answer turns (the first turn is the
    evaluation prompt of ``questions[0]`` followed by its answer and ``<|im_end|>``)."""
    from jinja2 import Template

    messages: list[dict[str, Any]] = []
    for k, (q, a) in enumerate(zip(questions, answers, strict=True)):
        content: list[dict[str, Any]] = [{"type": "text", "text": q}]
        if k == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": a})
    return Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=False)


def encode_training_batch(
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    multi_turn: bool = True,
) -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs, right-padded: with ``multi_turn`` one sequence per image holding
    all its questions as successive chat turns (:func:`conversation_text`: the visual tokens go
    through the language model once for all of them), else one single-turn sequence per
    (image, question).

    Args:
        processor: the grounded processor.
        images: ``N`` RGB images, all of ONE size.
        questions, answers: per image, its questions and their one-word answers.
        multi_turn: see above.

    Returns:
        ``input_ids [S, L]``, ``attention_mask [S, L]``, ``mm_token_type_ids [S, L]``,
        ``labels [S, L]`` (``-100`` except each answer token and the ``<|im_end|>`` after it),
        ``pixel_values [N * patches, 384]`` fp32 (each image ONCE), ``image_grid_thw [N, 3]``,
        ``image_index [S]`` (the image of each sequence). ``S = N`` with ``multi_turn``, else
        the number of questions.
    """
    if not images or len(images) != len(questions) or len(images) != len(answers):
        raise ValueError("images, questions and answers must be non-empty and of one length")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must all have one size (a size bucket), got {sorted(sizes)}")
    width, height = images[0].size
    n_tok = visual_tokens((height, width))
    vis = processor.image_processor(images=list(images), return_tensors="pt")
    texts, image_index, n_answers = [], [], []
    for i, (qs, ans) in enumerate(zip(questions, answers, strict=True)):
        if len(qs) != len(ans) or not qs:
            raise ValueError(f"image {i}: needs as many answers as questions (>= 1)")
        if multi_turn:
            turns = [(list(qs), list(ans))]
        else:
            turns = [([q], [a]) for q, a in zip(qs, ans, strict=True)]
        for tq, ta in turns:
            texts.append(conversation_text(tq, ta).replace(IMAGE_PAD, IMAGE_PAD * n_tok))
            image_index.append(i)
            n_answers.append(len(ta))
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    # an answer is the token after each "assistant" header; it and the <|im_end|> are labelled
    for row, col in (ids[:, :-2] == TOKEN_ID["assistant"]).nonzero().tolist():
        labels[row, col + 1 : col + 3] = ids[row, col + 1 : col + 3]
    for row, want in enumerate(n_answers):
        got = labels[row][labels[row] != -100]
        if (
            got.numel() != 2 * want
            or (got[1::2] != TOKEN_ID[IM_END]).any()
            or (got[0::2] == TOKEN_ID["<unk>"]).any()
        ):
            raise ValueError(f"sequence {row}: every answer must be one known word + {IM_END}")
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": (ids == TOKEN_ID[IMAGE_PAD]).long(),
        "labels": labels,
        "pixel_values": vis["pixel_values"],
        "image_grid_thw": vis["image_grid_thw"],
        "image_index": torch.tensor(image_index, dtype=torch.long),
    }


def training_scenes(
    step: int,
    seed: int,
    n_images: int,
    n_questions: int,
    sizes: Sequence[tuple[int, int]] = TRAIN_SIZES,
    types: Sequence[str] = QUESTION_TYPES,
    scale: float = 1.0,
    aug_prob: float = 0.0,
    aug_max: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    warm_sizes: Sequence[tuple[int, int]] = (),
    warm_prob: float = 0.0,
) -> tuple[tuple[int, int], list[tuple[Scene, list[Question]]]]:
    """The scenes of training step ``step``, drawn from ``sample_rng("train", step, seed)``: one
    size of ``sizes`` and ``n_images`` scenes with up to ``n_questions`` questions of ``types``.

    With probability ``warm_prob`` the size is one of ``warm_sizes`` instead (small canvases,
    the warm-up phase): few visual tokens, so attention to the objects gets a strong gradient
    and a step is cheap; object sizes are then multiplied by ``REF_SHORT / min(size)`` so that
    objects are as many pixels wide as on a ``REF_SHORT`` px image.

    Object sizes are multiplied by ``scale`` (the curriculum) and, for a share ``aug_prob`` of
    the scenes, by a further factor drawn from ``U(1, aug_max)`` (scale augmentation, so the
    tower also sees objects as many pixels wide as the large test sizes show them). Object
    counts are drawn from ``object_range``.
    """
    rng = sample_rng("train", step, seed)
    size = tuple(sizes[int(rng.integers(len(sizes)))])
    if warm_sizes and rng.random() < warm_prob:
        # a small canvas: few visual tokens, objects as many pixels wide as at REF_SHORT px
        size = tuple(warm_sizes[int(rng.integers(len(warm_sizes)))])
        scale = scale * max(1.0, REF_SHORT / min(size))
    out = []
    for _ in range(n_images):
        s = scale
        if rng.random() < aug_prob:
            s *= float(rng.uniform(1.0, aug_max))
        out.append(make_training_scene(rng, size, n_questions, types, min(s, 4.0), object_range))
    return size, out


def training_batch(
    processor: Any,
    step: int,
    seed: int,
    n_images: int,
    n_questions: int,
    multi_turn: bool = True,
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], tuple[int, int], list[str]]:
    """The batch of training step ``step``: ``(inputs, size, question types)`` of the scenes of
    :func:`training_scenes` (same arguments), rendered and encoded by
    :func:`encode_training_batch` (``multi_turn``)."""
    size, scenes = training_scenes(step, seed, n_images, n_questions, **kwargs)
    images = [render_scene(scene) for scene, _ in scenes]
    questions = [[q.text for q in qs] for _, qs in scenes]
    answers = [[q.answer for q in qs] for _, qs in scenes]
    qtypes = [q.qtype for _, qs in scenes for q in qs]
    batch = encode_training_batch(processor, images, questions, answers, multi_turn)
    objects = [token_objects(scene) for scene, _ in scenes]  # rendered once per scene
    batch["token_shape"] = torch.cat(
        [
            torch.from_numpy(token_shape_labels(scene, objs)).flatten()
            for (scene, _), objs in zip(scenes, objects, strict=True)
        ]
    )
    batch["token_colour"] = torch.cat(
        [
            torch.from_numpy(token_colour_labels(scene, objs)).flatten()
            for (scene, _), objs in zip(scenes, objects, strict=True)
        ]
    )
    batch["token_centre"] = torch.cat(
        [torch.from_numpy(token_centre_labels(scene)).flatten() for scene, _ in scenes]
    )
    masks: dict[str, list[torch.Tensor]] = {"involved": [], "first": [], "second": [], "left": []}
    for (scene, qs), objs in zip(scenes, objects, strict=True):
        flat = objs.flatten()
        for q in qs:
            both = torch.from_numpy(np.isin(flat - 1, q.involved) & (flat > 0))
            masks["involved"].append(both)
            pair = q.qtype == "left_of" and len(q.involved) == 2
            for k, name in enumerate(("first", "second")):
                masks[name].append(torch.from_numpy(flat - 1 == q.involved[k]) if pair else both)
            if pair:
                left = min(q.involved, key=lambda i: scene.objects[i].cx)
                masks["left"].append(torch.from_numpy(flat - 1 == left))
            else:
                masks["left"].append(both)
    batch["involved"] = masks["involved"]
    batch["involved_first"], batch["involved_second"] = masks["first"], masks["second"]
    batch["involved_left"] = masks["left"]
    batch["qtypes"] = list(qtypes)
    return batch, size, qtypes


def token_centre_labels(scene: Scene) -> np.ndarray:
    """Per visual token (row-major ``[H/16, W/16]`` bool): whether an object's centre pixel lies
    in the token's 16 x 16 px cell (one token per object: what counting needs)."""
    height, width = scene.size
    out = np.zeros((height // TOKEN_PX, width // TOKEN_PX), bool)
    for o in scene.objects:
        row = min(int(o.cy // TOKEN_PX), out.shape[0] - 1)
        col = min(int(o.cx // TOKEN_PX), out.shape[1] - 1)
        out[row, col] = True
    return out


def token_objects(scene: Scene) -> np.ndarray:
    """Per visual token (16 x 16 px cell, row-major ``[H/16, W/16]`` int64): ``0`` where no
    object covers a quarter of the cell, else ``1 +`` the index of the object covering most of
    it (drawn with the scene's own polygons)."""
    from PIL import Image, ImageDraw

    from tokenprune_kernels.grounded.scenes import _shape_points

    height, width = scene.size
    ids = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(ids)
    for k, o in enumerate(scene.objects, start=1):
        pts = _shape_points(o, 1.0)
        if pts is None:
            r = o.size / 2
            draw.ellipse([o.cx - r, o.cy - r, o.cx + r, o.cy + r], fill=k)
        else:
            draw.polygon(pts, fill=k)
    cells = np.asarray(ids).reshape(height // TOKEN_PX, TOKEN_PX, width // TOKEN_PX, TOKEN_PX)
    cells = cells.transpose(0, 2, 1, 3).reshape(height // TOKEN_PX, width // TOKEN_PX, -1)
    cover = np.stack([(cells == k).sum(-1) for k in range(len(scene.objects) + 1)])
    cover[0] = TOKEN_PX * TOKEN_PX // 4  # an object needs a quarter of the cell
    return cover.argmax(0).astype(np.int64)


def token_shape_labels(scene: Scene, objects: np.ndarray | None = None) -> np.ndarray:
    """Per visual token (row-major ``[H/16, W/16]`` int64): ``0`` where no object covers a
    quarter of the cell, else ``1 + SHAPES.index(shape)`` of the object covering most of it
    (the auxiliary target of the training script). ``objects``: :func:`token_objects` of
    ``scene`` if already computed."""
    shape_of = np.array([0] + [1 + SHAPES.index(o.shape) for o in scene.objects], np.int64)
    return shape_of[token_objects(scene) if objects is None else objects]


def token_colour_labels(scene: Scene, objects: np.ndarray | None = None) -> np.ndarray:
    """Like :func:`token_shape_labels` with ``1 + list(COLOURS).index(colour)``."""
    colour_of = np.array([0] + [1 + list(COLOURS).index(o.colour) for o in scene.objects])
    return colour_of.astype(np.int64)[token_objects(scene) if objects is None else objects]


def _supports_encoder_outputs(model: Any) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def training_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[S, L, V]`` of the teacher-forced sequences, each image through the vision tower
    once (its merged features repeated for each of its sequences)."""
    return training_forward(model, batch)[0]


def training_forward(
    model: Any, batch: dict[str, torch.Tensor], probe: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits [S, L, V], auxiliary loss or None)`` of the teacher-forced sequences: the
    first two outputs of :func:`training_forward_full` without language-model auxiliaries."""
    logits, aux, _ = training_forward_full(model, batch, probe)
    return logits, aux


def training_forward_full(
    model: Any,
    batch: dict[str, Any],
    probe: torch.nn.Module | None = None,
    llm_aux: LLMAux | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(logits [S, L, V], auxiliary loss or None, language-model auxiliary losses)`` of the
    teacher-forced sequences. The last is ``llm_aux(outputs, batch)`` (see :class:`LLMAux`;
    ``{}`` without it).

    With a ``probe`` (a linear layer from the merged visual features to ``1 + len(SHAPES)``
    shape logits, optionally + 1 centre logit) the auxiliary loss is the probe's cross-entropy
    against ``batch["token_shape"]`` (see :func:`token_shape_labels`): the mean over object
    tokens plus a quarter of the mean over background tokens; with the centre logit, plus the
    binary cross-entropy against ``batch["token_centre"]`` (:func:`token_centre_labels`)
    weighted the same way. It teaches the vision tower shape and object-centre features
    quickly; the probe is not part of the model.
    """
    idx = batch["image_index"]
    grid = batch["image_grid_thw"]
    common = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "mm_token_type_ids": batch["mm_token_type_ids"],
        "image_grid_thw": grid[idx],
        "use_cache": False,
    }
    extra: dict[str, bool] = {}
    if llm_aux is not None and llm_aux.pos_weight > 0:
        extra = {"output_hidden_states": True}
    if _supports_encoder_outputs(model):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = model.model.get_image_features(batch["pixel_values"], grid).pooler_output
        per_seq = tuple(feats[i] for i in idx.tolist())
        enc = {"image": BaseModelOutputWithPooling(pooler_output=per_seq)}
        out = model(**common, **extra, mm_encoder_outputs=enc)
        aux = None if probe is None else _probe_loss(probe, torch.cat(feats), batch)
        return out.logits, aux, {} if llm_aux is None else llm_aux(out, batch)
    patches = grid.prod(dim=1).tolist()
    chunks = torch.split(batch["pixel_values"], patches)
    pixels = torch.cat([chunks[i] for i in idx.tolist()])
    out = model(**common, **extra, pixel_values=pixels)
    llm = {} if llm_aux is None else llm_aux(out, batch)
    if probe is None:
        return out.logits, None, llm
    # older transformers: the tower runs once more for the probe's features
    feats = model.model.get_image_features(batch["pixel_values"], grid)
    feats = getattr(feats, "pooler_output", feats)
    return out.logits, _probe_loss(probe, torch.cat(tuple(feats)), batch), llm


POS_SCALE = 24.0
"""Token rows / columns are divided by this (the longest side of the training grids) as the
targets of :class:`LLMAux`'s position probe."""


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
      the visual tokens of the objects the question involves (``batch["involved"]``, see
      :func:`training_batch`): ``-log`` of that mass, averaged over the questions that involve
      an object. With ``split_pairs`` a question about two objects (``left_of``) instead
      supervises head ``attn_head`` with its first object and head ``attn_head + 1`` with its
      second (``batch["involved_first"]`` / ``["involved_second"]``; other questions supervise
      both heads with all their objects), so each object's features, position included, reach
      the answer through a head of its own. With ``left_only`` a ``left_of`` question supervises
      the head with the LEFT object of its pair only (``batch["involved_left"]``): the pair's
      leftmost object, found as ``extreme`` finds the scene's, whose colour then answers whether
      it is the first-named one. With ``early_layer`` the questions of ``early_types`` (default
      the spatial ones, ``left_of`` and ``extreme``; ``batch["qtypes"]``) supervise head
      ``attn_head`` of decoder layer ``early_layer`` instead, and the others keep
      ``attn_layer``: spatial answers read positions early, where the position probe keeps
      them, shape answers read late, once an object's tokens have pooled its shape. The
      probabilities of those few query rows are recomputed from the layers' inputs (forward
      pre-hooks installed by :meth:`attach`), so the model keeps its fast attention and never
      materialises attention matrices.
    """

    def __init__(
        self,
        hidden: int,
        pos_weight: float = 0.0,
        pos_layer: int = 1,
        attn_weight: float = 0.0,
        attn_layer: int = -1,
        attn_head: int = 0,
        split_pairs: bool = False,
        left_only: bool = False,
        early_layer: int | None = None,
        early_types: Sequence[str] = SPATIAL_TYPES,
    ) -> None:
        super().__init__()
        if split_pairs and left_only:
            raise ValueError("split_pairs and left_only are exclusive (both set)")
        self.pos_weight, self.pos_layer = float(pos_weight), int(pos_layer)
        self.attn_weight, self.attn_layer = float(attn_weight), int(attn_layer)
        self.attn_head, self.split_pairs = int(attn_head), bool(split_pairs)
        self.left_only = bool(left_only)
        self.early_layer = None if early_layer is None else int(early_layer)
        unknown = sorted(set(early_types) - set(QUESTION_TYPES))
        if unknown:
            raise ValueError(f"early_types must be of {QUESTION_TYPES}, got {unknown}")
        self.early_types = tuple(early_types)
        self.pos = torch.nn.Linear(hidden, 2)
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
                or ``attn_head`` (and ``attn_head + 1`` with ``split_pairs``) not one of its
                heads.
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
        if not 0 <= self.attn_head < heads - int(self.split_pairs):
            raise ValueError(
                f"attn_head must be in [0, {heads - int(self.split_pairs)}) for {heads} heads"
                + (" (split_pairs also uses attn_head + 1)" if self.split_pairs else "")
                + f", got {self.attn_head}"
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
        answers = (ids[:, :-2] == TOKEN_ID["assistant"]).nonzero().tolist()
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

    def forward(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"pos": loss, "attn": loss}`` (the enabled ones, unweighted) from the model's
        ``outputs`` (with ``hidden_states`` for the position probe) and the batch of
        :func:`training_batch`."""
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
            heads = [(self.attn_head, "involved_left" if self.left_only else "involved")]
            if self.split_pairs:
                heads = [
                    (self.attn_head, "involved_first"),
                    (self.attn_head + 1, "involved_second"),
                ]
            terms = []
            positions = visual.nonzero()[:, 1].view(rows, n)  # each row's visual positions
            for head, key in heads:
                probs = self.answer_probs(batch, head)
                if len(probs) != len(batch[key]):
                    raise ValueError(f"{len(probs)} answers for {len(batch[key])} questions' masks")
                if self.early_layer is not None:
                    early = self.answer_probs(batch, head, self.early_layer)
                    qtypes = batch["qtypes"]
                    if len(qtypes) != len(probs):
                        raise ValueError(f"{len(probs)} answers for {len(qtypes)} question types")
                    probs = [
                        e if t in self.early_types else p
                        for p, e, t in zip(probs, early, qtypes, strict=True)
                    ]
                for (row, _, p), mask in zip(probs, batch[key], strict=True):
                    if mask.any():
                        terms.append(-torch.log(p[positions[row, mask]].sum() + 1e-4))
            losses["attn"] = torch.stack(terms).mean() if terms else torch.zeros(())
        return losses


class AuxProbe(torch.nn.Module):
    """The auxiliary per-token head of the training script (NOT part of the model).

    ``words=False``: a linear layer to ``1 + len(SHAPES)`` shape logits (background + shapes).
    ``words=True``: the object tokens' merged features are scored against the language model's
    own word embeddings of the colours and of the shapes (two cross-entropies), so a visual
    token of a red triangle points the way the words ``red`` and ``triangle`` do (the
    projector alignment of LLaVA-style training, per token); a linear layer still scores
    background vs object. ``centre=True`` adds one logit: does the token hold an object's
    centre. ``embed`` is the model's input embedding (tied to its output layer); it is referenced,
    not owned.
    """

    def __init__(self, hidden: int, embed: torch.nn.Embedding, words: bool, centre: bool) -> None:
        super().__init__()
        self.words, self.centre = words, centre
        self.linear = torch.nn.Linear(hidden, (2 if words else 1 + len(SHAPES)) + int(centre))
        self._embed = (embed,)  # a tuple: not a submodule, its weight is the model's
        self.register_buffer(
            "colour_ids", torch.tensor([TOKEN_ID[c] for c in COLOURS]), persistent=False
        )
        self.register_buffer(
            "shape_ids", torch.tensor([TOKEN_ID[t] for t in SHAPES]), persistent=False
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats [N, hidden]`` -> logits ``[N, C]``: linear outputs, then (``words``) the
        colour and shape word scores."""
        out = self.linear(feats)
        if not self.words:
            return out
        weight = self._embed[0].weight
        return torch.cat(
            [out, feats @ weight[self.colour_ids].t(), feats @ weight[self.shape_ids].t()], 1
        )


def _probe_loss(
    probe: AuxProbe, feats: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    target = batch["token_shape"]
    if target.shape[0] != feats.shape[0]:
        raise ValueError(f"token_shape has {target.shape[0]} labels for {feats.shape[0]} tokens")
    out = probe(feats.float())
    ce = torch.nn.functional.cross_entropy
    obj = target > 0
    if probe.words:
        n_lin = 2
        loss = _balanced(ce(out[:, :2], obj.long(), reduction="none"), obj)
        if obj.any():
            base = n_lin + int(probe.centre)
            colour = batch["token_colour"][obj] - 1
            loss = loss + ce(out[obj, base : base + len(COLOURS)], colour)
            loss = loss + ce(out[obj, base + len(COLOURS) :], target[obj] - 1)
    else:
        n_lin = 1 + len(SHAPES)
        loss = _balanced(ce(out[:, :n_lin], target, reduction="none"), obj)
    if probe.centre:
        n_shape = n_lin
        centre = batch["token_centre"]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            out[:, n_shape], centre.float(), reduction="none"
        )
        loss = loss + _balanced(bce, centre)
    return loss


def _balanced(loss: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over ``positive`` entries + a quarter of the mean over the others."""
    out = 0.25 * loss[~positive].mean() if (~positive).any() else loss.new_zeros(())
    return out + loss[positive].mean() if positive.any() else out


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
    position order (the order of the questions of :func:`training_batch`). ``logits [S, L, V]``,
    ``labels [S, L]`` as for :func:`answer_loss`."""
    lab = labels[:, 1:]
    answer = (lab != -100) & (lab != TOKEN_ID[IM_END])
    rows, cols = answer.nonzero(as_tuple=True)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1][rows, cols].float(), lab[rows, cols], reduction="none"
    )
    return ce.tolist()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    processor: Any,
    split: str,
    n_per_size: int,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy ``model.generate`` on a fixed set of ``split``.

    ``n_per_size`` samples per size (default sizes: ``SPLIT_SIZES[split]``), sample indices
    ``k * n_per_size + j`` for size ``k`` (question types cycle with the index), generated in
    batches of one size. Returns ``{"n", "accuracy", "by_type", "by_size", "by_tokens"}``
    (``by_tokens``: ``"<=600"`` and ``">600"`` visual tokens) and ``"predictions"`` (index,
    size, type, answer, prediction per sample).
    """
    sizes = list(SPLIT_SIZES[split] if sizes is None else sizes)
    preds: list[dict[str, Any]] = []
    for k, size in enumerate(sizes):
        samples = [make_sample(split, k * n_per_size + j, seed, size) for j in range(n_per_size)]
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            out = generate_answers(
                model, processor, [s.image for s in chunk], [s.question.text for s in chunk]
            )
            for s, p in zip(chunk, out, strict=True):
                preds.append(
                    {
                        "index": s.index,
                        "size": list(size),
                        "tokens": visual_tokens(size),
                        "type": s.question.qtype,
                        "question": s.question.text,
                        "answer": s.question.answer,
                        "prediction": p,
                    }
                )
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p in preds:
        ok = p["prediction"] == p["answer"]
        groups["by_type"][p["type"]].append(ok)
        groups["by_size"][f"{p['size'][0]}x{p['size'][1]} ({p['tokens']})"].append(ok)
        groups["by_tokens"]["<=600" if p["tokens"] <= 600 else ">600"].append(ok)
    result: dict[str, Any] = {
        "split": split,
        "n": len(preds),
        "accuracy": float(np.mean([p["prediction"] == p["answer"] for p in preds])),
    }
    for name, g in groups.items():
        result[name] = {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in g.items()}
    result["predictions"] = preds
    return result


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k != "predictions"}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def curriculum_progress(step: int, steps: int, fraction: float) -> float:
    """``step / (fraction * steps)`` clipped to [0, 1] (1 when ``fraction`` is 0)."""
    end = fraction * steps
    return 1.0 if end <= 0 else min(1.0, step / end)


def curriculum_scale(step: int, steps: int, start: float, fraction: float) -> float:
    """Object-size factor at ``step``: ``start`` at step 0, linearly down to 1 at
    ``fraction * steps``, then 1. Large objects first make the attention to them quick to
    learn; the task then shrinks to the evaluation sizes."""
    return start + (1.0 - start) * curriculum_progress(step, steps, fraction)


def curriculum_objects(step: int, steps: int, fraction: float) -> tuple[int, int]:
    """Object-count range at ``step``: (1, 2) at step 0, growing linearly to
    ``(MIN_OBJECTS, MAX_OBJECTS)`` at ``fraction * steps``. One object first: its colour is
    learnt from the image at once, which teaches attention to objects; the tower's shape
    features then get gradients through that attention; more objects then need binding."""
    t = curriculum_progress(step, steps, fraction)
    lo = round(1 + (MIN_OBJECTS - 1) * t)
    hi = round(2 + (MAX_OBJECTS - 2) * t)
    return lo, max(lo, hi)


def warm_probability(step: int, steps: int, fraction: float) -> float:
    """Probability that step ``step`` uses a small warm-up canvas: 1 at step 0, linearly down
    to 0 at ``fraction * steps`` (0 when ``fraction`` is 0)."""
    if fraction <= 0:
        return 0.0
    return 1.0 - curriculum_progress(step, steps, fraction)


def lr_at(step: int, steps: int, lr: float, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``final * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def versions() -> dict[str, str]:
    """Versions of Python, torch, transformers, numpy, Pillow, tokenizers, the platform, and the
    CPU with the vector ISA torch's kernels use (floating-point results, and so the trained
    weights, can differ between CPUs)."""
    import PIL
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu": f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})",
    }


def _parse_sizes(p: argparse.ArgumentParser, flag: str, text: str) -> list[list[int]]:
    try:
        return [list(parse_size(s, flag)) for s in text.split(",") if s.strip()]
    except ValueError as err:
        p.error(f"{flag} must be HxW,HxW,... ({err})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(
        prog="python -m tokenprune_kernels.grounded.train",
        description="Train the grounded-VQA Qwen2-VL from scratch (CPU) and evaluate it.",
    )
    p.add_argument("--out", required=True, help="output directory (model + train_log.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3800, help="optimizer steps")
    p.add_argument("--images", type=int, default=8, help="scenes per step (one size per step)")
    p.add_argument("--questions", type=int, default=6, help="questions per scene (at most)")
    p.add_argument(
        "--single-turn",
        action="store_true",
        help="one sequence per question (default: one multi-turn sequence per scene)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=2.0, help="gradient-norm clipping")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps")
    p.add_argument(
        "--val-per-size", type=int, default=6, help="validation scenes per size (0: none)"
    )
    p.add_argument("--test-per-size", type=int, default=20, help="test scenes per size (0: none)")
    p.add_argument(
        "--types",
        default=",".join(QUESTION_TYPES),
        help="comma-separated question types to train on (default: all)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="training sizes as HxW,HxW,... (default: TRAIN_SIZES)",
    )
    p.add_argument("--start-scale", type=float, default=2.5, help="object-size factor at step 0")
    p.add_argument(
        "--curriculum",
        type=float,
        default=0.5,
        help="share of the steps over which objects shrink to their evaluation size",
    )
    p.add_argument(
        "--aug-prob", type=float, default=0.25, help="share of scenes with larger objects"
    )
    p.add_argument("--aug-max", type=float, default=2.0, help="largest augmentation factor")
    p.add_argument(
        "--warm",
        type=float,
        default=1.0,
        help="share of the steps over which small warm-up canvases give way to --sizes",
    )
    p.add_argument(
        "--warm-sizes",
        default=",".join(f"{h}x{w}" for h, w in WARM_SIZES),
        help="warm-up canvas sizes as HxW,HxW,... ('' for none)",
    )
    p.add_argument(
        "--aux-weight",
        type=float,
        default=1.0,
        help="weight of the auxiliary per-token shape loss on the merged visual features "
        "(a linear probe, not part of the model; 0: off)",
    )
    p.add_argument(
        "--aux-words",
        action="store_true",
        help="score object tokens against the colour and shape WORD embeddings (see AuxProbe)",
    )
    p.add_argument(
        "--aux-centre",
        action="store_true",
        help="the probe also marks the token holding each object's centre (for counting)",
    )
    p.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop training early after this time"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule (a reproducibility check)",
    )
    p.add_argument(
        "--aux-pos",
        type=float,
        default=1.0,
        help="weight of the language model's visual-token position probe (LLMAux; 0: off)",
    )
    p.add_argument(
        "--aux-pos-layer",
        type=int,
        default=1,
        help="the position probe reads hidden_states[N] (after decoder layer N-1)",
    )
    p.add_argument(
        "--aux-attn",
        type=float,
        default=0.5,
        help="weight of the answer-to-involved-objects attention loss (LLMAux; 0: off)",
    )
    p.add_argument("--aux-attn-layer", type=int, default=-1, help="decoder layer of --aux-attn")
    p.add_argument("--aux-attn-head", type=int, default=0, help="attention head of --aux-attn")
    p.add_argument(
        "--aux-attn-split",
        action="store_true",
        help="--aux-attn: left_of's two objects each through a head of their own (head, head + 1)",
    )
    p.add_argument(
        "--aux-attn-left",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--aux-attn: a left_of question supervises it onto its pair's left object only",
    )
    p.add_argument(
        "--aux-attn-early-layer",
        type=int,
        default=1,
        help="--aux-attn: decoder layer of the --aux-attn-early-types questions' attention",
    )
    p.add_argument(
        "--aux-attn-early-types",
        default=",".join(SHIPPED_EARLY_TYPES),
        help="comma-separated question types of --aux-attn-early-layer ('': none, all at "
        "--aux-attn-layer)",
    )
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=10000.0, help="language-model M-RoPE base")
    p.add_argument("--init", type=float, default=0.08, help="std of the initial weights")
    p.add_argument(
        "--mrope",
        default=None,
        help="language-model M-RoPE sections T,H,W (sum: half the head dim), or a longer "
        "T,H,W,T,H,W,... list of frequency chunks (interleaved; see model.build_config); "
        "default: SHIPPED_MROPE at head dim 32, build_config's [t, h, w] split otherwise",
    )
    args = p.parse_args(argv)
    for name in ("steps", "images", "questions", "warmup", "threads", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stop_after is not None and args.stop_after < 1:
        p.error("--stop-after must be >= 1")
    for name in ("val_per_size", "test_per_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0: skip)")
    args.types = [t for t in args.types.split(",") if t]
    if not args.types or any(t not in QUESTION_TYPES for t in args.types):
        p.error(f"--types must be a comma-separated subset of {','.join(QUESTION_TYPES)}")
    if not 1.0 <= args.start_scale <= 4.0 or not 0.0 <= args.curriculum <= 1.0:
        p.error("--start-scale must be in [1, 4] and --curriculum in [0, 1]")
    if not 0.0 <= args.aug_prob <= 1.0 or not 1.0 <= args.aug_max <= 2.5:
        p.error("--aug-prob must be in [0, 1] and --aug-max in [1, 2.5]")
    if args.mrope is None and args.hidden_size // args.heads == 2 * sum(SHIPPED_MROPE):
        args.mrope = list(SHIPPED_MROPE)
    elif args.mrope is not None:
        try:
            args.mrope = [int(v) for v in args.mrope.split(",")]
        except ValueError:
            p.error(f"--mrope must be T,H,W ints, got {args.mrope!r}")
        err = check_mrope_section(args.mrope, args.hidden_size // args.heads // 2)
        if err:
            p.error(f"--mrope {err}")
    if args.aux_pos < 0 or args.aux_attn < 0:
        p.error("--aux-pos and --aux-attn must be >= 0 (0: off)")
    if not 1 <= args.aux_pos_layer <= args.layers:
        p.error(f"--aux-pos-layer must be in [1, --layers ({args.layers})]")
    if not -args.layers <= args.aux_attn_layer < args.layers:
        n = args.layers
        p.error(f"--aux-attn-layer must be a decoder layer index ({-n} .. {n - 1})")
    sl = args.aux_attn_early_layer
    if sl is not None and not -args.layers <= sl < args.layers:
        n = args.layers
        p.error(f"--aux-attn-early-layer must be a decoder layer index ({-n} .. {n - 1})")
    args.aux_attn_early_types = [t for t in args.aux_attn_early_types.split(",") if t]
    unknown = [t for t in args.aux_attn_early_types if t not in QUESTION_TYPES]
    if unknown:
        p.error(
            f"--aux-attn-early-types must be of {','.join(QUESTION_TYPES)} "
            f"(or ''), got {','.join(unknown)}"
        )
    if args.aux_attn_split and args.aux_attn_left:
        p.error("--aux-attn-split and --aux-attn-left are exclusive (add --no-aux-attn-left)")
    if not 0 <= args.aux_attn_head < args.heads - int(args.aux_attn_split):
        p.error(
            f"--aux-attn-head must be in [0, --heads ({args.heads}))"
            + (" and leave a head after it for --aux-attn-split" if args.aux_attn_split else "")
        )
    if args.aux_weight < 0:
        p.error(f"--aux-weight must be >= 0 (0: off), got {args.aux_weight}")
    if not 0.0 <= args.warm <= 1.0:
        p.error("--warm must be in [0, 1]")
    if args.sizes is None:
        args.sizes = [list(s) for s in TRAIN_SIZES]
    else:
        args.sizes = _parse_sizes(p, "--sizes", args.sizes)
        if not args.sizes:
            p.error("--sizes must name at least one size")
    args.warm_sizes = _parse_sizes(p, "--warm-sizes", args.warm_sizes)
    return args


def train(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """Train, validate, keep the best model, test; write ``args.out``. Returns the log dict."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(
        vision_depth=args.vision_depth,
        vision_dim=args.vision_dim,
        vision_heads=args.vision_heads,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        rope_theta=args.rope_theta,
        initializer_range=args.init,
        mrope_section=args.mrope,
    )
    model = build_model(config, seed=args.seed)
    processor = build_processor()
    n_params = sum(p.numel() for p in model.parameters())
    probe = None
    if args.aux_weight > 0:
        torch.manual_seed(args.seed + 1)
        probe = AuxProbe(
            config.text_config.hidden_size,
            model.get_input_embeddings(),
            words=args.aux_words,
            centre=args.aux_centre,
        )
    llm_aux = None
    if args.aux_pos > 0 or args.aux_attn > 0:
        torch.manual_seed(args.seed + 2)
        llm_aux = LLMAux(
            config.text_config.hidden_size,
            pos_weight=args.aux_pos,
            pos_layer=args.aux_pos_layer,
            attn_weight=args.aux_attn,
            attn_layer=args.aux_attn_layer,
            attn_head=args.aux_attn_head,
            split_pairs=args.aux_attn_split,
            left_only=args.aux_attn_left,
            early_layer=args.aux_attn_early_layer if args.aux_attn_early_types else None,
            early_types=args.aux_attn_early_types,
        )
        if args.aux_attn > 0:
            llm_aux.attach(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    if probe is not None:
        no_decay += list(probe.parameters())
    if llm_aux is not None:
        no_decay += list(llm_aux.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    log: dict[str, Any] = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "args": vars(args),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "config": config.to_dict(),
        "train_sizes": args.sizes,
        "steps": [],
        "val": [],
    }
    log_path = out / LOG_FILE

    def write_log() -> None:
        log_path.write_text(json.dumps(log, indent=1) + "\n")

    start = time.perf_counter()
    best = {"accuracy": -1.0, "step": 0}
    running: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    aux_running: list[float] = []
    llm_running: dict[str, list[float]] = defaultdict(list)
    seen = 0
    step = 0
    stopped_early = False
    val_s = 0.0
    for step in range(args.steps):
        model.train()
        batch, size, qtypes = training_batch(
            processor,
            step,
            args.seed,
            args.images,
            args.questions,
            not args.single_turn,
            sizes=[tuple(s) for s in args.sizes],
            types=args.types,
            scale=curriculum_scale(step, args.steps, args.start_scale, args.curriculum),
            aug_prob=args.aug_prob,
            aug_max=args.aug_max,
            object_range=curriculum_objects(step, args.steps, args.curriculum),
            warm_sizes=[tuple(w) for w in args.warm_sizes],
            warm_prob=warm_probability(step, args.steps, args.warm),
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits, aux, llm_losses = training_forward_full(model, batch, probe, llm_aux)
        loss = answer_loss(logits, batch["labels"])
        if aux is not None:
            aux_running.append(aux.item())
            loss = loss + args.aux_weight * aux
        # the logged answer loss (computed as the shipped log's was, to the bit)
        answer_only = loss.item() - (0.0 if aux is None else args.aux_weight * aux.item())
        for name, value in llm_losses.items():
            llm_running[name].append(value.item())
            loss = loss + (args.aux_pos if name == "pos" else args.aux_attn) * value
        with torch.no_grad():
            for qtype, ce in zip(qtypes, answer_token_losses(logits, batch["labels"]), strict=True):
                by_type[qtype].append(ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running.append(answer_only)
        seen += int(batch["input_ids"].shape[0])
        if (step + 1) % args.log_every == 0:
            entry = {
                "step": step + 1,
                "loss": float(np.mean(running)),
                "aux": round(float(np.mean(aux_running)), 4) if aux_running else None,
                **{f"aux_{k}": round(float(np.mean(v)), 4) for k, v in llm_running.items()},
                "answer_ce": {t: round(float(np.mean(v)), 3) for t, v in sorted(by_type.items())},
                "grad_norm": float(grad_norm),
                "lr": opt.param_groups[0]["lr"],
                "sequences": seen,
                "size": list(size),
                "objects": list(curriculum_objects(step, args.steps, args.curriculum)),
                "warm": round(warm_probability(step, args.steps, args.warm), 3),
                "scale": round(
                    curriculum_scale(step, args.steps, args.start_scale, args.curriculum), 3
                ),
                "wall_s": round(time.perf_counter() - start, 1),
            }
            log["steps"].append(entry)
            print(json.dumps(entry), flush=True)
            running = []
            by_type.clear()
            aux_running.clear()
            llm_running.clear()
        last = step + 1 == args.steps
        over = args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes
        over = over or (args.stop_after is not None and step + 1 >= args.stop_after)
        if args.val_per_size and ((step + 1) % args.eval_every == 0 or last or over):
            model.eval()
            t0 = time.perf_counter()
            ev = evaluate(model, processor, "val", args.val_per_size, seed=args.seed)
            val_s += time.perf_counter() - t0
            rec = {"step": step + 1, "wall_s": round(time.perf_counter() - start, 1)}
            rec.update(_summary(ev))
            log["val"].append(rec)
            print(json.dumps({k: rec[k] for k in ("step", "wall_s", "accuracy")}), flush=True)
            print(json.dumps(rec["by_type"]), flush=True)
            if ev["accuracy"] > best["accuracy"]:
                best = {"accuracy": ev["accuracy"], "step": step + 1}
                save_model_dir(model, processor, out / "model")
            write_log()
        if over:
            stopped_early = True
            break
    if not args.val_per_size:  # no validation: the final model is the model
        model.eval()
        save_model_dir(model, processor, out / "model")
        best = {"accuracy": None, "step": step + 1}
    log["train_wall_s"] = round(time.perf_counter() - start, 1)
    log["val_wall_s"] = round(val_s, 1)
    log["steps_done"] = step + 1
    log["stopped_early"] = stopped_early
    log["best"] = best
    write_log()

    from tokenprune_kernels.grounded.model import load_model_dir

    if not args.test_per_size:
        log["total_wall_s"] = round(time.perf_counter() - start, 1)
        write_log()
        return log
    model, processor = load_model_dir(out / "model")
    t0 = time.perf_counter()
    ev = evaluate(model, processor, "test", args.test_per_size, seed=args.seed)
    log["test"] = _summary(ev)
    log["test"]["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "test_predictions.json").write_text(json.dumps(ev["predictions"], indent=0) + "\n")
    log["total_wall_s"] = round(time.perf_counter() - start, 1)
    write_log()
    print(json.dumps({k: log["test"][k] for k in ("accuracy", "by_type", "by_tokens")}), flush=True)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tokenprune_kernels.grounded.train``."""
    args = parse_args(argv)
    command = "python -m tokenprune_kernels.grounded.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    train(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
