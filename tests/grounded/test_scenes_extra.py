"""The opt-in question types (count_small, read_glyph): answers read back from the rendered
pixels, balance, determinism, few answer-carrying tokens, training scenes, and that the default
question distribution and the shipped model's vocabulary are unchanged by them."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded import scenes as S

ndimage = pytest.importorskip("scipy.ndimage")

SIZES = ((224, 224), (288, 320), (384, 384), (512, 512))


def test_defaults_unchanged():
    """Pinned on main 094ab29 (before the opt-in types): the default samples' image bytes and
    questions and the default training scenes are the same."""
    assert S.QUESTION_TYPES == (
        "colour_of_shape", "shape_of_colour", "count_colour", "left_of", "extreme"
    )  # fmt: skip
    assert (*S.QUESTION_TYPES, "count_small", "read_glyph") == S.ALL_QUESTION_TYPES
    h = hashlib.sha256()
    for split in ("train", "test"):
        for i in range(10):
            s = S.make_sample(split, i, size=(224, 288))
            assert s.question.qtype in S.QUESTION_TYPES
            h.update(f"{S.image_digest(s.image)} {s.question}".encode())
    for i in range(5):
        scene, qs = S.make_training_scene(S.sample_rng("train", i), (256, 256), 6, scale=1.5)
        assert all(o.symbol is None for o in scene.objects) and not S.small_indices(scene)
        h.update(f"{S.image_digest(S.render_scene(scene))} {qs}".encode())
    assert h.hexdigest() == "587aa7e38d6d26e11a82744ea39f30d43e2fb76b948560e6458fb94209727032"


def test_vocab_extends_the_shipped_one():
    """The shipped tokenizer's ids are VOCAB's first SHIPPED_VOCAB_LEN; the new words follow
    in spare embedding rows, one token each."""
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(str(M.MODEL_DIR), local_files_only=True)
    assert M.SHIPPED_VOCAB_LEN == len(shipped.get_vocab()) == 45
    for word in M.VOCAB[: M.SHIPPED_VOCAB_LEN]:
        assert shipped.convert_tokens_to_ids(word) == M.TOKEN_ID[word]
    new = M.VOCAB[M.SHIPPED_VOCAB_LEN :]
    assert set(new) == set(S.EXTRA_QUESTION_WORDS) | set(S.EXTRA_ANSWERS)
    assert len(M.VOCAB) <= M.VOCAB_SIZE
    tok = M.build_tokenizer()
    for t in S.EXTRA_QUESTION_TYPES:
        for answer in S.ANSWERS_BY_TYPE[t]:
            assert tok(answer, add_special_tokens=False)["input_ids"] == [M.TOKEN_ID[answer]]
    for qt in S.EXTRA_QUESTION_TYPES:
        text = S.make_sample("val", 0, qtype=qt, size=(224, 224)).question.text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert M.TOKEN_ID["<unk>"] not in ids and tok.decode(ids) == text


def test_glyph_bitmaps_distinct():
    maps = list(S.GLYPHS.values())
    assert set(S.GLYPHS) == set(S.DIGITS)
    assert all(len(m) == 5 and all(len(r) == 3 for r in m) for m in maps)
    assert len(set(maps)) == len(maps)


def _read_glyph(pixels: np.ndarray, o: S.SceneObject) -> tuple[str, tuple[int, int]]:
    """Decode a glyph from the image: the plate's top-left corner is found from the pixels,
    then each of the 3 x 5 cells is ink where its centre pixel is the ink colour. Returns the
    digit and the corner ``(x0, y0)``."""
    cell = round(o.size / 7)
    plate = np.all(pixels == S.GLYPH_PLATE, axis=-1)
    x_guess, y_guess = round(o.cx - 2.5 * cell), round(o.cy - 3.5 * cell)
    wy, wx = max(y_guess - 2, 0), max(x_guess - 2, 0)  # a plate may touch the top/left edge
    ys, xs = np.nonzero(plate[wy : y_guess + 3, wx : x_guess + 3])
    y0, x0 = wy + int(ys.min()), wx + int(xs.min())
    ink = np.asarray(S.COLOURS[o.colour])
    rows = []
    for r in range(5):
        row = ""
        for c in range(3):
            py = y0 + (1 + r) * cell + cell // 2
            px = x0 + (1 + c) * cell + cell // 2
            if np.array_equal(pixels[py, px], ink):
                row += "#"
            elif plate[py, px]:
                row += "."
            else:
                raise AssertionError(f"cell ({r}, {c}) is neither ink nor plate")
        rows.append(row)
    (symbol,) = [d for d, m in S.GLYPHS.items() if m == tuple(rows)]
    return symbol, (x0, y0)


def test_read_glyph_answers_from_pixels():
    for k, size in enumerate(SIZES):
        for i in range(6):
            s = S.make_sample("test", 10 * k + i, qtype="read_glyph", size=size)
            (g,) = s.question.involved
            o = s.scene.objects[g]
            assert o.shape == S.GLYPH_SHAPE and s.question.text == "what digit is drawn ?"
            symbol, (x0, y0) = _read_glyph(np.asarray(s.image), o)
            assert symbol == s.question.answer == o.symbol
            # the ink at a fixed place in its 16 px token (S.GLYPH_CELL_FRACTION): centred
            # where it fits (cells up to 3 px), else from the token's edge; plate inside
            cell = round(o.size / 7)
            t = S.TOKEN_PX
            ink_x, ink_y = x0 + cell, y0 + cell
            assert ink_x % t == max(t - 3 * cell, 0) // 2, (ink_x, cell)
            assert ink_y % t == max(t - 5 * cell, 0) // 2, (ink_y, cell)
            if 5 * cell <= t:  # one token holds every ink pixel
                assert ink_x // t == (ink_x + 3 * cell - 1) // t
                assert ink_y // t == (ink_y + 5 * cell - 1) // t
            assert x0 >= 0 and y0 >= 0
            assert x0 + 5 * cell <= size[1] and y0 + 7 * cell <= size[0]
            assert S.answer_question(s.scene, s.question) == s.question.answer


def _near(pixels: np.ndarray, colour: str, tol: int = 40) -> np.ndarray:
    diff = pixels.astype(np.int32) - np.asarray(S.COLOURS[colour])
    return np.abs(diff).max(-1) <= tol


def test_count_small_answers_from_pixels():
    """The question's answer is the count of small objects of that colour and shape; every
    small object is drawn where the scene says, and the image holds as many small blobs of
    each colour as the scene has small objects of it."""
    for k, size in enumerate(SIZES):
        for j in range(8):
            s = S.make_sample("test", 10 * k + j, qtype="count_small", size=size)
            words = s.question.text.split()
            assert words[:3] == ["how", "many", "small"]
            assert words[5:] == ["objects", "are", "there", "?"]
            colour, shape = words[3], words[4]
            objs = s.scene.objects
            small = S.small_indices(s.scene)
            want = [i for i in small if (objs[i].colour, objs[i].shape) == (colour, shape)]
            assert s.question.answer == str(len(want)) and set(s.question.involved) == set(want)
            for i in small:  # centred in a 16 px token, inside the image (S.SMALL_FRACTION)
                o = objs[i]
                assert o.cx % S.TOKEN_PX == o.cy % S.TOKEN_PX == S.TOKEN_PX / 2, (o.cx, o.cy)
                x0, y0, x1, y1 = o.bbox()
                assert x0 >= 0 and y0 >= 0 and x1 <= size[1] and y1 <= size[0], o
            assert any(o.colour == colour and o.shape == shape for o in objs)
            big = max(o.size for o in objs if o.shape != S.GLYPH_SHAPE)
            assert all(objs[i].size < 0.5 * big for i in small)
            px = np.asarray(s.image)
            for i in small:
                assert _near(px, objs[i].colour)[round(objs[i].cy), round(objs[i].cx)]
            glyph = [o for o in objs if o.shape == S.GLYPH_SHAPE]
            for c in {objs[i].colour for i in small}:
                mask = _near(px, c)
                for o in glyph:  # the glyph's ink is not an object
                    x0, y0, x1, y1 = (round(v) for v in o.bbox())
                    mask[max(y0, 0) : y1, max(x0, 0) : x1] = False
                lab, _ = ndimage.label(mask)
                extents = ndimage.find_objects(lab)
                blobs = sum(
                    max(e[0].stop - e[0].start, e[1].stop - e[1].start) < 0.5 * big
                    and (lab[e] > 0).sum() >= 4
                    for e in extents
                )
                assert blobs == sum(objs[i].colour == c for i in small), (size, j, c)


@pytest.mark.parametrize("qtype", S.EXTRA_QUESTION_TYPES)
def test_balanced_answers(qtype):
    answers = S.ANSWERS_BY_TYPE[qtype]
    n = 30 * len(answers)
    got = Counter(
        S.make_sample("train", i, qtype=qtype, size=(224, 224)).question.answer for i in range(n)
    )
    assert set(got) == set(answers)
    assert all(15 <= got[a] <= 45 for a in answers), got


def test_deterministic_by_seed():
    for qt in S.EXTRA_QUESTION_TYPES:
        a = S.make_sample("val", 3, seed=2, qtype=qt)
        b = S.make_sample("val", 3, seed=2, qtype=qt)
        c = S.make_sample("val", 3, seed=5, qtype=qt)
        assert a.scene == b.scene and a.question == b.question
        assert S.image_digest(a.image) == S.image_digest(b.image) != S.image_digest(c.image)
    qtypes = S.ALL_QUESTION_TYPES
    got = [S.make_sample("test", i, qtypes=qtypes).question.qtype for i in range(7)]
    assert got == list(qtypes)


def test_few_tokens_carry_the_answer():
    """The opt-in types' answers sit in fewer visual tokens than any default type's (measured
    over the same samples; docs/grounded_training.md records the numbers)."""
    mean = {}
    for qt in S.ALL_QUESTION_TYPES:
        fr = []
        for k, size in enumerate(SIZES):
            for j in range(5):
                s = S.make_sample("test", 500 + 5 * k + j, qtype=qt, size=size)
                m = S.involved_tokens(s.scene, s.question)
                assert m.shape == (size[0] // 16, size[1] // 16)
                fr.append(m.mean())
        mean[qt] = float(np.mean(fr))
    for qt in S.EXTRA_QUESTION_TYPES:
        assert mean[qt] < 0.02
        assert mean[qt] < 0.6 * min(mean[t] for t in S.QUESTION_TYPES), mean


def test_involved_tokens_known_object():
    scene = S.Scene(
        (64, 64), (S.SceneObject("square", "red", 24.0, 24.0, 10.0),), {"kind": "solid",
        "base": [100, 100, 100]}, ()
    )  # fmt: skip
    q = S.Question("count_small", "x", "1", (0,))
    m = S.involved_tokens(scene, q)  # the square spans x, y in [19.75, 28.25]: tokens 1 only
    assert m.sum() == 1 and m[1, 1]
    assert not S.involved_tokens(scene, S.Question("count_small", "x", "0", ())).any()


def test_training_scenes_keep_types_apart():
    qtypes = list(S.ALL_QUESTION_TYPES)
    seen = Counter()
    for i in range(40):
        rng = S.sample_rng("train", i, 9)
        scene, qs = S.make_training_scene(rng, (224, 224), 6, qtypes, scale=1.5)
        extra = {q.qtype in S.EXTRA_QUESTION_TYPES for q in qs}
        assert len(extra) == 1  # never both kinds on one scene
        if not extra.pop():  # a default scene: no small objects, no glyph
            assert not S.small_indices(scene)
            assert all(o.shape != S.GLYPH_SHAPE for o in scene.objects)
        for q in qs:
            assert S.answer_question(scene, q) == q.answer
            seen[q.qtype] += 1
    assert set(seen) == set(qtypes)


def test_bad_input():
    with pytest.raises(ValueError, match="qtype must be one of"):
        S.make_sample("test", 0, qtype="read_letters")
    with pytest.raises(ValueError, match="qtypes must be a non-empty list"):
        S.make_sample("test", 0, qtypes=[])
    with pytest.raises(ValueError, match="symbol must be one of"):
        S.random_extra_scene(S.sample_rng("test", 0), (224, 224), symbol="x")
    with pytest.raises(ValueError, match="target must be a"):
        S.random_extra_scene(S.sample_rng("test", 0), (224, 224), target=("red", "star"))
    with pytest.raises(ValueError, match="answer must be one of"):
        S.make_scene_question(S.sample_rng("test", 0), (224, 224), "read_glyph", "red")
    with pytest.raises(ValueError, match="o must be a glyph"):
        S.glyph_cells(S.SceneObject("square", "red", 30.0, 30.0, 10.0))
