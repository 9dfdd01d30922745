"""The training recipe (benchmarks/grounded/loop.py, train.py) on a tiny model: a few steps end to
end (model directory, log), the same seed gives the same weights, the forward against the
model's own, the schedules, the defaults (the shipped recipe) and option errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")
from safetensors.torch import load_file

from benchmarks.grounded import loop
from benchmarks.grounded import train as T
from benchmarks.grounded.batches import training_batch
from benchmarks.grounded.losses import answer_loss, answer_token_losses, shape_probe
from tokenprune_kernels.bench import git_commit
from tokenprune_kernels.grounded import model as M

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--vision-dim", "16", "--vision-heads", "2", "--hidden-size", "32",
    "--intermediate-size", "48", "--heads", "4", "--kv-heads", "2",
    "--images", "2", "--questions", "2", "--sizes", "64x80,80x64", "--warmup", "2",
    "--log-every", "1", "--threads", "1", "--warm-sizes", "64x64",
]  # fmt: skip


def _run(tmp_path, name, *extra):
    args = T.parse_args(["--out", str(tmp_path / name), *TINY, *extra])
    return loop.train(args, "test"), tmp_path / name


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
    saved = json.loads((out / loop.LOG_FILE).read_text())
    assert saved["steps_done"] == 3 and len(saved["steps"]) == 3 and saved["command"] == "test"
    assert saved["versions"]["torch"] == torch.__version__ and saved["threads"] == 1
    assert saved["versions"]["commit"] == git_commit()
    assert saved["args"]["sizes"] == [[64, 80], [80, 64]]
    assert saved["steps"][0]["scale"] == loop.curriculum_scale(0, 3, 2.5, 0.4) == 2.5
    model, _ = M.load_model_dir(out / "model")
    assert model.config.text_config.hidden_size == 32


def test_fine_probe_run(tmp_path):
    """--fine-probe trains a probe over FINE_CLASSES on the opt-in scenes' fine labels; without
    it the same run's probe loss differs (the glyph tokens are background there)."""
    common = ["--steps", "2", "--val-per-size", "0", "--test-per-size", "0"]
    types = ["--question-types", "read_glyph,count_small"]
    fine, _ = _run(tmp_path, "f", *common, *types, "--fine-probe")
    plain, _ = _run(tmp_path, "p", *common, *types)
    assert fine["args"]["fine_probe"] is True and plain["args"]["fine_probe"] is False
    assert [s["aux"] for s in fine["steps"]] != [s["aux"] for s in plain["steps"]]
    assert all(math.isfinite(s["aux"]) for s in fine["steps"])


def test_count_sink_run(tmp_path):
    """--aux-attn-count-sink changes the answer-attention loss of the counting questions only:
    recorded in the log, finite, and different from the same run without it."""
    common = ["--steps", "2", "--val-per-size", "0", "--test-per-size", "0"]
    types = ["--question-types", "count_colour,count_small"]
    sink, _ = _run(tmp_path, "s", *common, *types, "--aux-attn-count-sink")
    plain, _ = _run(tmp_path, "p", *common, *types)
    assert sink["args"]["aux_attn_count_sink"] is True
    assert plain["args"]["aux_attn_count_sink"] is False
    assert all(math.isfinite(s["aux_attn"]) for s in sink["steps"])
    assert [s["aux_attn"] for s in sink["steps"]] != [s["aux_attn"] for s in plain["steps"]]
    query, _ = _run(tmp_path, "q", *common, *types, "--aux-attn-count-sink", "--aux-query", "1")
    assert query["args"]["aux_query"] == 1.0 and "aux_query" not in sink["steps"][0]
    assert all(math.isfinite(s["aux_query"]) and s["aux_query"] > 0 for s in query["steps"])


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
    # scripts/grounded_pipeline.sh ships such a directory: it holds every file the script needs
    script = (ROOT / "scripts" / "grounded_pipeline.sh").read_text()
    (needed,) = re.findall(r"^for f in (.+); do$", script, flags=re.M)
    assert "train_log.json" in needed.split()
    for name in needed.split():
        assert (out / name).is_file(), name


def test_tiny_run_with_llm_aux(tmp_path):
    log, out = _run(
        tmp_path, "x", "--steps", "2", "--val-per-size", "1", "--eval-every", "1",
        "--test-per-size", "0", "--aux-pos", "1", "--aux-attn", "0.5", "--aux-attn-layer", "2",
    )  # fmt: skip
    assert {"aux_pos", "aux_attn"} <= set(log["steps"][0]) and log["best"]["step"] in (1, 2)
    assert "eager" not in (out / "model" / "config.json").read_text()
    model, _ = M.load_model_dir(out / "model")
    assert model.config.text_config.hidden_size == 32


def test_main_records_its_command(tmp_path):
    out = tmp_path / "m"
    argv = ["--out", str(out), *TINY, "--steps", "1", "--val-per-size", "0", "--test-per-size"]
    assert T.main([*argv, "0"]) == 0
    saved = json.loads((out / loop.LOG_FILE).read_text())
    assert saved["command"].startswith("python3 -m benchmarks.grounded.train --out ")
    assert saved["command"].endswith("--test-per-size 0")


def test_schedules():
    assert loop.curriculum_scale(0, 100, 3.0, 0.5) == 3.0
    assert loop.curriculum_scale(25, 100, 3.0, 0.5) == pytest.approx(2.0)
    assert loop.curriculum_scale(50, 100, 3.0, 0.5) == loop.curriculum_scale(99, 100, 3.0, 0.5)
    assert loop.curriculum_scale(99, 100, 3.0, 0.5) == 1.0
    assert loop.curriculum_scale(5, 100, 3.0, 0.0) == 1.0
    assert loop.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert loop.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert loop.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert loop.warm_probability(0, 100, 0.5) == 1.0
    assert loop.warm_probability(25, 100, 0.5) == pytest.approx(0.5)
    assert loop.warm_probability(60, 100, 0.5) == loop.warm_probability(3, 100, 0.0) == 0.0


TINY_CONFIG = dict(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48)


def test_training_logits_equal_standard_forward():
    processor = M.build_processor()
    tiny = M.build_model(M.build_config(**TINY_CONFIG, num_heads=4), seed=1)
    batch, _, _ = training_batch(processor, step=5, seed=2, n_images=2, n_questions=3)
    with torch.no_grad():
        got = loop.training_logits(tiny, batch)
    grid = batch["image_grid_thw"]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(1).cumsum(0)])
    for s in range(batch["input_ids"].shape[0]):  # sequence s holds image s
        n = int(batch["attention_mask"][s].sum())
        with torch.no_grad():
            want = tiny(
                input_ids=batch["input_ids"][s : s + 1, :n],
                mm_token_type_ids=batch["mm_token_type_ids"][s : s + 1, :n],
                pixel_values=batch["pixel_values"][starts[s] : starts[s + 1]],
                image_grid_thw=grid[s : s + 1],
            ).logits
        torch.testing.assert_close(got[s, :n], want[0], rtol=1e-5, atol=1e-5)
    # the loss sees exactly the answer and <|im_end|> positions; it backpropagates to the tower
    loss = answer_loss(loop.training_logits(tiny, batch), batch["labels"])
    loss.backward()
    assert tiny.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_probe_loss_reaches_the_vision_tower():
    model = M.build_model(M.build_config(**TINY_CONFIG), seed=3)
    batch, _, qtypes = training_batch(M.build_processor(), 2, 0, 2, 2, sizes=[(64, 96)])
    n_tok = int((batch["image_grid_thw"].prod(1) // 4).sum())
    assert batch["token_shape"].shape == (n_tok,)
    logits, aux, llm = loop.training_forward(model, batch, shape_probe(32))
    assert torch.equal(logits, loop.training_logits(model, batch)) and llm == {}
    assert aux is not None and torch.isfinite(aux) and aux > 0
    aux.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    ce = answer_token_losses(logits, batch["labels"])
    assert len(ce) == len(qtypes) and all(c > 0 for c in ce)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--aux-pos", "-1"], "--aux-pos and --aux-attn must be >= 0"),
        (["--aux-pos-layer", "5"], "--aux-pos-layer must be in [1, --layers (4)]"),
        (["--aux-attn-layer", "4"], "--aux-attn-layer must be a decoder layer index (-4 .. 3)"),
        (["--aux-attn-head", "4"], "--aux-attn-head must be in [0, --heads (4))"),
        (["--aux-attn-early-layer", "4"], "--aux-attn-early-layer must be a decoder layer"),
        (["--aux-attn-early-types", "extreme,x"], "--aux-attn-early-types must be of"),
        (["--aux-attn-early-types", "extreme,x,y"], "(or ''), got x,y"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--aug-prob", "2"], "--aug-prob must be"),
        (["--sizes", "100x64"], "--sizes must be"),
        (["--val-per-size", "-1"], "--val-per-size must be >= 0"),
        (["--start-scale", "9"], "--start-scale must be"),
        (["--warm", "1.5"], "--warm must be"),
        (["--stop-after", "0"], "--stop-after must be >= 1"),
        (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
        (["--fine-probe", "--aux-weight", "0"], "--fine-probe needs the shape probe"),
        (["--aux-attn-count-sink", "--aux-attn", "0"], "--aux-attn-count-sink needs"),
        (["--aux-attn-count-head", "1"], "--aux-attn-count-head needs --aux-attn-count-sink"),
        (["--aux-query", "-1"], "--aux-query must be >= 0"),
        (["--aux-query", "1", "--aux-attn", "0"], "--aux-query needs the answer attention hooks"),
        (["--aux-attn-count-sink", "--aux-attn-count-head", "4"], "--aux-attn-count-head must"),
        (["--warm-sizes", "64x64,abc"], "--warm-sizes must be HEIGHTxWIDTH"),
        (["--warm-sizes", "64x70"], "--warm-sizes must be"),
        (["--question-types", "count_small,x"], "--question-types must be distinct types of"),
        (["--question-types", "extreme,extreme"], "--question-types must be distinct types of"),
        (["--question-types", ""], "--question-types must be distinct types of"),
        (["--layers", "0"], "--layers must be >= 1"),
    ],
)
def test_bad_options(extra, match, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", *extra])
    assert match in capsys.readouterr().err


def test_mrope_follows_the_head_dim():
    """The shipped interleaved sections at head dim 32; build_config's split elsewhere."""
    assert T.parse_args(["--out", "x"]).mrope == list(T.SHIPPED_MROPE)
    assert sum(T.SHIPPED_MROPE) == 128 // 4 // 2
    assert T.parse_args(["--out", "x", "--heads", "2", "--kv-heads", "2"]).mrope is None


def test_early_attention_options():
    """The shipped defaults; '' puts every type at --aux-attn-layer."""
    args = T.parse_args(["--out", "x"])
    assert args.aux_attn_early_layer == 1
    assert args.aux_attn_early_types == list(T.SHIPPED_EARLY_TYPES)
    assert T.parse_args(["--out", "x", "--aux-attn-early-types", ""]).aux_attn_early_types == []


def test_deeper_model_with_opt_in_types(tmp_path):
    """--layers sets the depth and the early auxiliary layers follow it; --question-types
    trains and evaluates on the named types (opt-in ones included)."""
    types = "count_small,read_glyph,extreme"
    log, out = _run(
        tmp_path, "d", "--steps", "2", "--layers", "6", "--question-types", types,
        "--aux-attn-early-types", "extreme,read_glyph", "--eval-every", "1",
        "--val-per-size", "1", "--test-per-size", "1",
    )  # fmt: skip
    assert log["args"]["aux_pos_layer"] == log["args"]["aux_attn_early_layer"] == 2
    assert log["args"]["types"] == types.split(",")
    assert {"aux_pos", "aux_attn"} <= set(log["steps"][0])
    assert set(log["steps"][-1]["answer_ce"]) <= set(types.split(","))
    assert set(log["test"]["by_type"]) == set(types.split(",")) and log["test"]["n"] == 13
    model, _ = M.load_model_dir(out / "model")
    assert model.config.text_config.num_hidden_layers == 6


def test_depth_relative_defaults():
    assert [T.quarter_depth(n) for n in (1, 2, 4, 6, 12, 14, 28)] == [1, 1, 1, 2, 3, 4, 7]
    args = T.parse_args(["--out", "x", "--layers", "14"])
    assert args.aux_pos_layer == args.aux_attn_early_layer == 4 and args.aux_attn_layer == -1
    assert T.parse_args(["--out", "x"]).types == list(T.QUESTION_TYPES)
    one = T.parse_args(["--out", "x", "--layers", "1"])
    assert (one.aux_pos_layer, one.aux_attn_early_layer) == (1, 0)
    assert T.parse_args(["--out", "x", "--layers", "14", "--aux-pos-layer", "1"]).aux_pos_layer == 1


def test_depth_pilot_step_seconds():
    from benchmarks.grounded.depth_pilot import step_seconds

    log = {"steps": [{"step": i + 1, "wall_s": w} for i, w in enumerate([5.0, 6.0, 8.0, 9.0])]}
    assert step_seconds(log) == pytest.approx(4.0 / 3)
    with pytest.raises(ValueError, match="every step"):
        step_seconds({"steps": [{"step": 2, "wall_s": 1.0}, {"step": 4, "wall_s": 2.0}]})
    with pytest.raises(ValueError, match="at least two"):
        step_seconds({"steps": [{"step": 1, "wall_s": 1.0}]})
