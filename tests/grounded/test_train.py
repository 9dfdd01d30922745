"""The training script on a tiny model: a few steps end to end (model directory, log), the same
seed gives the same weights, the curriculum and learning-rate schedules, option errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")
from safetensors.torch import load_file

from tokenprune_kernels.grounded import train as T
from tokenprune_kernels.grounded.model import load_model_dir

TINY = [
    "--vision-dim", "16", "--vision-heads", "2", "--hidden-size", "32",
    "--intermediate-size", "48", "--heads", "4", "--kv-heads", "2",
    "--images", "2", "--questions", "2", "--sizes", "64x80,80x64", "--warmup", "2",
    "--log-every", "1", "--threads", "1", "--warm-sizes", "64x64",
]  # fmt: skip


def _run(tmp_path, name, *extra):
    args = T.parse_args(["--out", str(tmp_path / name), *TINY, *extra])
    return T.train(args, command="test"), tmp_path / name


def test_tiny_run_and_reproducible(tmp_path):
    log, out = _run(tmp_path, "a", "--steps", "3", "--val-per-size", "0", "--test-per-size", "0")
    again, out2 = _run(tmp_path, "b", "--steps", "3", "--val-per-size", "0", "--test-per-size", "0")
    w1 = load_file(out / "model" / "model.safetensors")
    w2 = load_file(out2 / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [s["loss"] for s in log["steps"]] == [s["loss"] for s in again["steps"]]
    _, out3 = _run(
        tmp_path, "c", "--steps", "3", "--seed", "1", "--val-per-size", "0", "--test-per-size", "0"
    )
    w3 = load_file(out3 / "model" / "model.safetensors")
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
    saved = json.loads((out / T.LOG_FILE).read_text())
    assert saved["steps_done"] == 3 and len(saved["steps"]) == 3 and saved["command"] == "test"
    assert saved["versions"]["torch"] == torch.__version__ and saved["threads"] == 1
    assert saved["args"]["sizes"] == [[64, 80], [80, 64]]
    assert saved["steps"][0]["scale"] == T.curriculum_scale(0, 3, 2.5, 0.4) == 2.5
    model, _ = load_model_dir(out / "model")
    assert model.config.text_config.hidden_size == 32


def test_validation_and_test_evaluation(tmp_path):
    log, out = _run(
        tmp_path, "v", "--steps", "2", "--eval-every", "1", "--val-per-size", "1",
        "--test-per-size", "1",
    )  # fmt: skip
    assert [v["step"] for v in log["val"]] == [1, 2] and log["val"][0]["n"] == 9
    assert log["best"]["step"] in (1, 2)
    test = log["test"]
    assert test["n"] == 13 and set(test["by_tokens"]) == {"<=600", ">600"}
    assert sum(v["n"] for v in test["by_type"].values()) == 13
    preds = json.loads((out / "test_predictions.json").read_text())
    assert len(preds) == 13
    acc = sum(p["prediction"] == p["answer"] for p in preds) / 13
    assert test["accuracy"] == pytest.approx(acc)


def test_schedules():
    assert T.curriculum_scale(0, 100, 3.0, 0.5) == 3.0
    assert T.curriculum_scale(25, 100, 3.0, 0.5) == pytest.approx(2.0)
    assert T.curriculum_scale(50, 100, 3.0, 0.5) == T.curriculum_scale(99, 100, 3.0, 0.5) == 1.0
    assert T.curriculum_scale(5, 100, 3.0, 0.0) == 1.0
    assert T.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.warm_probability(0, 100, 0.5) == 1.0
    assert T.warm_probability(25, 100, 0.5) == pytest.approx(0.5)
    assert T.warm_probability(60, 100, 0.5) == T.warm_probability(3, 100, 0.0) == 0.0


def test_warm_canvases_scale_objects():
    sizes, warm = [(224, 224)], [(128, 128), (128, 160)]
    seen = set()
    for step in range(6):
        size, scenes = T.training_scenes(step, 0, 2, 1, sizes, warm_sizes=warm, warm_prob=1.0)
        seen.add(size)
        assert size in warm
        for scene, _ in scenes:  # objects as wide as on a 224 px image (capped at 0.3 * 128)
            assert all(o.size >= min(0.12 * 224, 0.3 * 128) - 1e-6 for o in scene.objects)
    assert len(seen) == 2
    assert T.training_scenes(0, 0, 1, 1, sizes, warm_sizes=warm, warm_prob=0.0)[0] == (224, 224)


def _coverage_labels(scene):
    """Independent: render each object alone, count its pixels per 16 px cell."""
    from PIL import Image

    from tokenprune_kernels.grounded.scenes import SHAPES, TOKEN_PX, Scene, render_scene

    h, w = scene.size
    plain = {"kind": "solid", "base": [0, 0, 0]}
    best = np.zeros((h // TOKEN_PX, w // TOKEN_PX))
    out = np.zeros_like(best, dtype=np.int64)
    for o in scene.objects:
        img = render_scene(Scene(scene.size, (o,), plain, ()), supersample=1)
        mask = np.asarray(img.convert("L")) > 0
        cover = mask.reshape(h // TOKEN_PX, TOKEN_PX, w // TOKEN_PX, TOKEN_PX).sum((1, 3))
        win = (cover >= TOKEN_PX * TOKEN_PX // 4) & (cover > best)
        out[win] = 1 + SHAPES.index(o.shape)
        best = np.maximum(best, np.where(cover >= TOKEN_PX * TOKEN_PX // 4, cover, 0))
    assert isinstance(img, Image.Image)
    return out


@pytest.mark.parametrize("index", [0, 3, 11])
def test_token_shape_labels(index):
    from tokenprune_kernels.grounded.scenes import random_scene, sample_rng

    scene = random_scene(sample_rng("train", index, 5), (96, 144), scale=2.0)
    got = T.token_shape_labels(scene)
    assert got.shape == (6, 9) and got.dtype == np.int64
    want = _coverage_labels(scene)
    assert (got > 0).sum() > 0
    # equal up to anti-aliasing / ties on cells covered by two objects or at the threshold
    assert (got == want).mean() >= 0.95


def test_token_colour_and_centre_labels():
    from tokenprune_kernels.grounded.scenes import COLOURS, SHAPES, random_scene, sample_rng

    scene = random_scene(sample_rng("train", 4, 1), (112, 160), scale=2.0)
    objs, shapes, colours = (
        T.token_objects(scene),
        T.token_shape_labels(scene),
        T.token_colour_labels(scene),
    )
    assert objs.shape == shapes.shape == colours.shape == (7, 10)
    for k, o in enumerate(scene.objects, start=1):
        assert (shapes[objs == k] == 1 + SHAPES.index(o.shape)).all()
        assert (colours[objs == k] == 1 + list(COLOURS).index(o.colour)).all()
    assert ((shapes == 0) == (objs == 0)).all() and ((colours == 0) == (objs == 0)).all()
    assert np.array_equal(T.token_shape_labels(scene, objs), shapes)
    assert np.array_equal(T.token_colour_labels(scene, objs), colours)
    centre = T.token_centre_labels(scene)
    assert centre.dtype == bool and centre.sum() == len(scene.objects)
    for o in scene.objects:
        assert centre[int(o.cy // 16), int(o.cx // 16)]


@pytest.mark.parametrize("words, centre", [(False, False), (True, True), (False, True)])
def test_aux_probe_outputs_and_loss(words, centre):
    from tokenprune_kernels.grounded.model import TOKEN_ID

    embed = torch.nn.Embedding(64, 16)
    probe = T.AuxProbe(16, embed, words=words, centre=centre)
    assert all(p is not embed.weight for p in probe.parameters())  # referenced, not owned
    feats = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    out = probe(feats)
    n_lin = (2 if words else 5) + int(centre)
    assert out.shape == (9, n_lin + (10 if words else 0))
    if words:  # colour / shape scores are dot products with the word embeddings
        want = feats @ embed.weight[TOKEN_ID["blue"]]
        assert torch.allclose(out[:, n_lin + 2], want, atol=1e-6)
        want = feats @ embed.weight[TOKEN_ID["diamond"]]
        assert torch.allclose(out[:, n_lin + 6 + 3], want, atol=1e-6)
    batch = {
        "token_shape": torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2]),
        "token_colour": torch.tensor([0, 1, 2, 3, 4, 0, 0, 5, 6]),
        "token_centre": torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool),
    }
    loss = T._probe_loss(probe, feats, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert (embed.weight.grad is not None) == words
    with pytest.raises(ValueError, match="token_shape has 9 labels for 8 tokens"):
        T._probe_loss(probe, feats[:8], batch)


def test_probe_loss_reaches_the_vision_tower(tmp_path):
    from tokenprune_kernels.grounded.model import build_config, build_model, build_processor

    cfg = build_config(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48)
    model = build_model(cfg, seed=3)
    processor = build_processor()
    batch, _, qtypes = T.training_batch(processor, 2, 0, 2, 2, sizes=[(64, 96)])
    n_tok = int((batch["image_grid_thw"].prod(1) // 4).sum())
    assert batch["token_shape"].shape == (n_tok,)
    probe = T.AuxProbe(32, model.get_input_embeddings(), words=True, centre=True)
    logits, aux = T.training_forward(model, batch, probe)
    assert torch.equal(logits, T.training_logits(model, batch))
    assert aux is not None and torch.isfinite(aux) and aux > 0
    aux.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    ce = T.answer_token_losses(logits, batch["labels"])
    assert len(ce) == len(qtypes) and all(c > 0 for c in ce)


def _tiny_batch(multi_turn=True):
    from tokenprune_kernels.grounded.model import build_config, build_model, build_processor

    cfg = build_config(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48)
    model = build_model(cfg, seed=3)
    batch, _, qtypes = T.training_batch(
        build_processor(), 4, 0, 2, 3, multi_turn, sizes=[(128, 160)], scale=1.75
    )
    return model, batch, qtypes


@pytest.mark.parametrize("multi_turn", [True, False])
def test_involved_token_masks(multi_turn):
    _, batch, qtypes = _tiny_batch(multi_turn)
    n_tok = (128 // 16) * (160 // 16)
    assert len(batch["involved"]) == len(qtypes)
    assert all(m.dtype == torch.bool and m.shape == (n_tok,) for m in batch["involved"])
    # every question but a "how many" with answer 0 involves an object with visible tokens
    assert sum(bool(m.any()) for m in batch["involved"]) >= len(qtypes) - qtypes.count(
        "count_colour"
    )
    _, scenes = T.training_scenes(4, 0, 2, 3, sizes=[(128, 160)], scale=1.75)
    k = 0
    for scene, qs in scenes:
        objs = T.token_objects(scene).flatten()
        for q in qs:
            want = np.isin(objs - 1, q.involved) & (objs > 0)
            assert np.array_equal(batch["involved"][k].numpy(), want)
            first, second = batch["involved_first"][k], batch["involved_second"][k]
            left = batch["involved_left"][k]
            if q.qtype == "left_of":
                assert np.array_equal(first.numpy(), objs - 1 == q.involved[0])
                assert np.array_equal(second.numpy(), objs - 1 == q.involved[1])
                assert first.any() and second.any() and not (first & second).any()
                # the left object of the pair: the first named one exactly when the answer is yes
                assert torch.equal(left, first if q.answer == "yes" else second)
            else:
                assert torch.equal(first, batch["involved"][k])
                assert torch.equal(second, batch["involved"][k])
                assert torch.equal(left, batch["involved"][k])
            k += 1
    assert k == len(qtypes) and "left_of" in qtypes


class _Out:
    def __init__(self, hidden_states=None):
        self.hidden_states = hidden_states


def test_llm_aux_position_loss_is_zero_for_exact_positions():
    _, batch, _ = _tiny_batch()
    ids = batch["input_ids"]
    visual = ids == T.TOKEN_ID[T.IMAGE_PAD]
    rows, length = ids.shape
    aux = T.LLMAux(32, pos_weight=1.0, pos_layer=1)
    with torch.no_grad():
        aux.pos.weight.zero_()
        aux.pos.weight[0, 0] = aux.pos.weight[1, 1] = 1.0
        aux.pos.bias.zero_()
    k = torch.arange(8 * 10)
    exact = torch.stack([k // 10, k % 10], 1).float() / T.POS_SCALE  # grid 8 x 10 tokens
    hidden = torch.zeros(rows, length, 32)
    hidden[visual] = torch.cat([exact, torch.zeros(80, 30)], 1).repeat(rows, 1)
    assert aux(_Out([hidden, hidden]), batch)["pos"].item() == pytest.approx(0.0, abs=1e-12)
    swapped = hidden.clone()
    swapped[visual] = torch.cat([exact.flip(1), torch.zeros(80, 30)], 1).repeat(rows, 1)
    loss = aux(_Out([swapped, swapped]), batch)["pos"]
    want = ((exact.flip(1) - exact) ** 2).mean()
    assert loss.item() == pytest.approx(want.item()) and loss > 0


@pytest.mark.parametrize("multi_turn", [True, False])
@pytest.mark.parametrize("layer, head", [(-1, 0), (1, 3), (0, 2)])
def test_llm_aux_answer_rows_equal_eager_attention(layer, head, multi_turn):
    model, batch, _ = _tiny_batch(multi_turn)
    aux = T.LLMAux(32, attn_weight=1.0, attn_layer=layer, attn_head=head)
    with pytest.raises(RuntimeError, match="needs attach"):
        aux.answer_probs(batch)
    aux.attach(model)
    model.set_attn_implementation("eager")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    idx, grid = batch["image_index"], batch["image_grid_thw"]
    chunks = torch.split(batch["pixel_values"], grid.prod(1).tolist())
    with torch.no_grad():  # each sequence with its image's pixels
        out = model(
            **inputs,
            pixel_values=torch.cat([chunks[i] for i in idx.tolist()]),
            image_grid_thw=grid[idx],
            output_attentions=True,
            use_cache=False,
        )
        rows = aux.answer_probs(batch)
    want = out.attentions[layer][:, head]
    assert len(rows) == len(batch["involved"]) == 6
    assert len({row for row, _, _ in rows}) == (2 if multi_turn else 6)
    for row, col, probs in rows:
        assert batch["input_ids"][row, col] == T.TOKEN_ID["assistant"]
        assert torch.allclose(probs, want[row, col], atol=1e-6)
        assert probs[col + 1 :].abs().sum() == 0
    aux.detach()
    with pytest.raises(RuntimeError, match="needs attach"):
        aux.answer_probs(batch)


def test_llm_aux_bad_layer_or_head():
    model, batch, _ = _tiny_batch()
    with pytest.raises(ValueError, match="attn_layer must index one of the 4 decoder layers"):
        T.LLMAux(32, attn_weight=1.0, attn_layer=4).attach(model)
    with pytest.raises(ValueError, match=r"attn_head must be in \[0, 4\) for 4 heads"):
        T.LLMAux(32, attn_weight=1.0, attn_head=4).attach(model)
    with pytest.raises(ValueError, match="split_pairs also uses attn_head"):
        T.LLMAux(32, attn_weight=1.0, attn_head=3, split_pairs=True).attach(model)
    with pytest.raises(ValueError, match="early_layer must index one of the 4 decoder layers"):
        T.LLMAux(32, attn_weight=1.0, early_layer=-5).attach(model)
    with pytest.raises(ValueError, match=r"early_types must be of .*\['x'\]"):
        T.LLMAux(32, attn_weight=1.0, early_types=["extreme", "x"])
    with pytest.raises(ValueError, match="split_pairs and left_only are exclusive"):
        T.LLMAux(32, attn_weight=1.0, split_pairs=True, left_only=True)
    states = [torch.zeros(2, batch["input_ids"].shape[1], 32)] * 5
    with pytest.raises(ValueError, match=r"pos_layer must be in \[1, 4\]"):
        T.LLMAux(32, pos_weight=1.0, pos_layer=5)(_Out(states), batch)


def test_llm_aux_attention_loss():
    model, batch, qtypes = _tiny_batch()
    aux = T.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1)
    aux.attach(model)
    with torch.no_grad():
        T.training_forward(model, batch)
    visual = batch["input_ids"] == T.TOKEN_ID[T.IMAGE_PAD]
    want = [
        -np.log(p[visual[row].nonzero().squeeze(1)[m]].sum().item() + 1e-4)
        for (row, _, p), m in zip(aux.answer_probs(batch), batch["involved"], strict=True)
        if m.any()
    ]
    loss = aux(_Out(), batch)["attn"]
    assert len(want) >= 4 and loss.item() == pytest.approx(float(np.mean(want)), rel=1e-5)
    split = T.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, split_pairs=True)
    split.attach(model)
    with torch.no_grad():
        T.training_forward(model, batch)
    want = [
        -np.log(p[visual[row].nonzero().squeeze(1)[m]].sum().item() + 1e-4)
        for head, key in ((1, "involved_first"), (2, "involved_second"))
        for (row, _, p), m in zip(split.answer_probs(batch, head), batch[key], strict=True)
        if m.any()
    ]
    assert split(_Out(), batch)["attn"].item() == pytest.approx(float(np.mean(want)), rel=1e-5)
    left = T.LLMAux(32, attn_weight=1.0, attn_layer=1, attn_head=2, left_only=True)
    left.attach(model)
    with torch.no_grad():
        T.training_forward(model, batch)
    want = [
        -np.log(p[visual[row].nonzero().squeeze(1)[m]].sum().item() + 1e-4)
        for (row, _, p), m in zip(left.answer_probs(batch), batch["involved_left"], strict=True)
        if m.any()
    ]
    got = left(_Out(), batch)["attn"].item()
    assert got == pytest.approx(float(np.mean(want)), rel=1e-5)
    # spatial questions read head 1 of layer 1, the others head 1 of the last layer
    two = T.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, early_layer=1)
    two.attach(model)
    with torch.no_grad():
        T.training_forward(model, batch)
    late, early = two.answer_probs(batch), two.answer_probs(batch, layer=1)
    assert batch["qtypes"] == qtypes
    spatial = [t in ("left_of", "extreme") for t in qtypes]
    assert any(spatial) and not all(spatial)
    want = [
        -np.log(p[visual[row].nonzero().squeeze(1)[m]].sum().item() + 1e-4)
        for (row, _, p), (_, _, e), m, f in zip(
            late, early, batch["involved"], spatial, strict=True
        )
        if m.any()
        for p in [e if f else p]
    ]
    got = two(_Out(), batch)["attn"].item()
    assert got == pytest.approx(float(np.mean(want)), rel=1e-5)
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(late, early, strict=True))
    two.detach()
    # -1 and 3 name the same layer of 4: one hook, the same rows either way
    same = T.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, early_layer=3)
    same.attach(model)
    assert list(same._attn) == [3]
    with torch.no_grad():
        T.training_forward(model, batch)
    for a, b in zip(same.answer_probs(batch), same.answer_probs(batch, layer=3), strict=True):
        assert torch.equal(a[2], b[2])
    same.detach()
    batch["involved"] = batch["involved"][:-1]
    with pytest.raises(ValueError, match="6 answers for 5"):
        aux(_Out(), batch)


def test_tiny_run_with_llm_aux(tmp_path):
    log, out = _run(
        tmp_path, "x", "--steps", "2", "--val-per-size", "1", "--eval-every", "1",
        "--test-per-size", "0", "--aux-pos", "1", "--aux-attn", "0.5", "--aux-attn-layer", "2",
    )  # fmt: skip
    assert {"aux_pos", "aux_attn"} <= set(log["steps"][0]) and log["best"]["step"] in (1, 2)
    assert "eager" not in (out / "model" / "config.json").read_text()
    model, _ = load_model_dir(out / "model")
    assert model.config.text_config.hidden_size == 32


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--aux-pos", "-1"], "--aux-pos and --aux-attn must be >= 0"),
        (["--aux-pos-layer", "5"], "--aux-pos-layer must be in [1, --layers (4)]"),
        (["--aux-attn-layer", "4"], "--aux-attn-layer must be a decoder layer index (-4 .. 3)"),
        (["--aux-attn-head", "4"], "--aux-attn-head must be in [0, --heads (4))"),
        (["--aux-attn-head", "3", "--aux-attn-split", "--no-aux-attn-left"], "leave a head"),
        (["--aux-attn-split"], "--aux-attn-split and --aux-attn-left are exclusive (add --no-"),
        (["--aux-attn-early-layer", "4"], "--aux-attn-early-layer must be a decoder layer"),
        (["--aux-attn-early-types", "extreme,x"], "--aux-attn-early-types must be of"),
        (["--aux-attn-early-types", "extreme,x,y"], "(or ''), got x,y"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--types", "colour"], "--types must be"),
        (["--aug-prob", "2"], "--aug-prob must be"),
        (["--sizes", "100x64"], "--sizes must be"),
        (["--val-per-size", "-1"], "--val-per-size must be >= 0"),
        (["--start-scale", "9"], "--start-scale must be"),
        (["--warm", "1.5"], "--warm must be"),
        (["--stop-after", "0"], "--stop-after must be >= 1"),
        (["--mrope", "8,x,4"], "--mrope must be"),
        (["--mrope", "8,4,5"], "--mrope must be ints >= 0 summing to half the head dim (16)"),
        (["--mrope", "8,8"], "--mrope must be a list of ints whose length is a multiple of 3"),
        (["--mrope", "8,8,0"], "--mrope must give at least one frequency to each of t, h and w"),
        (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
        (["--warm-sizes", "64x64,abc"], "--warm-sizes must be HEIGHTxWIDTH"),
        (["--warm-sizes", "64x70"], "--warm-sizes must be"),
    ],
)
def test_bad_options(extra, match, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", *extra])
    assert match in capsys.readouterr().err


def test_mrope_default_follows_the_head_dim():
    """The shipped interleaved sections at head dim 32; build_config's split elsewhere; an
    explicit --mrope always wins."""
    assert T.parse_args(["--out", "x"]).mrope == list(T.SHIPPED_MROPE)
    assert sum(T.SHIPPED_MROPE) == 128 // 4 // 2
    assert T.parse_args(["--out", "x", "--heads", "2", "--kv-heads", "2"]).mrope is None
    assert T.parse_args(["--out", "x", "--mrope", "2,7,7"]).mrope == [2, 7, 7]


def test_early_attention_options():
    """The shipped defaults; '' puts every type at --aux-attn-layer; --no-aux-attn-left."""
    args = T.parse_args(["--out", "x"])
    assert args.aux_attn_early_layer == 1 and args.aux_attn_left
    assert args.aux_attn_early_types == list(T.SHIPPED_EARLY_TYPES)
    assert T.parse_args(["--out", "x", "--aux-attn-early-types", ""]).aux_attn_early_types == []
    assert not T.parse_args(["--out", "x", "--no-aux-attn-left"]).aux_attn_left
