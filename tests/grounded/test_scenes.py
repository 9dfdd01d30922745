"""The procedural scenes: determinism, split disjointness, token counts, answers recomputed from
the objects and read back from the rendered pixels, balance, bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import scenes as S


def test_same_seed_same_bytes_and_question():
    a = S.make_sample("train", 11, seed=3, size=(224, 288))
    b = S.make_sample("train", 11, seed=3, size=(224, 288))
    assert S.image_digest(a.image) == S.image_digest(b.image)
    assert a.question == b.question and a.scene == b.scene
    c = S.make_sample("train", 11, seed=4, size=(224, 288))
    d = S.make_sample("train", 12, seed=3, size=(224, 288))
    assert S.image_digest(c.image) != S.image_digest(a.image)
    assert S.image_digest(d.image) != S.image_digest(a.image)
    # default size comes from the sample's own generator: also reproducible
    e, f = S.make_sample("test", 5), S.make_sample("test", 5)
    assert e.scene.size == f.scene.size and S.image_digest(e.image) == S.image_digest(f.image)


def test_training_scene_reproducible():
    rng1, rng2 = S.sample_rng("train", 7, 1), S.sample_rng("train", 7, 1)
    s1, q1 = S.make_training_scene(rng1, (256, 256), 3)
    s2, q2 = S.make_training_scene(rng2, (256, 256), 3)
    assert s1 == s2 and q1 == q2 and len({q.qtype for q in q1}) == len(q1) == 3
    assert S.image_digest(S.render_scene(s1)) == S.image_digest(S.render_scene(s2))


def test_training_scene_questions():
    for i in range(30):
        scene, qs = S.make_training_scene(S.sample_rng("train", i), (224, 224), 8)
        assert 1 <= len(qs) <= 8 and len({q.text for q in qs}) == len(qs)
        assert max(Counter(q.qtype for q in qs).values()) <= S.MAX_PER_TYPE
        seen: set[int] = set()
        for q in qs:
            assert S.answer_question(scene, q) == q.answer
            if q.qtype != "count_colour":  # no object is asked about twice
                assert not seen & set(q.involved)
                seen |= set(q.involved)
    scene, qs = S.make_training_scene(S.sample_rng("train", 0), (224, 224), 5, object_range=(1, 1))
    assert len(scene.objects) == 1 and all(q.qtype != "left_of" for q in qs)
    with pytest.raises(ValueError, match="qtypes must be"):
        S.make_training_scene(S.sample_rng("train", 0), (224, 224), 2, ["colour"])
    with pytest.raises(ValueError, match="object_range"):
        S.random_scene(S.sample_rng("train", 0), (224, 224), object_range=(0, 3))
    with pytest.raises(ValueError, match="scale must be"):
        S.random_scene(S.sample_rng("train", 0), (224, 224), scale=0.5)


def test_splits_disjoint():
    n = 40
    digests = {}
    for split in ("train", "val", "test"):
        digests[split] = {
            S.image_digest(S.make_sample(split, i, size=(64, 80)).image) for i in range(n)
        }
        assert len(digests[split]) == n  # no repeats inside a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    # the generator streams themselves differ for the same index
    draws = {s: S.sample_rng(s, 0).integers(2**62) for s in ("train", "val", "test")}
    assert len(set(draws.values())) == 3


def test_token_counts_per_size():
    train = [S.visual_tokens(s) for s in S.TRAIN_SIZES]
    large = [S.visual_tokens(s) for s in S.LARGE_SIZES]
    assert min(train) >= 190 and max(train) <= 600
    assert min(large) >= 1000 and max(large) > 2000
    assert S.visual_tokens((768, 768)) == 48 * 48
    assert set(S.SPLIT_SIZES["test"]) >= set(S.TRAIN_SIZES) | set(S.LARGE_SIZES)
    assert set(S.SPLIT_SIZES["val"]) == set(S.TRAIN_SIZES)


def test_processor_token_count_matches():
    from tokenprune_kernels.grounded.model import build_image_processor

    proc = build_image_processor()
    for size in ((224, 288), (736, 720)):
        img = S.render_scene(S.random_scene(S.sample_rng("val", 1), size))
        assert img.size == (size[1], size[0])
        grid = proc(images=[img], return_tensors="pt")["image_grid_thw"]
        assert grid.tolist() == [[1, size[0] // 8, size[1] // 8]]
        assert int(grid.prod()) // 4 == S.visual_tokens(size)


def _pixel(image, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[int(y), int(x)])


@pytest.mark.parametrize("qtype", S.QUESTION_TYPES)
def test_answers_by_construction(qtype):
    answers = Counter()
    for i in range(60):
        s = S.make_sample("val", i, size=(224, 240), qtype=qtype)
        q, scene = s.question, s.scene
        assert q.qtype == qtype and q.answer in S.ANSWERS_BY_TYPE[qtype]
        assert q.text.endswith(" ?") and all(
            w in S.ANSWERS or w in S.QUESTION_WORDS or w in S.SHAPES or w in S.COLOURS
            for w in q.text.split()
        )
        assert S.answer_question(scene, q) == q.answer
        objs = scene.objects
        assert 2 <= len(objs) <= S.MAX_OBJECTS
        if qtype == "count_colour":
            colour = q.text.split()[2]
            assert int(q.answer) == len(q.involved) == sum(o.colour == colour for o in objs)
        elif qtype == "left_of":
            a, b = (objs[i] for i in q.involved)
            assert (a.cx < b.cx) == (q.answer == "yes")
            assert abs(a.cx - b.cx) >= S.MARGIN_FRACTION * (a.size + b.size) / 2
        else:
            (t,) = q.involved
            o = objs[t]
            want = o.shape if qtype == "shape_of_colour" else o.colour
            assert want == q.answer
            # the rendered image really shows the answered colour at the object's centre
            assert _pixel(s.image, o.cx, o.cy) == S.COLOURS[o.colour]
            if qtype == "extreme":  # leads every other object in that direction
                sign, attr = {
                    "leftmost": (-1, "cx"),
                    "rightmost": (1, "cx"),
                    "topmost": (-1, "cy"),
                    "bottommost": (1, "cy"),
                }[q.text.split()[4]]
                others = [p for j, p in enumerate(objs) if j != t]
                assert all(sign * getattr(o, attr) > sign * getattr(p, attr) for p in others)
        answers[q.answer] += 1
    # balanced by design: every answer of the type shows up
    assert set(answers) == set(S.ANSWERS_BY_TYPE[qtype])


def test_answer_question_rejects_ill_posed():
    scene = S.Scene(
        (224, 224),
        (
            S.SceneObject("circle", "red", 50, 50, 30),
            S.SceneObject("circle", "blue", 150, 150, 30),
        ),
        {"kind": "solid", "base": [100, 100, 100]},
        (),
    )
    q = S.Question("colour_of_shape", "what colour is the circle ?", "red", (0,))
    with pytest.raises(ValueError, match="not well posed"):
        S.answer_question(scene, q)
    ok = S.Question("left_of", "is the red object left of the blue object ?", "yes", (0, 1))
    assert S.answer_question(scene, ok) == "yes"
    assert S.candidate_questions(scene, "colour_of_shape") == []


def test_objects_inside_and_apart():
    for i in range(30):
        scene = S.random_scene(S.sample_rng("test", i), (256, 320))
        h, w = scene.size
        for a, o in enumerate(scene.objects):
            x0, y0, x1, y1 = o.bbox()
            assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h
            assert S.SIZE_FRACTION[0] * 256 <= o.size <= S.SIZE_FRACTION[1] * 256
            for p in scene.objects[a + 1 :]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) >= 0.6 * (o.size + p.size)
        assert max(scene.colour_counts().values()) <= S.MAX_PER_COLOUR


def test_objects_scale_with_image():
    small = S.random_scene(S.sample_rng("val", 3), (224, 224))
    large = S.random_scene(S.sample_rng("val", 3), (768, 768))
    rel_s = [o.size / 224 for o in small.objects]
    rel_l = [o.size / 768 for o in large.objects]
    np.testing.assert_allclose(rel_s, rel_l)  # same draws, same relative layout


def test_eval_indices():
    idx = S.eval_indices("test", 3)
    assert len(idx) == 3 * len(S.SPLIT_SIZES["test"])
    assert [i for i, _ in idx] == list(range(len(idx)))
    assert idx[3][1] == S.SPLIT_SIZES["test"][1]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.make_sample("dev", 0), "split must be one of"),
        (lambda: S.make_sample("train", -1), "index must be an int >= 0"),
        (lambda: S.make_sample("train", 0, size=(100, 224)), "multiples of 16"),
        (lambda: S.make_sample("train", 0, size=(224,)), "size must be"),
        (lambda: S.make_sample("train", 0, qtype="colour"), "qtype must be one of"),
        (
            lambda: S.make_scene_question(S.sample_rng("train", 0), (224, 224), "left_of", "red"),
            "answer must be one of",
        ),
        (
            lambda: S.make_training_scene(S.sample_rng("train", 0), (224, 224), 0),
            "n_questions must be",
        ),
        (lambda: S.eval_indices("val", 0), "n_per_size must be"),
        (
            lambda: S.render_scene(S.random_scene(S.sample_rng("val", 0), (64, 64)), 0),
            "supersample",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_parse_size():
    from tokenprune_kernels.grounded.scenes import parse_size

    assert parse_size("256x320") == (256, 320) and parse_size(" 64X80 ") == (64, 80)
    for bad, why in (("256", "HEIGHTxWIDTH"), ("2x3x4", "HEIGHTxWIDTH"), ("100x64", "multiples")):
        with pytest.raises(ValueError, match=f"--flag must be .*{why}"):
            parse_size(bad, "--flag")
    with pytest.raises(ValueError, match=r"^size must be"):
        parse_size("48x64")
