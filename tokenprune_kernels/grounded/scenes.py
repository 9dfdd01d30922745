"""Procedural grounded-VQA scenes: coloured shapes on textured backgrounds, questions whose answer
depends on a small part of the image, seeded train / validation / test splits.

A scene is a few objects (shape, colour, size, centre) drawn on a low-saturation background
(solid, gradient, noise, stripes or checker) with small grey clutter marks. Object sizes are a
fraction of the image's shorter side, so the task looks the same at every image size.
Every answer is ONE word of a small vocabulary (:data:`ANSWERS`):

======================  ===============================================  ==================
question type           example                                          answer
======================  ===============================================  ==================
``colour_of_shape``     ``what colour is the triangle ?``                a colour
``shape_of_colour``     ``what shape is the blue object ?``              a shape
``count_colour``        ``how many red objects are there ?``             ``0`` - ``3``
``left_of``             ``is the green object left of the red object ?`` ``yes`` / ``no``
``extreme``             ``what colour is the leftmost object ?``         a colour
======================  ===============================================  ==================

The object a question names is unique in its scene (one triangle, one blue object); ``left_of``
pairs are apart horizontally by at least half an object size, and the ``extreme`` object leads the
runner-up in that direction by at least half an object size. :attr:`Question.involved` lists the
objects the answer depends on (the region a relevance map should find).

Image sizes are multiples of :data:`TOKEN_PX` (16 px: an 8 px patch, 2x2 merged), so the Qwen2-VL
processor never resizes them and a ``H x W`` image gives ``(H/16) * (W/16)`` visual tokens:
:data:`TRAIN_SIZES` give 196 - 576 tokens, :data:`LARGE_SIZES` 1024 - 2304.

Splits are seeded and disjoint by construction: sample ``i`` of split ``s`` draws everything from
``numpy.random.default_rng([seed, SPLIT_CODES[s], i])``. Training draws from the ``train`` stream
only; validation and test sets are fixed lists of indices of their own streams.

Example::

    from tokenprune_kernels.grounded.scenes import make_sample

    s = make_sample("test", 7, size=(256, 320))
    s.image           # PIL.Image, RGB, 320 x 256
    s.question.text   # e.g. 'what shape is the orange object ?'
    s.question.answer # e.g. 'diamond'
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 85, 230),
    "yellow": (240, 205, 25),
    "purple": (145, 55, 200),
    "orange": (245, 130, 15),
}
"""Object colours: saturated, far from the low-saturation backgrounds."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DIRECTIONS: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
COUNTS: tuple[str, ...] = ("0", "1", "2", "3")
YES_NO: tuple[str, ...] = ("yes", "no")

QUESTION_TYPES: tuple[str, ...] = (
    "colour_of_shape",
    "shape_of_colour",
    "count_colour",
    "left_of",
    "extreme",
)

ANSWERS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "colour_of_shape": tuple(COLOURS),
    "shape_of_colour": SHAPES,
    "count_colour": COUNTS,
    "left_of": YES_NO,
    "extreme": tuple(COLOURS),
}
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNTS, *YES_NO)
"""Every possible answer (one word each)."""

QUESTION_WORDS: tuple[str, ...] = (
    "what", "colour", "shape", "is", "the", "object", "objects", "how", "many", "are", "there",
    "left", "of", "?", *DIRECTIONS,
)  # fmt: skip
"""Every word a question uses besides colours and shapes."""

TOKEN_PX = 16
"""Pixels per visual-token side: patch 8 px, 2x2 patches merged into one token."""

TRAIN_SIZES: tuple[tuple[int, int], ...] = (
    (224, 224),
    (224, 288),
    (256, 256),
    (288, 256),
    (288, 320),
    (320, 320),
    (320, 384),
    (384, 352),
    (384, 384),
)
"""(height, width) of training images: 196 - 576 visual tokens."""

LARGE_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (640, 608), (736, 720), (768, 768))
"""(height, width) of the larger test images: 1024, 1520, 2070, 2304 visual tokens."""

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
SPLIT_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "train": TRAIN_SIZES,
    "val": TRAIN_SIZES,
    "test": TRAIN_SIZES + LARGE_SIZES,
}
"""The image sizes each split draws from (the test split adds the large sizes)."""

MIN_OBJECTS, MAX_OBJECTS = 3, 6
MAX_PER_COLOUR = 3
SIZE_FRACTION = (0.12, 0.18)
"""Object size (circle diameter, diamond diagonal, ...) as a fraction of the shorter side."""
MAX_PER_TYPE = 2
"""At most this many questions of one type per training scene."""
MAX_FRACTION = 0.3
"""Cap of a scaled object's size (training curriculum), as a fraction of the shorter side."""
MARGIN_FRACTION = 0.5
"""``left_of`` / ``extreme`` margins, in object sizes (mean size of the objects compared)."""


def visual_tokens(size: tuple[int, int]) -> int:
    """Visual tokens of an image of ``size`` (height, width) px: ``(H/16) * (W/16)``."""
    _check_size(size)
    return (size[0] // TOKEN_PX) * (size[1] // TOKEN_PX)


def _check_size(size: Any) -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
    )
    if not ok or not all(v >= 4 * TOKEN_PX and v % TOKEN_PX == 0 for v in size):
        raise ValueError(
            f"size must be (height, width) ints, multiples of {TOKEN_PX} and >= {4 * TOKEN_PX}, "
            f"got {size!r}"
        )
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class SceneObject:
    """One object: ``shape`` (:data:`SHAPES`), ``colour`` (:data:`COLOURS`), centre ``(cx, cy)``
    and ``size`` in pixels (circle diameter, square side / 0.85, triangle side, diamond
    diagonal)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in pixels: the square of side ``size`` around the centre."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """Objects on a background. ``size`` is (height, width) px; ``background`` and ``clutter``
    are the drawing parameters (plain data, so a scene is reproducible from its fields)."""

    size: tuple[int, int]
    objects: tuple[SceneObject, ...]
    background: dict[str, Any] = field(compare=False)
    clutter: tuple[dict[str, Any], ...] = field(compare=False)

    def colour_counts(self) -> Counter:
        """How many objects have each colour."""
        return Counter(o.colour for o in self.objects)

    def shape_counts(self) -> Counter:
        """How many objects have each shape."""
        return Counter(o.shape for o in self.objects)


@dataclass(frozen=True)
class Question:
    """One question about a scene: ``qtype`` (:data:`QUESTION_TYPES`), ``text`` (words separated
    by single spaces, ending in ``?``), ``answer`` (one word of :data:`ANSWERS`) and
    ``involved``, the indices of the objects the answer depends on."""

    qtype: str
    text: str
    answer: str
    involved: tuple[int, ...]


@dataclass
class Sample:
    """A rendered scene with one question. ``image`` is an RGB ``PIL.Image`` of
    ``scene.size``."""

    split: str
    index: int
    scene: Scene
    question: Question
    image: Any


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def _grey(rng: np.random.Generator, lo: int = 60, hi: int = 200, tint: int = 14) -> list[int]:
    g = int(rng.integers(lo, hi + 1))
    return [int(np.clip(g + rng.integers(-tint, tint + 1), 0, 255)) for _ in range(3)]


def random_background(rng: np.random.Generator) -> dict[str, Any]:
    """Parameters of a low-saturation background: ``kind`` in solid / gradient / noise / stripes /
    checker plus its colours and pattern (plain JSON-able data)."""
    kind = str(rng.choice(["solid", "gradient", "noise", "stripes", "checker"]))
    base = _grey(rng)
    bg: dict[str, Any] = {"kind": kind, "base": base}
    if kind == "gradient":
        bg["other"] = _grey(rng)
        bg["angle"] = float(rng.uniform(0, 2 * math.pi))
    elif kind == "noise":
        bg["sigma"] = float(rng.uniform(5, 14))
        bg["seed"] = int(rng.integers(2**31))
    elif kind == "stripes":
        bg["amplitude"] = float(rng.uniform(8, 22))
        bg["period"] = float(rng.uniform(0.04, 0.15))  # fraction of the shorter side
        bg["angle"] = float(rng.uniform(0, math.pi))
    elif kind == "checker":
        bg["delta"] = float(rng.uniform(10, 25)) * float(rng.choice([-1, 1]))
        bg["cells"] = int(rng.integers(4, 11))  # cells along the shorter side
    return bg


def random_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    n_objects: int | None = None,
    scale: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> Scene:
    """A random scene of ``size`` (height, width) px: 3 - 6 non-overlapping objects (at most
    :data:`MAX_PER_COLOUR` per colour), a background and 0 - 10 clutter marks.

    ``scale`` multiplies the object sizes (training only: the curriculum starts with larger
    objects; every evaluation scene has ``scale=1``; sizes are capped at :data:`MAX_FRACTION`
    of the shorter side). Objects that find no free place after 200
    draws are left out, so large scales give fewer objects. ``n_objects`` defaults to a draw
    from ``object_range`` (inclusive; the curriculum starts with 1 - 2 objects).
    """
    height, width = _check_size(size)
    if not 1.0 <= float(scale) <= 4.0:
        raise ValueError(f"scale must be in [1, 4], got {scale!r}")
    short = min(height, width)
    if n_objects is None:
        lo, hi = object_range
        if not 1 <= lo <= hi <= MAX_OBJECTS:
            raise ValueError(
                f"object_range must be (lo, hi) with 1 <= lo <= hi <= {MAX_OBJECTS}, "
                f"got {object_range!r}"
            )
        n_objects = int(rng.integers(lo, hi + 1))
    if isinstance(n_objects, bool) or not isinstance(n_objects, int) or n_objects < 1:
        raise ValueError(f"n_objects must be an int >= 1, got {n_objects!r}")
    n_colours = int(rng.integers(min(2, n_objects), min(n_objects, len(COLOURS)) + 1))
    palette = list(rng.choice(list(COLOURS), size=n_colours, replace=False))
    colours: list[str] = []
    while len(colours) < n_objects:
        c = str(rng.choice(palette))
        if colours.count(c) < MAX_PER_COLOUR:
            colours.append(c)
    objects: list[SceneObject] = []
    for colour in colours:
        for _ in range(200):
            s = min(float(rng.uniform(*SIZE_FRACTION)) * scale, MAX_FRACTION) * short
            pad = s / 2 + 0.02 * short
            cx = float(rng.uniform(pad, width - pad))
            cy = float(rng.uniform(pad, height - pad))
            if all(
                math.hypot(cx - o.cx, cy - o.cy) >= 0.6 * (s + o.size) + 0.02 * short
                for o in objects
            ):
                objects.append(SceneObject(str(rng.choice(SHAPES)), colour, cx, cy, s))
                break
    clutter = []
    for _ in range(int(rng.integers(0, 11))):
        kind = str(rng.choice(["line", "dot"]))
        mark: dict[str, Any] = {"kind": kind, "colour": _grey(rng, 40, 220, 10)}
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        if kind == "line":
            length = float(rng.uniform(0.05, 0.15)) * short
            a = float(rng.uniform(0, 2 * math.pi))
            mark["xy"] = [x, y, x + length * math.cos(a), y + length * math.sin(a)]
            mark["width"] = max(1, round(float(rng.uniform(0.004, 0.01)) * short))
        else:
            r = float(rng.uniform(0.006, 0.015)) * short
            mark["xy"] = [x - r, y - r, x + r, y + r]
        clutter.append(mark)
    return Scene((height, width), tuple(objects), random_background(rng), tuple(clutter))


def _background_array(bg: dict[str, Any], height: int, width: int) -> np.ndarray:
    base = np.asarray(bg["base"], dtype=np.float32)
    kind = bg["kind"]
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "solid":
        return img
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    short = float(min(height, width))
    if kind == "gradient":
        d = np.cos(bg["angle"]) * xx / width + np.sin(bg["angle"]) * yy / height
        t = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
        other = np.asarray(bg["other"], dtype=np.float32)
        return img * (1 - t[..., None]) + other * t[..., None]
    if kind == "noise":
        noise = np.random.default_rng(bg["seed"]).normal(0.0, bg["sigma"], (height, width, 1))
        return img + noise.astype(np.float32)
    if kind == "stripes":
        d = np.cos(bg["angle"]) * xx + np.sin(bg["angle"]) * yy
        wave = bg["amplitude"] * np.sin(2 * math.pi * d / (bg["period"] * short))
        return img + wave[..., None]
    if kind == "checker":
        cell = short / bg["cells"]
        parity = ((xx // cell) + (yy // cell)) % 2
        return img + bg["delta"] * parity[..., None]
    raise ValueError(f"unknown background kind {kind!r}")


def _shape_points(o: SceneObject, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, s = o.cx * scale, o.cy * scale, o.size * scale
    if o.shape == "square":
        h = 0.85 * s / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if o.shape == "diamond":
        h = s / 2
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if o.shape == "triangle":
        tri_h = s * math.sqrt(3) / 2
        top = cy - 2 * tri_h / 3 + 0.05 * s
        base = cy + tri_h / 3 + 0.05 * s
        return [(cx, top), (cx + s / 2, base), (cx - s / 2, base)]
    return None  # circle


def render_scene(scene: Scene, supersample: int = 2) -> Any:
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``scene.size`` (drawn ``supersample`` times
    larger, then downsampled with a box filter: anti-aliased edges)."""
    from PIL import Image, ImageDraw

    height, width = scene.size
    ss = int(supersample)
    if ss < 1:
        raise ValueError(f"supersample must be an int >= 1, got {supersample!r}")
    bg = _background_array(scene.background, height, width)
    img = Image.fromarray(np.clip(bg + 0.5, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((width * ss, height * ss), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for mark in scene.clutter:
        xy = [v * ss for v in mark["xy"]]
        if mark["kind"] == "line":
            draw.line(xy, fill=tuple(mark["colour"]), width=int(mark["width"]) * ss)
        else:
            draw.ellipse(xy, fill=tuple(mark["colour"]))
    for o in scene.objects:
        fill = COLOURS[o.colour]
        pts = _shape_points(o, ss)
        if pts is None:
            r = o.size * ss / 2
            draw.ellipse([o.cx * ss - r, o.cy * ss - r, o.cx * ss + r, o.cy * ss + r], fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    if ss > 1:
        img = img.resize((width, height), Image.BOX)
    return img


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


def _unique(scene: Scene, attr: str) -> list[int]:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [i for i, o in enumerate(scene.objects) if counts[getattr(o, attr)] == 1]


def _extreme_index(scene: Scene, direction: str) -> int | None:
    """The object leading in ``direction`` by at least the margin, else None."""
    objs = scene.objects
    if len(objs) < 2:
        return 0 if objs else None
    key = {
        "leftmost": lambda o: -o.cx,
        "rightmost": lambda o: o.cx,
        "topmost": lambda o: -o.cy,
        "bottommost": lambda o: o.cy,
    }[direction]
    order = sorted(range(len(objs)), key=lambda i: key(objs[i]), reverse=True)
    first, second = objs[order[0]], objs[order[1]]
    if key(first) - key(second) < MARGIN_FRACTION * (first.size + second.size) / 2:
        return None
    return order[0]


def candidate_questions(scene: Scene, qtype: str) -> list[Question]:
    """Every well-posed question of type ``qtype`` about ``scene`` (may be empty).

    Raises:
        ValueError: unknown ``qtype``.
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    objs = scene.objects
    out: list[Question] = []
    if qtype == "colour_of_shape":
        for i in _unique(scene, "shape"):
            text = f"what colour is the {objs[i].shape} ?"
            out.append(Question(qtype, text, objs[i].colour, (i,)))
    elif qtype == "shape_of_colour":
        for i in _unique(scene, "colour"):
            text = f"what shape is the {objs[i].colour} object ?"
            out.append(Question(qtype, text, objs[i].shape, (i,)))
    elif qtype == "count_colour":
        for colour in COLOURS:
            idx = tuple(i for i, o in enumerate(objs) if o.colour == colour)
            text = f"how many {colour} objects are there ?"
            out.append(Question(qtype, text, str(len(idx)), idx))
    elif qtype == "left_of":
        uniq = _unique(scene, "colour")
        for a in uniq:
            for b in uniq:
                oa, ob = objs[a], objs[b]
                if a == b or abs(oa.cx - ob.cx) < MARGIN_FRACTION * (oa.size + ob.size) / 2:
                    continue
                text = f"is the {oa.colour} object left of the {ob.colour} object ?"
                out.append(Question(qtype, text, "yes" if oa.cx < ob.cx else "no", (a, b)))
    else:
        for direction in DIRECTIONS:
            i = _extreme_index(scene, direction)
            if i is not None:
                text = f"what colour is the {direction} object ?"
                out.append(Question(qtype, text, objs[i].colour, (i,)))
    return out


def answer_question(scene: Scene, question: Question) -> str:
    """Recompute the answer of ``question`` from the scene's objects (parses the text).

    Raises:
        ValueError: the question is not well posed for this scene (ambiguous or unknown).
    """
    words = question.text.split()
    objs = scene.objects
    if question.qtype == "colour_of_shape":
        hits = [o for o in objs if o.shape == words[4]]
        if len(hits) == 1:
            return hits[0].colour
    elif question.qtype == "shape_of_colour":
        hits = [o for o in objs if o.colour == words[4]]
        if len(hits) == 1:
            return hits[0].shape
    elif question.qtype == "count_colour":
        return str(sum(o.colour == words[2] for o in objs))
    elif question.qtype == "left_of":
        a = [o for o in objs if o.colour == words[2]]
        b = [o for o in objs if o.colour == words[7]]
        if len(a) == 1 and len(b) == 1 and a[0] is not b[0]:
            return "yes" if a[0].cx < b[0].cx else "no"
    elif question.qtype == "extreme":
        i = _extreme_index(scene, words[4])
        if i is not None:
            return objs[i].colour
    raise ValueError(f"question {question.text!r} is not well posed for this scene")


# --------------------------------------------------------------------------------------------
# Splits and samples
# --------------------------------------------------------------------------------------------


def sample_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: ``default_rng([seed, code, index])``.

    Raises:
        ValueError: unknown split, negative index or seed.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
    for name, v in (("index", index), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def pick_question(
    scene: Scene, qtype: str, rng: np.random.Generator, answer: str | None = None
) -> Question | None:
    """A random well-posed question of ``qtype`` about ``scene`` (with that ``answer`` if
    given), or None if there is none."""
    cands = candidate_questions(scene, qtype)
    if answer is not None:
        cands = [q for q in cands if q.answer == answer]
    if not cands:
        return None
    return cands[int(rng.integers(len(cands)))]


def make_scene_question(
    rng: np.random.Generator,
    size: tuple[int, int],
    qtype: str,
    answer: str | None = None,
    max_tries: int = 1000,
    scale: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> tuple[Scene, Question]:
    """Draw scenes (objects scaled by ``scale``, see :func:`random_scene`) until one has a
    question of ``qtype`` (with ``answer`` if given).

    Raises:
        ValueError: bad ``qtype`` / ``answer``; RuntimeError: no scene after ``max_tries``.
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    if answer is not None and answer not in ANSWERS_BY_TYPE[qtype]:
        raise ValueError(
            f"answer must be one of {ANSWERS_BY_TYPE[qtype]} for {qtype}, got {answer!r}"
        )
    for _ in range(max_tries):
        scene = random_scene(rng, size, scale=scale, object_range=object_range)
        q = pick_question(scene, qtype, rng, answer)
        if q is not None:
            return scene, q
    raise RuntimeError(f"no scene with a {qtype} question answered {answer!r} in {max_tries}")


def make_sample(
    split: str,
    index: int,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    qtype: str | None = None,
) -> Sample:
    """Sample ``index`` of ``split``: a rendered scene and one question, balanced by design.

    The question type is ``QUESTION_TYPES[index % 5]`` unless ``qtype`` is given; the answer is
    drawn uniformly from that type's answers first, then scenes are drawn until one has such a
    question. ``size`` defaults to one of ``SPLIT_SIZES[split]`` drawn by the sample's generator.
    The same arguments always give the same image bytes and question.
    """
    rng = sample_rng(split, index, seed)
    if size is None:
        sizes = SPLIT_SIZES[split]
        size = sizes[int(rng.integers(len(sizes)))]
    size = _check_size(size)
    if qtype is None:
        qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    elif qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    choices = ANSWERS_BY_TYPE[qtype]
    answer = choices[int(rng.integers(len(choices)))]
    scene, question = make_scene_question(rng, size, qtype, answer)
    return Sample(split, int(index), scene, question, render_scene(scene))


def make_training_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    n_questions: int,
    qtypes: Sequence[str] = QUESTION_TYPES,
    scale: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> tuple[Scene, list[Question]]:
    """A training scene (objects scaled by ``scale``, object count drawn from ``object_range``)
    with up to ``n_questions`` questions of ``qtypes``.

    The first question's type is drawn uniformly and its answer too (balanced answers; where the
    scene cannot have that answer - large scales leave room for few objects, so a count of 3 may
    not fit - any well-posed question of the type). Further questions cycle through the types in
    a random order, preferring a randomly drawn answer; each has a new text and, counts apart,
    involves no object an earlier non-count question involved (so one answer does not give
    another away when the questions share a sequence). ``left_of`` is skipped when scenes have
    one object.
    """
    if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be an int >= 1, got {n_questions!r}")
    qtypes = list(qtypes)
    if not qtypes or any(t not in QUESTION_TYPES for t in qtypes):
        raise ValueError(f"qtypes must be a non-empty subset of {QUESTION_TYPES}, got {qtypes!r}")
    if object_range[1] < 2:
        qtypes = [t for t in qtypes if t != "left_of"] or list(qtypes)
    first = qtypes[int(rng.integers(len(qtypes)))]
    choices = ANSWERS_BY_TYPE[first]
    kw = {"scale": scale, "object_range": object_range}
    try:
        target = choices[int(rng.integers(len(choices)))]
        scene, q = make_scene_question(rng, size, first, target, max_tries=100, **kw)
    except RuntimeError:
        scene, q = make_scene_question(rng, size, first, None, **kw)
    questions = [q]
    used = set() if q.qtype == "count_colour" else set(q.involved)
    texts = {q.text}
    added = True
    while added and len(questions) < n_questions:
        added = False
        for qtype in rng.permutation(qtypes).tolist():
            if len(questions) >= n_questions:
                break
            if sum(x.qtype == qtype for x in questions) >= MAX_PER_TYPE:
                continue
            cands = [
                c
                for c in candidate_questions(scene, qtype)
                if c.text not in texts
                and (qtype == "count_colour" or not used.intersection(c.involved))
            ]
            if not cands:
                continue
            choices = ANSWERS_BY_TYPE[qtype]
            target = choices[int(rng.integers(len(choices)))]
            pool = [c for c in cands if c.answer == target] or cands
            extra = pool[int(rng.integers(len(pool)))]
            questions.append(extra)
            if qtype != "count_colour":  # a count names no particular object
                used.update(extra.involved)
            texts.add(extra.text)
            added = True
    return scene, questions


def eval_indices(split: str, n_per_size: int) -> list[tuple[int, tuple[int, int]]]:
    """A fixed evaluation set of ``split``: ``n_per_size`` samples for each size of
    ``SPLIT_SIZES[split]``, as ``(index, size)`` pairs (indices ``0 .. n_sizes * n_per_size - 1``;
    consecutive indices cycle through the question types)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
    if isinstance(n_per_size, bool) or not isinstance(n_per_size, int) or n_per_size < 1:
        raise ValueError(f"n_per_size must be an int >= 1, got {n_per_size!r}")
    sizes = SPLIT_SIZES[split]
    return [(k * n_per_size + j, s) for k, s in enumerate(sizes) for j in range(n_per_size)]


def image_digest(image: Any) -> str:
    """SHA-256 of an image's size and RGB bytes (to compare renders)."""
    h = hashlib.sha256(f"{image.size}".encode())
    h.update(np.asarray(image.convert("RGB")).tobytes())
    return h.hexdigest()


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """``"HxW"`` pixels (e.g. ``"256x320"``, spaces and ``X`` allowed) to ``(H, W)``.

    Raises:
        ValueError: naming ``name``: not two ints, or not multiples of :data:`TOKEN_PX` px and
            at least ``4 * TOKEN_PX`` on both sides.
    """
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"{name} must be HEIGHTxWIDTH in pixels (e.g. 256x320), got {text!r}")
    try:
        return _check_size((int(m.group(1)), int(m.group(2))))
    except ValueError:
        raise ValueError(
            f"{name} must be multiples of {TOKEN_PX} px and >= {4 * TOKEN_PX} on both sides, "
            f"got {text!r}"
        ) from None


def check_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate a list of (height, width) sizes (see :func:`visual_tokens`)."""
    return [_check_size(s) for s in sizes]


__all__ = [
    "ANSWERS",
    "ANSWERS_BY_TYPE",
    "COLOURS",
    "DIRECTIONS",
    "LARGE_SIZES",
    "QUESTION_TYPES",
    "QUESTION_WORDS",
    "SHAPES",
    "SPLIT_CODES",
    "SPLIT_SIZES",
    "TOKEN_PX",
    "TRAIN_SIZES",
    "Question",
    "Sample",
    "Scene",
    "SceneObject",
    "answer_question",
    "candidate_questions",
    "check_sizes",
    "eval_indices",
    "image_digest",
    "make_sample",
    "make_scene_question",
    "make_training_scene",
    "parse_size",
    "pick_question",
    "random_background",
    "random_scene",
    "render_scene",
    "sample_rng",
    "visual_tokens",
]
