"""The training script on a tiny model: a few steps end to end (model directory, log), the same
seed gives the same weights, the curriculum and learning-rate schedules, option errors."""

from __future__ import annotations

import json

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
    "--log-every", "1", "--threads", "1",
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


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--types", "colour"], "--types must be"),
        (["--aug-prob", "2"], "--aug-prob must be"),
        (["--sizes", "100x64"], "--sizes must be"),
        (["--val-per-size", "-1"], "--val-per-size must be >= 0"),
        (["--start-scale", "9"], "--start-scale must be"),
    ],
)
def test_bad_options(extra, match, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", *extra])
    assert match in capsys.readouterr().err
