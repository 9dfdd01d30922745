"""The training recipe's batches (benchmarks/grounded/batches.py): seeded scenes, the chat
sequences against the evaluation prompt, the per-token shape targets against an independent
rendering, and the answer-attention targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from benchmarks.grounded import batches as B
from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded import scenes as S


def test_training_batch_matches_processor(processor):
    kw = dict(scale=1.5, aug_prob=0.5, aug_max=2.0)
    batch, size, qtypes = B.training_batch(processor, 3, 0, 2, 3, **kw)
    size2, scenes = B.training_scenes(3, 0, 2, 3, **kw)
    assert size == size2 and [q.qtype for _, qs in scenes for q in qs] == qtypes
    assert batch["input_ids"].shape[0] == batch["image_grid_thw"].shape[0] == 2
    assert int((batch["labels"] != -100).sum()) == 2 * len(qtypes)  # answer + <|im_end|> each
    # sequence 0 starts with exactly the evaluation prompt of its image + answer + <|im_end|>
    scene, qs = scenes[0]
    image = S.render_scene(scene)
    ref = M.build_inputs(processor, [image], [qs[0].text])
    prompt_len = ref["input_ids"].shape[1]
    assert batch["input_ids"][0, :prompt_len].tolist() == ref["input_ids"][0].tolist()
    ans = [M.TOKEN_ID[qs[0].answer], M.TOKEN_ID["<|im_end|>"]]
    assert batch["input_ids"][0, prompt_len : prompt_len + 2].tolist() == ans
    assert batch["labels"][0, prompt_len : prompt_len + 2].tolist() == ans
    assert (batch["labels"][0, :prompt_len] == -100).all()
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    words = processor.tokenizer.decode(row).split()
    for q in qs[1:]:  # later turns: each question then its answer, in order
        turn = f"<|im_start|> user {q.text} <|im_end|> <|im_start|> assistant {q.answer} <|im_end|>"
        assert turn in " ".join(words)
    labelled = batch["labels"][0][batch["labels"][0] != -100][0::2].tolist()
    assert labelled == [M.TOKEN_ID[q.answer] for q in qs]
    patches = int(batch["image_grid_thw"][0].prod())
    assert torch.equal(batch["pixel_values"][:patches], ref["pixel_values"])
    with pytest.raises(ValueError, match="one size"):
        B.encode_training_batch(
            processor,
            [image, S.make_sample("val", 0, size=(224, 224)).image],
            [["a ?"], ["b ?"]],
            [["red"], ["red"]],
        )
    with pytest.raises(ValueError, match="one known word"):
        B.encode_training_batch(processor, [image], [["what colour is it ?"]], [["red blue"]])


def test_warm_canvases_scale_objects():
    sizes, warm = [(224, 224)], [(128, 128), (128, 160)]
    seen = set()
    for step in range(6):
        size, scenes = B.training_scenes(step, 0, 2, 1, sizes, warm_sizes=warm, warm_prob=1.0)
        seen.add(size)
        assert size in warm
        for scene, _ in scenes:  # objects as wide as on a 224 px image (capped at 0.3 * 128)
            assert all(o.size >= min(0.12 * 224, 0.3 * 128) - 1e-6 for o in scene.objects)
    assert len(seen) == 2
    assert B.training_scenes(0, 0, 1, 1, sizes, warm_sizes=warm, warm_prob=0.0)[0] == (224, 224)


def _coverage_labels(scene):
    """Independent: render each object alone, count its pixels per 16 px cell."""
    from PIL import Image

    h, w = scene.size
    plain = {"kind": "solid", "base": [0, 0, 0]}
    best = np.zeros((h // S.TOKEN_PX, w // S.TOKEN_PX))
    out = np.zeros_like(best, dtype=np.int64)
    for o in scene.objects:
        img = S.render_scene(S.Scene(scene.size, (o,), plain, ()), supersample=1)
        mask = np.asarray(img.convert("L")) > 0
        cover = mask.reshape(h // S.TOKEN_PX, S.TOKEN_PX, w // S.TOKEN_PX, S.TOKEN_PX).sum((1, 3))
        win = (cover >= S.TOKEN_PX * S.TOKEN_PX // 4) & (cover > best)
        out[win] = 1 + S.SHAPES.index(o.shape)
        best = np.maximum(best, np.where(cover >= S.TOKEN_PX * S.TOKEN_PX // 4, cover, 0))
    assert isinstance(img, Image.Image)
    return out


@pytest.mark.parametrize("index", [0, 3, 11])
def test_token_shape_labels(index):
    scene = S.random_scene(S.sample_rng("train", index, 5), (96, 144), scale=2.0)
    got = B.token_shape_labels(scene)
    assert got.shape == (6, 9) and got.dtype == np.int64
    want = _coverage_labels(scene)
    assert (got > 0).sum() > 0
    # equal up to anti-aliasing / ties on cells covered by two objects or at the threshold
    assert (got == want).mean() >= 0.95


def test_token_objects_and_shape_labels_agree():
    scene = S.random_scene(S.sample_rng("train", 4, 1), (112, 160), scale=2.0)
    objs, shapes = B.token_objects(scene), B.token_shape_labels(scene)
    assert objs.shape == shapes.shape == (7, 10)
    for k, o in enumerate(scene.objects, start=1):
        assert (shapes[objs == k] == 1 + S.SHAPES.index(o.shape)).all()
    assert ((shapes == 0) == (objs == 0)).all()
    assert np.array_equal(B.token_shape_labels(scene, objs), shapes)
    cover = B.token_cover(scene)
    kept = cover.copy()
    assert cover.shape == (len(scene.objects) + 1, 7, 10) and (cover.sum(0) == 256).all()
    assert np.array_equal(B.token_objects(scene, cover), objs)
    assert np.array_equal(cover, kept)  # not modified


def _independent_fine(scene):
    """Per token: the regular object's shape where token_shape_labels has one, else the class
    of the few-pixel object (glyph: its digit's class; small object: its shape's small class)
    with the most pixels of the id map in it, counted pixel by pixel."""
    base = B.token_shape_labels(scene)
    ids = S.object_id_map(scene)
    small = set(S.small_indices(scene))
    out = base.copy()
    for r in range(base.shape[0]):
        for c in range(base.shape[1]):
            if base[r, c]:
                continue
            cell = ids[16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
            best, best_n = 0, 0
            for i, o in enumerate(scene.objects):
                if i not in small and o.shape != S.GLYPH_SHAPE:
                    continue
                n = int((cell == i + 1).sum())
                if n > best_n:
                    if o.shape == S.GLYPH_SHAPE:
                        best = 1 + len(S.SHAPES) + int(o.symbol)
                    else:
                        best = 1 + len(S.SHAPES) + len(S.DIGITS) + S.SHAPES.index(o.shape)
                    best_n = n
            out[r, c] = best
    return out


@pytest.mark.parametrize("qtype", ["count_small", "read_glyph"])
@pytest.mark.parametrize("index", [1, 6])
def test_token_fine_labels_label_few_pixel_objects(qtype, index):
    sample = S.make_sample("train", index, 3, (160, 208), qtype)
    scene = sample.scene
    got = B.token_fine_labels(scene)
    assert got.shape == (10, 13) and got.dtype == np.int64
    assert got.min() >= 0 and got.max() < B.FINE_CLASSES
    assert np.array_equal(got, _independent_fine(scene))
    cover = B.token_cover(scene)
    objs = B.token_objects(scene, cover)
    assert np.array_equal(B.token_fine_labels(scene, objs, cover), got)
    # the glyph's digit reaches its tokens; the base labels call them background
    glyph = next(o for o in scene.objects if o.shape == S.GLYPH_SHAPE)
    digit = 1 + len(S.SHAPES) + int(glyph.symbol)
    assert (got == digit).any() and not (B.token_shape_labels(scene) > len(S.SHAPES)).any()
    small = S.small_indices(scene)
    shown = {
        1 + len(S.SHAPES) + len(S.DIGITS) + S.SHAPES.index(scene.objects[i].shape) for i in small
    }
    assert small and shown <= set(np.unique(got).tolist())


def test_precomputed_objects_and_cover_are_checked():
    """objects / cover passed in must belong to the scene: a clear error naming the argument."""
    scene = S.make_sample("train", 1, 3, (160, 208), "read_glyph").scene
    cover = B.token_cover(scene)
    objs = B.token_objects(scene, cover)
    n = len(scene.objects)
    for bad in (objs[:, :-1], objs.astype(np.float32), objs + n + 1, objs.T, list(objs)):
        with pytest.raises(ValueError, match=r"objects must be token_objects\(scene\)"):
            B.token_fine_labels(scene, bad, cover)
        with pytest.raises(ValueError, match="objects must be"):
            B.token_shape_labels(scene, bad)
    for bad in (cover[:-1], cover[:, :, :-1], cover.tolist()):
        with pytest.raises(ValueError, match=r"cover must be token_cover\(scene\) of shape"):
            B.token_fine_labels(scene, objs, bad)
        with pytest.raises(ValueError, match="cover must be"):
            B.token_objects(scene, bad)
    assert 1 + len(S.SHAPES) == B.FINE_DIGIT0 and B.FINE_SMALL0 == B.FINE_DIGIT0 + 10
    assert B.FINE_SMALL0 + len(S.SHAPES) == B.FINE_CLASSES


@pytest.mark.parametrize("index", [0, 5])
def test_token_fine_labels_equal_shape_labels_on_default_scenes(index):
    scene = S.random_scene(S.sample_rng("train", index, 2), (128, 160), scale=1.5)
    assert np.array_equal(B.token_fine_labels(scene), B.token_shape_labels(scene))


def test_training_batch_fine_labels(processor):
    kw = dict(sizes=[(128, 160)], qtypes=["read_glyph"])
    plain, _, _ = B.training_batch(processor, 2, 0, 2, 1, **kw)
    fine, _, _ = B.training_batch(processor, 2, 0, 2, 1, fine_labels=True, **kw)
    _, scenes = B.training_scenes(2, 0, 2, 1, **kw)
    want = np.concatenate([B.token_fine_labels(sc).flatten() for sc, _ in scenes])
    assert np.array_equal(fine["token_shape"].numpy(), want)
    assert (fine["token_shape"] > len(S.SHAPES)).any()
    assert not (plain["token_shape"] > len(S.SHAPES)).any()
    assert torch.equal(plain["input_ids"], fine["input_ids"])


def test_attn_target_masks(processor):
    """Per question: the tokens of the objects it involves; for ``left_of`` the left object of
    its pair only (the first-named one exactly when the answer is yes)."""
    batch, _, qtypes = B.training_batch(processor, 4, 0, 2, 3, sizes=[(128, 160)], scale=1.75)
    n_tok = (128 // 16) * (160 // 16)
    masks = batch["attn_target"]
    assert len(masks) == len(qtypes) and batch["qtypes"] == qtypes
    assert all(m.dtype == torch.bool and m.shape == (n_tok,) for m in masks)
    # every question but a "how many" with answer 0 involves an object with visible tokens
    assert sum(bool(m.any()) for m in masks) >= len(qtypes) - qtypes.count("count_colour")
    _, scenes = B.training_scenes(4, 0, 2, 3, sizes=[(128, 160)], scale=1.75)
    k = 0
    for scene, qs in scenes:
        objs = B.token_objects(scene).flatten()
        for q in qs:
            if q.qtype == "left_of":
                first = objs - 1 == q.involved[0]
                second = objs - 1 == q.involved[1]
                assert first.any() and second.any() and not (first & second).any()
                want = first if q.answer == "yes" else second
            else:
                want = np.isin(objs - 1, q.involved) & (objs > 0)
            assert np.array_equal(masks[k].numpy(), want)
            k += 1
    assert k == len(qtypes) and "left_of" in qtypes


@pytest.mark.parametrize(
    "qtype, size, index",
    [
        ("count_small", (224, 224), 3),
        ("count_colour", (128, 160), 5),
        ("count_small", (160, 208), 8),
    ],
)
def test_count_weights(qtype, size, index):
    """Each counted object holds 1/(n+1) of the target, spread evenly over its own tokens
    (those token_objects gives it, else every token it overlaps); nothing else holds any;
    non-counting questions have none."""
    checked = 0
    for k in range(index, index + 6):
        scene = S.make_sample("train", k, 3, size, qtype).scene
        cover = B.token_cover(scene)
        objs = B.token_objects(scene, cover)
        for q in S.candidate_questions(scene, qtype):
            got = B.count_weights(scene, q, objs, cover)
            assert np.array_equal(got, B.count_weights(scene, q))
            assert got.dtype == np.float32 and got.shape == objs.shape
            n = len(q.involved)
            assert got.sum() == pytest.approx(n / (n + 1), abs=1e-6)
            want = np.zeros(objs.shape)
            for i in q.involved:
                own = objs == i + 1
                if not own.any():
                    ids = S.object_id_map(scene).astype(np.int64) - 1
                    own = S.token_cells(ids == i).any(-1)
                assert own.any()
                want[own] += 1.0 / (n + 1) / own.sum()
            np.testing.assert_allclose(got, want, atol=1e-7)
            checked += 1
        other = S.candidate_questions(scene, "shape_of_colour")
        assert all(B.count_weights(scene, q) is None for q in other)
    assert checked >= 6


def test_count_weights_refuses_an_object_without_pixels():
    """A counted object that covers no pixel of the precomputed cover is an error, not a
    silently smaller target."""
    scene = S.make_sample("train", 3, 3, (224, 224), "count_small").scene
    q = next(q for q in S.candidate_questions(scene, "count_small") if q.involved)
    cover = B.token_cover(scene)
    objs = B.token_objects(scene, cover)
    i = q.involved[0]
    cover[i + 1] = 0
    objs[objs == i + 1] = 0
    with pytest.raises(ValueError, match=f"counted object {i} of the scene covers no pixel"):
        B.count_weights(scene, q, objs, cover)


def test_answer_positions(processor):
    """One position per question, row by row, each an assistant header whose next token is the
    labelled answer."""
    batch, _, qtypes = B.training_batch(processor, 4, 0, 2, 3, sizes=[(128, 160)], scale=1.75)
    got = B.answer_positions(batch["input_ids"])
    assert len(got) == len(qtypes) and got == sorted(got)
    for row, col in got:
        assert batch["input_ids"][row, col] == M.TOKEN_ID["assistant"]
        assert batch["labels"][row, col + 1] == batch["input_ids"][row, col + 1] != -100


def test_training_batch_count_targets(processor):
    """count_target: per question, count_weights flattened for the counting types, else None."""
    kw = dict(sizes=[(160, 160)], qtypes=["count_small", "count_colour", "read_glyph"])
    batch, _, qtypes = B.training_batch(processor, 3, 0, 2, 4, **kw)
    _, scenes = B.training_scenes(3, 0, 2, 4, **kw)
    got = batch["count_target"]
    assert len(got) == len(qtypes) == len(batch["attn_target"])
    k = 0
    for scene, qs in scenes:
        for q in qs:
            want = B.count_weights(scene, q)
            if want is None:
                assert got[k] is None and q.qtype == "read_glyph"
            else:
                assert torch.equal(got[k], torch.from_numpy(want.flatten()))
            k += 1
    assert any(t is None for t in got) and any(t is not None for t in got)


def test_count_query():
    """The colour and shape a counting question asks for, as COLOURS / SHAPES indices."""
    colours, shapes = list(S.COLOURS), list(S.SHAPES)
    seen = set()
    for k in range(8):
        for qtype in ("count_small", "count_colour", "read_glyph", "shape_of_colour"):
            scene = S.make_sample("train", k, 5, (160, 160), qtype).scene
            for q in S.candidate_questions(scene, qtype):
                got = B.count_query(q)
                seen.add(qtype)
                if qtype == "count_small":
                    kind = {(scene.objects[i].colour, scene.objects[i].shape) for i in q.involved}
                    assert (colours[got[0]], shapes[got[1]]) in kind or not q.involved
                    assert f"small {colours[got[0]]} {shapes[got[1]]} objects" in q.text
                elif qtype == "count_colour":
                    assert got[1] == -1 and f"how many {colours[got[0]]} objects" in q.text
                    assert all(scene.objects[i].colour == colours[got[0]] for i in q.involved)
                else:
                    assert got is None
    assert seen == {"count_small", "count_colour", "read_glyph", "shape_of_colour"}
    bad = S.Question("count_small", "how many small teal blob objects are there ?", "0", ())
    with pytest.raises(ValueError, match="names no known colour / shape"):
        B.count_query(bad)
    kw = dict(sizes=[(160, 160)], qtypes=["count_small", "count_colour", "read_glyph"])
    batch, _, _ = B.training_batch(M.build_processor(), 3, 0, 2, 4, **kw)
    _, scenes = B.training_scenes(3, 0, 2, 4, **kw)
    assert batch["count_query"] == [B.count_query(q) for _, qs in scenes for q in qs]
