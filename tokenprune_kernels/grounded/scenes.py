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

Opt-in types (:data:`EXTRA_QUESTION_TYPES`, drawn only when named; answers in very few visual
tokens: about 1% of an image's tokens against 2.7 - 5.4% for the types above):

======================  ===============================================  ==================
``count_small``         ``how many small red square objects are there ?`` ``0`` - ``3``
``read_glyph``          ``what digit is drawn ?``                        ``0`` - ``9``
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
from collections.abc import Callable, Sequence
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
"""Every possible answer of the default question types (one word each)."""

EXTRA_QUESTION_TYPES: tuple[str, ...] = ("count_small", "read_glyph")
"""Opt-in question types whose answer sits in very few visual tokens (see
:func:`make_extra_scene_question`). They are never drawn unless named: the defaults
(:data:`QUESTION_TYPES`) and every sample of the default streams are unchanged by them."""
ALL_QUESTION_TYPES: tuple[str, ...] = QUESTION_TYPES + EXTRA_QUESTION_TYPES
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
ANSWERS_BY_TYPE["count_small"] = COUNTS
ANSWERS_BY_TYPE["read_glyph"] = DIGITS
EXTRA_ANSWERS: tuple[str, ...] = tuple(d for d in DIGITS if d not in ANSWERS)
"""Answers only the opt-in types give (the digits ``4`` - ``9``)."""

QUESTION_WORDS: tuple[str, ...] = (
    "what", "colour", "shape", "is", "the", "object", "objects", "how", "many", "are", "there",
    "left", "of", "?", *DIRECTIONS,
)  # fmt: skip
"""Every word a question uses besides colours and shapes."""
EXTRA_QUESTION_WORDS: tuple[str, ...] = ("small", "digit", "drawn")
"""Words only the opt-in question types use."""

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
SMALL_FRACTION = (0.035, 0.05)
"""``count_small``: size of a small object, as a fraction of the shorter side (a regular object
is 0.12 - 0.18, so "small" is unambiguous). A small object is centred in a 16 px token
(:data:`TOKEN_PX`): at a random sub-token offset the grounded 2-block tower told its shape on
33% of held-out small objects (chance 25%) after 600 steps of direct supervision, centred on
99.9% (docs/grounded_training.md)."""
SMALL_DISTRACTORS = (2, 4)
"""``count_small``: small objects of another colour or shape besides the counted ones (inclusive
range)."""
GLYPH_CELL_FRACTION = 0.008
"""``read_glyph``: a glyph is a 3 x 5 grid of cells of ``max(1, round(0.008 * short))`` px
(2 px at 224 px: the digit is 6 x 10 px, less than one 16 px token), drawn in an object colour
on a light plate one cell wider on every side. The ink is centred in one 16 px token
(:data:`TOKEN_PX`; up to 3 px cells, i.e. a shorter side up to 437 px; larger ink starts at a
token's edge): at a random sub-patch offset the grounded 2-block tower did not learn to read
the digit (9.5% held out, chance 10%, 1500 steps of direct supervision); with the ink at a fixed
place in its token it reads it on 100% after 600 steps (docs/grounded_training.md)."""
GLYPH_PLATE = (240, 240, 240)
GLYPH_SHAPE = "glyph"
"""The ``shape`` of a :class:`SceneObject` that is a glyph (its digit is ``symbol``)."""
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
}
"""3 x 5 bitmaps of the digits (``#`` ink), rows top to bottom; every pair differs in >= 1 cell."""


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
    diagonal). Opt-in scenes (:func:`make_extra_scene_question`) add glyphs: ``shape``
    :data:`GLYPH_SHAPE`, ``symbol`` a digit, ``size`` the plate's height (the plate is
    ``5 / 7`` as wide); ``symbol`` is None for every other object."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    symbol: str | None = None

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


def _free_spot(
    rng: np.random.Generator,
    objects: Sequence[SceneObject],
    size: tuple[int, int],
    draw_size: Any,
    tries: int = 200,
    snap: Callable[[float, float, float], tuple[float, float]] | None = None,
) -> tuple[float, float, float] | None:
    """``(cx, cy, s)`` of a new object of size ``s = draw_size()`` (drawn anew each try) that
    keeps clear of ``objects``, or None after ``tries`` draws. ``snap(cx, cy, s)``, if given,
    moves each drawn centre onto a grid (keeping the object inside the image) before the check."""
    height, width = size
    short = min(height, width)
    for _ in range(tries):
        s = draw_size()
        pad = s / 2 + 0.02 * short
        cx = float(rng.uniform(pad, width - pad))
        cy = float(rng.uniform(pad, height - pad))
        if snap is not None:
            cx, cy = snap(cx, cy, s)
        if all(
            math.hypot(cx - o.cx, cy - o.cy) >= 0.6 * (s + o.size) + 0.02 * short for o in objects
        ):
            return cx, cy, s
    return None


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
        spot = _free_spot(
            rng,
            objects,
            (height, width),
            lambda: min(float(rng.uniform(*SIZE_FRACTION)) * scale, MAX_FRACTION) * short,
        )
        if spot is not None:
            objects.append(SceneObject(str(rng.choice(SHAPES)), colour, *spot))
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


GLYPH_INKS: tuple[str, ...] = ("red", "green", "blue", "purple")
"""Glyph ink colours: the object colours that stand out on the light plate."""


def random_extra_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    target: tuple[str, str] | None = None,
    n_target: int | None = None,
    symbol: str | None = None,
    scale: float = 1.0,
    object_range: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> Scene:
    """A scene of the opt-in question types: a :func:`random_scene` (its regular objects come
    first in ``objects``), then ``n_target`` (default 0 - 3) small objects of ``target``
    ``(colour, shape)`` and 2 - 4 small distractors (the target's shape in another colour or
    its colour in another shape), then one glyph of digit ``symbol`` (default random).

    With ``target`` None it is, half the time, the colour and shape of a regular object (a large
    look-alike among the distractors), else drawn at random. Small objects are
    :data:`SMALL_FRACTION` of the shorter side times ``scale`` (at most 0.12): always under half
    the smallest regular object, which is how :func:`small_indices` tells them apart; each is
    centred in a token, and so is the glyph's ink where it fits (the vision tower reads
    neither at a random sub-patch offset: :data:`SMALL_FRACTION`, :data:`GLYPH_CELL_FRACTION`).
    Objects that find no free place are left out, so the scene may hold fewer targets than
    asked (:func:`make_scene_question` checks the answer).
    """
    base = random_scene(rng, size, scale=scale, object_range=object_range)
    height, width = base.size
    short = min(height, width)
    objects = list(base.objects)
    if target is None:
        if rng.random() < 0.5:
            o = objects[int(rng.integers(len(objects)))]
            target = (o.colour, o.shape)
        else:
            target = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
    colour, shape = target
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"target must be a (colour, shape) pair, got {target!r}")
    if n_target is None:
        n_target = int(rng.integers(len(COUNTS)))
    specs = [target] * int(n_target)
    for _ in range(int(rng.integers(SMALL_DISTRACTORS[0], SMALL_DISTRACTORS[1] + 1))):
        if rng.random() < 0.5:
            specs.append((str(rng.choice([c for c in COLOURS if c != colour])), shape))
        else:
            specs.append((colour, str(rng.choice([h for h in SHAPES if h != shape]))))

    def token_centred(cx: float, cy: float, s: float) -> tuple[float, float]:
        # the centre of the token holding (cx, cy), one token inwards where that leaves the image
        out = []
        for c, extent in ((cx, width), (cy, height)):
            c = TOKEN_PX * math.floor(c / TOKEN_PX) + TOKEN_PX / 2
            c = c + TOKEN_PX if c - s / 2 < 0 else c - TOKEN_PX if c + s / 2 > extent else c
            out.append(c)
        return out[0], out[1]

    for c, h in specs:
        spot = _free_spot(
            rng,
            objects,
            (height, width),
            lambda: min(float(rng.uniform(*SMALL_FRACTION)) * scale, 0.12) * short,
            snap=token_centred,
        )
        if spot is not None:
            objects.append(SceneObject(h, c, *spot))
    if symbol is None:
        symbol = str(rng.choice(DIGITS))
    if symbol not in GLYPHS:
        raise ValueError(f"symbol must be one of {DIGITS}, got {symbol!r}")
    cell = max(1, round(GLYPH_CELL_FRACTION * scale * short))

    def ink_in_a_token(cx: float, cy: float, s: float) -> tuple[float, float]:
        # the ink (3 x 5 cells) centred in the token holding the drawn ink's top-left corner,
        # or starting at its edge along an axis where the ink is longer than a token; one token
        # inwards where the plate would leave the image (see GLYPH_CELL_FRACTION)
        out = []
        for c, extent, cells, half in ((cx, width, 3, 2.5), (cy, height, 5, 3.5)):
            offset = max(TOKEN_PX - cells * cell, 0) // 2
            ink0 = TOKEN_PX * math.floor((c - half * cell + cell) / TOKEN_PX) + offset
            plate0 = ink0 - cell
            if plate0 < 0:
                plate0 += TOKEN_PX
            elif plate0 + (cells + 2) * cell > extent:
                plate0 -= TOKEN_PX
            out.append(plate0 + half * cell)
        return out[0], out[1]

    spot = _free_spot(rng, objects, (height, width), lambda: 7.0 * cell, snap=ink_in_a_token)
    if spot is not None:
        ink = str(rng.choice(GLYPH_INKS))
        objects.append(SceneObject(GLYPH_SHAPE, ink, spot[0], spot[1], 7.0 * cell, symbol))
    return Scene(base.size, tuple(objects), base.background, base.clutter)


def small_indices(scene: Scene) -> list[int]:
    """Indices of the small objects of ``scene``: objects (glyphs aside) under half the size of
    its largest object (none in a scene of the default question types)."""
    sizes = [o.size for o in scene.objects if o.shape != GLYPH_SHAPE]
    if not sizes:
        return []
    top = max(sizes)
    return [i for i, o in enumerate(scene.objects) if o.shape != GLYPH_SHAPE and o.size < 0.5 * top]


def glyph_cells(o: SceneObject) -> list[tuple[int, int, int, int]]:
    """The ink cells of glyph ``o`` as integer pixel boxes ``(x0, y0, x1, y1)`` (end
    exclusive), rows top to bottom."""
    if o.shape != GLYPH_SHAPE or o.symbol not in GLYPHS:
        raise ValueError(f"o must be a glyph object with a digit symbol, got {o!r}")
    cell = round(o.size / 7)
    x0, y0 = round(o.cx - 2.5 * cell) + cell, round(o.cy - 3.5 * cell) + cell
    return [
        (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell)
        for r, row in enumerate(GLYPHS[o.symbol])
        for c, ch in enumerate(row)
        if ch == "#"
    ]


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
    if o.shape == GLYPH_SHAPE:  # the plate: 5 x 7 cells
        hw, hh = 5 * s / 14, s / 2
        return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
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
        if o.shape == GLYPH_SHAPE:  # pixel-exact boxes: plate, then ink cells
            cell = round(o.size / 7)
            px, py = round(o.cx - 2.5 * cell), round(o.cy - 3.5 * cell)
            plate = [px * ss, py * ss, (px + 5 * cell) * ss - 1, (py + 7 * cell) * ss - 1]
            draw.rectangle(plate, fill=GLYPH_PLATE)
            for x0, y0, x1, y1 in glyph_cells(o):
                draw.rectangle([x0 * ss, y0 * ss, x1 * ss - 1, y1 * ss - 1], fill=fill)
            continue
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

    ``count_small`` asks for every (colour, shape) of the scene's objects how many small ones
    there are (:func:`small_indices`); ``read_glyph`` asks for the digit of the scene's glyph
    when it has exactly one.

    Raises:
        ValueError: unknown ``qtype``.
    """
    if qtype not in ALL_QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {ALL_QUESTION_TYPES}, got {qtype!r}")
    objs = scene.objects
    out: list[Question] = []
    if qtype == "count_small":
        small = small_indices(scene)
        kinds = sorted({(o.colour, o.shape) for o in objs if o.shape != GLYPH_SHAPE})
        for colour, shape in kinds:
            idx = tuple(i for i in small if (objs[i].colour, objs[i].shape) == (colour, shape))
            text = f"how many small {colour} {shape} objects are there ?"
            out.append(Question(qtype, text, str(len(idx)), idx))
    elif qtype == "read_glyph":
        glyphs = [i for i, o in enumerate(objs) if o.shape == GLYPH_SHAPE]
        if len(glyphs) == 1:
            symbol = str(objs[glyphs[0]].symbol)
            out.append(Question(qtype, "what digit is drawn ?", symbol, (glyphs[0],)))
    elif qtype == "colour_of_shape":
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
    elif question.qtype == "count_small":
        kind = (words[3], words[4])
        return str(sum((objs[i].colour, objs[i].shape) == kind for i in small_indices(scene)))
    elif question.qtype == "read_glyph":
        glyphs = [o for o in objs if o.shape == GLYPH_SHAPE]
        if len(glyphs) == 1:
            return str(glyphs[0].symbol)
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
    question of ``qtype`` (with ``answer`` if given). The opt-in types
    (:data:`EXTRA_QUESTION_TYPES`) draw :func:`random_extra_scene` scenes built for the answer:
    ``count_small`` asks about the scene's target kind, ``read_glyph`` about its glyph.

    Raises:
        ValueError: bad ``qtype`` / ``answer``; RuntimeError: no scene after ``max_tries``.
    """
    if qtype not in ALL_QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {ALL_QUESTION_TYPES}, got {qtype!r}")
    if answer is not None and answer not in ANSWERS_BY_TYPE[qtype]:
        raise ValueError(
            f"answer must be one of {ANSWERS_BY_TYPE[qtype]} for {qtype}, got {answer!r}"
        )
    for _ in range(max_tries):
        if qtype in EXTRA_QUESTION_TYPES:
            scene, q = _extra_question(rng, size, qtype, answer, scale, object_range)
        else:
            scene = random_scene(rng, size, scale=scale, object_range=object_range)
            q = pick_question(scene, qtype, rng, answer)
        if q is not None:
            return scene, q
    raise RuntimeError(f"no scene with a {qtype} question answered {answer!r} in {max_tries}")


def _extra_question(
    rng: np.random.Generator,
    size: tuple[int, int],
    qtype: str,
    answer: str | None,
    scale: float,
    object_range: tuple[int, int],
) -> tuple[Scene, Question | None]:
    """One try of :func:`make_scene_question` for an opt-in type: a scene built for
    ``answer`` and its question, or None where placement left the answer out."""
    count = int(answer) if answer is not None and qtype == "count_small" else None
    symbol = answer if qtype == "read_glyph" else None
    kw = {"scale": scale, "object_range": object_range}
    scene = random_extra_scene(rng, size, None, count, symbol, **kw)
    return scene, pick_question(scene, qtype, rng, answer)


def make_sample(
    split: str,
    index: int,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    qtype: str | None = None,
    qtypes: Sequence[str] = QUESTION_TYPES,
) -> Sample:
    """Sample ``index`` of ``split``: a rendered scene and one question, balanced by design.

    The question type is ``qtypes[index % len(qtypes)]`` (default :data:`QUESTION_TYPES`)
    unless ``qtype`` is given (any of :data:`ALL_QUESTION_TYPES`); the answer is drawn uniformly
    from that type's answers first, then scenes are drawn until one has such a question.
    ``size`` defaults to one of ``SPLIT_SIZES[split]`` drawn by the sample's generator. The same
    arguments always give the same image bytes and question.
    """
    rng = sample_rng(split, index, seed)
    if size is None:
        sizes = SPLIT_SIZES[split]
        size = sizes[int(rng.integers(len(sizes)))]
    size = _check_size(size)
    if qtype is None:
        qtypes = check_question_types(qtypes)
        qtype = qtypes[index % len(qtypes)]
    elif qtype not in ALL_QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {ALL_QUESTION_TYPES}, got {qtype!r}")
    choices = ANSWERS_BY_TYPE[qtype]
    answer = choices[int(rng.integers(len(choices)))]
    scene, question = make_scene_question(rng, size, qtype, answer)
    return Sample(split, int(index), scene, question, render_scene(scene))


COUNT_TYPES = ("count_colour", "count_small")
"""Question types that count: their involved objects may be asked about again."""


def check_question_types(qtypes: Sequence[str]) -> list[str]:
    """``qtypes`` as a list, checked: a non-empty list of :data:`ALL_QUESTION_TYPES`.

    Raises:
        ValueError: empty, or unknown types.
    """
    qtypes = list(qtypes)
    if not qtypes or any(t not in ALL_QUESTION_TYPES for t in qtypes):
        raise ValueError(
            f"qtypes must be a non-empty list of question types of {ALL_QUESTION_TYPES}, "
            f"got {qtypes!r}"
        )
    return qtypes


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

    The opt-in types (:data:`EXTRA_QUESTION_TYPES`) are asked only about their own scenes
    (:func:`random_extra_scene`, drawn when the first type is one of them) and those scenes only
    get opt-in questions: their small objects would make the default types' questions
    ambiguous. With the default ``qtypes`` nothing changes.
    """
    if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be an int >= 1, got {n_questions!r}")
    qtypes = check_question_types(qtypes)
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
    is_extra = first in EXTRA_QUESTION_TYPES
    qtypes = [t for t in qtypes if (t in EXTRA_QUESTION_TYPES) == is_extra]
    used = set() if q.qtype in COUNT_TYPES else set(q.involved)
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
                and (qtype in COUNT_TYPES or not used.intersection(c.involved))
            ]
            if not cands:
                continue
            choices = ANSWERS_BY_TYPE[qtype]
            target = choices[int(rng.integers(len(choices)))]
            pool = [c for c in cands if c.answer == target] or cands
            extra = pool[int(rng.integers(len(pool)))]
            questions.append(extra)
            if qtype not in COUNT_TYPES:  # a count names no particular object
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


def object_id_map(scene: Scene) -> np.ndarray:
    """Per pixel (``[H, W]`` uint8): ``0`` where no object is drawn, else ``1 +`` the index of
    the object there (drawn with the scene's own shapes, without anti-aliasing; glyphs as
    their plate)."""
    from PIL import Image, ImageDraw

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
    return np.asarray(ids)


def token_cells(pixels: np.ndarray) -> np.ndarray:
    """``[H, W]`` per-pixel values as ``[H/16, W/16, 256]``: the pixels of each visual token
    (16 x 16 px cell, row-major)."""
    height, width = pixels.shape
    cells = pixels.reshape(height // TOKEN_PX, TOKEN_PX, width // TOKEN_PX, TOKEN_PX)
    return cells.transpose(0, 2, 1, 3).reshape(height // TOKEN_PX, width // TOKEN_PX, -1)


def involved_tokens(scene: Scene, question: Question) -> np.ndarray:
    """``[H/16, W/16]`` bool: the visual tokens that overlap (by at least one pixel of
    :func:`object_id_map`) an object ``question`` involves."""
    ids = object_id_map(scene).astype(np.int64) - 1
    return token_cells(np.isin(ids, question.involved) & (ids >= 0)).any(-1)


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
    "ALL_QUESTION_TYPES",
    "ANSWERS",
    "ANSWERS_BY_TYPE",
    "COLOURS",
    "COUNT_TYPES",
    "DIGITS",
    "DIRECTIONS",
    "EXTRA_ANSWERS",
    "EXTRA_QUESTION_TYPES",
    "EXTRA_QUESTION_WORDS",
    "GLYPHS",
    "GLYPH_SHAPE",
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
    "check_question_types",
    "check_sizes",
    "eval_indices",
    "glyph_cells",
    "image_digest",
    "involved_tokens",
    "make_sample",
    "make_scene_question",
    "make_training_scene",
    "object_id_map",
    "parse_size",
    "pick_question",
    "random_background",
    "random_extra_scene",
    "random_scene",
    "render_scene",
    "sample_rng",
    "small_indices",
    "token_cells",
    "visual_tokens",
]
