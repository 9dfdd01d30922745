"""Training batches of the grounded recipe: seeded scenes per step, their chat sequences and the
per-token targets of the auxiliary losses.

Step ``i`` draws ONE image size (size buckets: no padding of pixels) and its scenes from
``sample_rng("train", i, seed)``. A scene's questions form ONE chat sequence, turn after turn
(the first turn is exactly the evaluation prompt + answer + ``<|im_end|>``), so its visual tokens
go through the vision tower and the language model once for all its questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokenprune_kernels.grounded.model import CHAT_TEMPLATE, IM_END, IMAGE_PAD, TOKEN_ID
from tokenprune_kernels.grounded.scenes import (
    COLOURS,
    COUNT_TYPES,
    DIGITS,
    EXTRA_QUESTION_TYPES,
    GLYPH_SHAPE,
    MAX_OBJECTS,
    MIN_OBJECTS,
    QUESTION_TYPES,
    SHAPES,
    TOKEN_PX,
    TRAIN_SIZES,
    Question,
    Scene,
    involved_tokens,
    make_training_scene,
    object_id_map,
    render_scene,
    sample_rng,
    small_indices,
    token_cells,
    visual_tokens,
)

REF_SHORT = 224
"""Shorter side (px) whose object pixel sizes the small warm-up canvases reproduce."""
WARM_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (128, 160), (160, 160), (160, 192))
"""Small canvases of the warm-up phase: 64 - 120 visual tokens."""


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


def answer_positions(input_ids: torch.Tensor) -> list[list[int]]:
    """``[row, col]`` of every ``assistant`` header token of the training sequences
    (``input_ids [S, L]`` int64), row by row, in order: the position that predicts each answer,
    one per question. The last two columns are left out (no answer follows there)."""
    return (input_ids[:, :-2] == TOKEN_ID["assistant"]).nonzero().tolist()


def encode_training_batch(
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
) -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs, right-padded: one sequence per image holding all its questions as
    successive chat turns (:func:`conversation_text`).

    Args:
        processor: the grounded processor.
        images: ``N`` RGB images, all of ONE size.
        questions, answers: per image, its questions and their one-word answers.

    Returns:
        ``input_ids [N, L]``, ``attention_mask [N, L]``, ``mm_token_type_ids [N, L]``,
        ``labels [N, L]`` (``-100`` except each answer token and the ``<|im_end|>`` after it),
        ``pixel_values [N * patches, 384]`` fp32, ``image_grid_thw [N, 3]``.
    """
    if not images or len(images) != len(questions) or len(images) != len(answers):
        raise ValueError("images, questions and answers must be non-empty and of one length")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must all have one size (a size bucket), got {sorted(sizes)}")
    width, height = images[0].size
    n_tok = visual_tokens((height, width))
    vis = processor.image_processor(images=list(images), return_tensors="pt")
    texts, n_answers = [], []
    for i, (qs, ans) in enumerate(zip(questions, answers, strict=True)):
        if len(qs) != len(ans) or not qs:
            raise ValueError(f"image {i}: needs as many answers as questions (>= 1)")
        texts.append(conversation_text(list(qs), list(ans)).replace(IMAGE_PAD, IMAGE_PAD * n_tok))
        n_answers.append(len(ans))
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
    for row, col in answer_positions(ids):
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
    }


def training_scenes(
    step: int,
    seed: int,
    n_images: int,
    n_questions: int,
    sizes: Sequence[tuple[int, int]] = TRAIN_SIZES,
    scale: float = 1.0,
    aug_prob: float = 0.0,
    aug_max: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    warm_sizes: Sequence[tuple[int, int]] = (),
    warm_prob: float = 0.0,
    qtypes: Sequence[str] = QUESTION_TYPES,
) -> tuple[tuple[int, int], list[tuple[Scene, list[Question]]]]:
    """The scenes of training step ``step``, drawn from ``sample_rng("train", step, seed)``: one
    size of ``sizes`` and ``n_images`` scenes with up to ``n_questions`` questions each (every
    question type; balanced answers, see
    :func:`~tokenprune_kernels.grounded.scenes.make_training_scene`).

    With probability ``warm_prob`` the size is one of ``warm_sizes`` instead (small canvases,
    the warm-up phase): few visual tokens, so attention to the objects gets a strong gradient
    and a step is cheap; object sizes are then multiplied by ``REF_SHORT / min(size)`` so that
    objects are as many pixels wide as on a ``REF_SHORT`` px image.

    Object sizes are multiplied by ``scale`` (the curriculum) and, for a share ``aug_prob`` of
    the scenes, by a further factor drawn from ``U(1, aug_max)`` (scale augmentation, so the
    tower also sees objects as many pixels wide as the large test sizes show them). Object
    counts are drawn from ``object_range``; question types from ``qtypes`` (default: the five
    default types; the opt-in ones too when named).
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
        scene = make_training_scene(
            rng, size, n_questions, qtypes, scale=min(s, 4.0), object_range=object_range
        )
        out.append(scene)
    return size, out


def training_batch(
    processor: Any,
    step: int,
    seed: int,
    n_images: int,
    n_questions: int,
    fine_labels: bool = False,
    **kwargs: Any,
) -> tuple[dict[str, Any], tuple[int, int], list[str]]:
    """The batch of training step ``step``: ``(inputs, size, question types)`` of the scenes of
    :func:`training_scenes` (same arguments), rendered and encoded by
    :func:`encode_training_batch`, with the targets of the auxiliary losses:

    - ``token_shape [visual tokens of the batch]`` int64: :func:`token_shape_labels` of each
      scene, flattened, scenes in order (the shape probe's target); with ``fine_labels``
      :func:`token_fine_labels` instead (small objects and glyphs labelled too);
    - ``attn_target``: per question (in order), a ``[visual tokens of its scene]`` bool mask of
      the tokens its answer attention is supervised onto: the objects the question involves,
      for ``left_of`` the LEFT object of its pair only (the pair's leftmost, found as
      ``extreme`` finds the scene's); for the opt-in types (small objects, glyphs: often under
      a quarter of a token) every token they overlap by a pixel
      (:func:`~tokenprune_kernels.grounded.scenes.involved_tokens`);
    - ``count_target``: per question (in order), ``None`` or for the counting types
      :func:`count_weights` (``[visual tokens of its scene]`` float32; the rest of the mass,
      ``1 / (count + 1)``, belongs to the sequence's first token);
    - ``count_query``: per question (in order), :func:`count_query` (``None`` for the
      non-counting types);
    - ``qtypes``: the question types, in order.
    """
    size, scenes = training_scenes(step, seed, n_images, n_questions, **kwargs)
    images = [render_scene(scene) for scene, _ in scenes]
    questions = [[q.text for q in qs] for _, qs in scenes]
    answers = [[q.answer for q in qs] for _, qs in scenes]
    qtypes = [q.qtype for _, qs in scenes for q in qs]
    batch: dict[str, Any] = dict(encode_training_batch(processor, images, questions, answers))
    covers = [token_cover(scene) for scene, _ in scenes]  # rendered once per scene
    objects = [token_objects(scene, c) for (scene, _), c in zip(scenes, covers, strict=True)]
    batch["token_shape"] = torch.cat(
        [
            torch.from_numpy(
                token_fine_labels(scene, objs, cover)
                if fine_labels
                else token_shape_labels(scene, objs)
            ).flatten()
            for (scene, _), objs, cover in zip(scenes, objects, covers, strict=True)
        ]
    )
    targets: list[torch.Tensor] = []
    counts: list[torch.Tensor | None] = []
    for (scene, qs), objs, cover in zip(scenes, objects, covers, strict=True):
        flat = objs.flatten()
        for q in qs:
            weights = count_weights(scene, q, objs, cover)
            counts.append(None if weights is None else torch.from_numpy(weights.flatten()))
            if q.qtype in EXTRA_QUESTION_TYPES:
                targets.append(torch.from_numpy(involved_tokens(scene, q).flatten()))
            elif q.qtype == "left_of" and len(q.involved) == 2:
                left = min(q.involved, key=lambda i: scene.objects[i].cx)
                targets.append(torch.from_numpy(flat - 1 == left))
            else:
                targets.append(torch.from_numpy(np.isin(flat - 1, q.involved) & (flat > 0)))
    batch["attn_target"] = targets
    batch["count_target"] = counts
    batch["count_query"] = [count_query(q) for _, qs in scenes for q in qs]
    batch["qtypes"] = list(qtypes)
    return batch, size, qtypes


def count_query(question: Question) -> tuple[int, int] | None:
    """What a counting question asks for: ``(COLOURS index, SHAPES index)`` of the counted
    kind, ``-1`` for an attribute it does not name (``count_colour`` names no shape); ``None``
    for the other types (:class:`~benchmarks.grounded.losses.LLMAux`'s query probe target).

    Raises:
        ValueError: a counting question whose text does not name a known colour / shape.
    """
    if question.qtype not in COUNT_TYPES:
        return None
    words = question.text.split()
    colours, shapes = list(COLOURS), list(SHAPES)
    colour, shape = (words[2], None) if question.qtype == "count_colour" else words[3:5]
    if colour not in colours or (shape is not None and shape not in shapes):
        raise ValueError(f"count question {question.text!r} names no known colour / shape")
    return colours.index(colour), -1 if shape is None else shapes.index(shape)


def count_weights(
    scene: Scene,
    question: Question,
    objects: np.ndarray | None = None,
    cover: np.ndarray | None = None,
) -> np.ndarray | None:
    """The answer-attention target of a counting question (``count_colour``,
    ``count_small``; ``None`` for the other types): ``[H/16, W/16]`` float32, each of the
    ``n`` counted objects (``question.involved``) holding ``1 / (n + 1)`` of the mass, spread
    evenly over its tokens; the rest, ``1 / (n + 1)``, is the sink's (the sequence's first
    token; :class:`~benchmarks.grounded.losses.LLMAux` with ``count_sink``). A head that
    attends so returns ``(v_sink + n v_object) / (n + 1)``: its output tells the count, where
    mass spread over the counted objects alone returns their mean value whatever their
    number, and where no object is counted there is still a target.

    An object's tokens: those :func:`token_objects` gives it, or where it holds a quarter of
    none (small objects), every token it overlaps by a pixel. ``objects`` / ``cover``:
    :func:`token_objects` / :func:`token_cover` of ``scene`` if already computed.
    """
    if question.qtype not in COUNT_TYPES:
        return None
    _check_precomputed(scene, objects, cover)
    if cover is None:
        cover = token_cover(scene)
    if objects is None:
        objects = token_objects(scene, cover)
    out = np.zeros(objects.shape, np.float32)
    share = 1.0 / (len(question.involved) + 1)
    for i in question.involved:
        own = objects == i + 1
        if not own.any():
            own = cover[i + 1] > 0
        if not own.any():
            raise ValueError(f"counted object {i} of the scene covers no pixel")
        out[own] += share / own.sum()
    return out


def _check_precomputed(scene: Scene, objects: np.ndarray | None, cover: np.ndarray | None) -> None:
    """A clear error where ``objects`` / ``cover`` passed in do not belong to ``scene``."""
    grid = (scene.size[0] // TOKEN_PX, scene.size[1] // TOKEN_PX)
    if objects is not None and (
        not isinstance(objects, np.ndarray)
        or objects.shape != grid
        or objects.dtype.kind not in "iu"
        or (objects.size and not 0 <= objects.min() <= objects.max() <= len(scene.objects))
    ):
        raise ValueError(
            f"objects must be token_objects(scene): an integer array of shape {grid} in "
            f"[0, {len(scene.objects)}], got {getattr(objects, 'shape', type(objects))}"
        )
    want = (len(scene.objects) + 1, *grid)
    if cover is not None and (not isinstance(cover, np.ndarray) or cover.shape != want):
        raise ValueError(
            f"cover must be token_cover(scene) of shape {want}, got "
            f"{getattr(cover, 'shape', type(cover))}"
        )


def token_cover(scene: Scene) -> np.ndarray:
    """``[1 + objects, H/16, W/16]`` int64: per visual token (16 x 16 px cell, row-major) the
    pixels of :func:`~tokenprune_kernels.grounded.scenes.object_id_map` that are background
    (row 0) and that each object covers (row ``1 + index``)."""
    cells = token_cells(object_id_map(scene))
    return np.stack([(cells == k).sum(-1) for k in range(len(scene.objects) + 1)])


def token_objects(scene: Scene, cover: np.ndarray | None = None) -> np.ndarray:
    """Per visual token (16 x 16 px cell, row-major ``[H/16, W/16]`` int64): ``0`` where no
    object covers a quarter of the cell, else ``1 +`` the index of the object covering most of
    it (drawn with the scene's own polygons). ``cover``: :func:`token_cover` of ``scene`` if
    already computed (not modified)."""
    _check_precomputed(scene, None, cover)
    cover = token_cover(scene) if cover is None else cover.copy()
    cover[0] = TOKEN_PX * TOKEN_PX // 4  # an object needs a quarter of the cell
    return cover.argmax(0).astype(np.int64)


def token_shape_labels(scene: Scene, objects: np.ndarray | None = None) -> np.ndarray:
    """Per visual token (row-major ``[H/16, W/16]`` int64): ``0`` where no object covers a
    quarter of the cell, else ``1 + SHAPES.index(shape)`` of the object covering most of it
    (the shape probe's target). ``objects``: :func:`token_objects` of ``scene`` if already
    computed."""
    _check_precomputed(scene, objects, None)
    shape_of = np.array(
        [0] + [1 + SHAPES.index(o.shape) if o.shape in SHAPES else 0 for o in scene.objects],
        np.int64,
    )
    return shape_of[token_objects(scene) if objects is None else objects]


FINE_DIGIT0 = 1 + len(SHAPES)
"""The class of the glyph digit ``0`` in :func:`token_fine_labels` (digit ``d``: ``+ d``)."""
FINE_SMALL0 = FINE_DIGIT0 + len(DIGITS)
"""The class of a small object of ``SHAPES[0]`` in :func:`token_fine_labels` (``+ index``)."""
FINE_CLASSES = FINE_SMALL0 + len(SHAPES)
"""Classes of :func:`token_fine_labels`: background, each shape, each glyph digit
(:data:`FINE_DIGIT0` on), each shape of a small object (:data:`FINE_SMALL0` on)."""


def token_fine_labels(
    scene: Scene, objects: np.ndarray | None = None, cover: np.ndarray | None = None
) -> np.ndarray:
    """:func:`token_shape_labels`, plus the opt-in scenes' few-pixel objects: every token that
    no regular object claims but a small object (:func:`~tokenprune_kernels.grounded.scenes.
    small_indices`) or a glyph overlaps by at least one pixel of
    :func:`~tokenprune_kernels.grounded.scenes.object_id_map` gets the class of the one with
    the most pixels in it - ``FINE_DIGIT0 + digit`` for a glyph,
    ``FINE_SMALL0 + SHAPES.index(shape)`` for a small object: classes of their
    own, so the probe's loss can weigh these few tokens apart from the regular objects'
    (:func:`~benchmarks.grounded.losses.shape_probe_loss`) (``[H/16, W/16]`` int64 in
    ``[0, FINE_CLASSES)``).

    Without it a glyph's tokens are background to the shape probe and most small objects (under
    a quarter of a token) too, so the probe pushes exactly the tokens that the opt-in answers
    need towards the background's features. Scenes of the default types have neither, so
    their labels equal :func:`token_shape_labels`'. ``objects`` / ``cover``:
    :func:`token_objects` / :func:`token_cover` of ``scene`` if already computed.
    """
    _check_precomputed(scene, objects, cover)
    if cover is None:
        cover = token_cover(scene)
    if objects is None:
        objects = token_objects(scene, cover)
    base = token_shape_labels(scene, objects)
    few = sorted(
        set(small_indices(scene))
        | {i for i, o in enumerate(scene.objects) if o.shape == GLYPH_SHAPE}
    )
    if not few:
        return base
    counts = cover[[i + 1 for i in few]]  # [few, H/16, W/16]
    cls = np.array(
        [
            FINE_DIGIT0 + DIGITS.index(str(o.symbol))
            if o.shape == GLYPH_SHAPE
            else FINE_SMALL0 + SHAPES.index(o.shape)
            for o in (scene.objects[i] for i in few)
        ],
        np.int64,
    )
    take = (counts.max(0) > 0) & (base == 0)
    out = base.copy()
    out[take] = cls[counts.argmax(0)[take]]
    return out
