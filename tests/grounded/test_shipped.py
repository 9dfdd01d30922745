"""The shipped grounded-VQA model and mapper (tokenprune_kernels/grounded/assets): they load,
match their training log, answer the README's demo scene right with and without pruning, and the
committed evaluation results name them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import demo as D
from tokenprune_kernels.grounded.model import ASSETS_DIR, MODEL_DIR, load_grounded_model
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import load_mapper

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_grounded_model()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_assets_are_small_and_match_the_training_log(shipped):
    model, _ = shipped
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 16 * 2**20
    log = json.loads((ASSETS_DIR / "train_log.json").read_text())
    assert log["parameters"] == sum(p.numel() for p in model.parameters())
    text = log["config"]["text_config"]
    assert text["hidden_size"] == model.config.text_config.hidden_size
    assert text["num_hidden_layers"] == model.config.text_config.num_hidden_layers >= 4
    # the recipe's command: its module before it left the package, or its place beside it
    recipe = ("python -m tokenprune_kernels.grounded.train", "python3 -m benchmarks.grounded.train")
    assert log["command"].startswith(recipe)
    assert log["test"]["accuracy"] > 0.5  # far above chance (about 0.27)


def test_demo_scene_answered_right_with_and_without_pruning(shipped):
    model, processor = shipped
    mapper = load_mapper(ASSETS_DIR / "mapper.safetensors")
    sample = make_sample(
        "test", D.DEFAULT_INDEX, D.DEFAULT_SEED, D.DEFAULT_SIZE, D.DEFAULT_QUESTION_TYPE
    )
    out = D.run_demo(model, processor, sample, mapper=mapper, repeats=1)
    assert out["correct_full"] and out["correct_pruned"], out
    assert out["harness_match"]
    assert out["visual_tokens_after"] < out["visual_tokens_before"]


@pytest.mark.parametrize("name", ["grounded_eval", "grounded_eval_large"])
def test_committed_results_name_the_shipped_assets(name):
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    header = saved["header"]
    assert header["model_sha256"] == _sha256(MODEL_DIR / "model.safetensors")
    assert header["mapper_sha256"] == _sha256(ASSETS_DIR / "mapper.safetensors")
    assert (RESULTS / f"{name}.md").is_file() and (RESULTS / f"{name}.png").is_file()


def test_retraining_reproduces_the_shipped_log(tmp_path):
    """The shipped recipe's first 25 steps, rerun: the same losses as assets/train_log.json (to
    the bit where torch and the CPU (model and vector ISA) are the ones that trained it; close
    elsewhere). The recipe's defaults are the logged arguments, and the options removed since
    were at the values the recipe now fixes. On an AVX512 machine of the logged CPU model,
    ``ATEN_CPU_CAPABILITY=avx2`` makes torch use the logged ISA (see docs/grounded_training.md)."""
    from benchmarks.grounded import loop
    from benchmarks.grounded import train as T
    from tokenprune_kernels.grounded.scenes import QUESTION_TYPES

    shipped_log = json.loads((ASSETS_DIR / "train_log.json").read_text())
    logged = shipped_log["args"]
    argv = ["--out", str(tmp_path / "run"), "--stop-after", "25"]
    argv += ["--val-per-size", "0", "--test-per-size", "0", "--threads", "1"]
    args = T.parse_args(argv)
    run_only = {"out", "stop_after", "val_per_size", "test_per_size"}
    # options added after the shipped run; their defaults are its from-scratch start and its
    # shape-only probe
    added = T.OPTIONS_SINCE_SHIPPED
    assert all(vars(args)[k] == v for k, v in added.items())
    assert set(vars(args)) - run_only - set(added) <= set(logged)
    for key, value in vars(args).items():
        if key not in run_only and key not in added:
            assert value == logged[key], key  # defaults = the shipped recipe
    assert args.types == list(QUESTION_TYPES)  # --question-types (logged as types)
    removed = {
        "single_turn": False,  # one multi-turn sequence per scene
        "aux_words": False,  # the shape probe is linear
        "aux_centre": False,
        "aux_attn_split": False,
        "aux_attn_left": True,  # left_of supervises its pair's left object
        "max_minutes": None,
    }
    assert set(logged) == (set(vars(args)) - set(added)) | run_only | set(removed)
    for key, value in removed.items():
        assert logged[key] == value, key
    log = loop.train(args, "test")
    got, want = log["steps"][0], shipped_log["steps"][0]
    assert got["step"] == want["step"] == 25 and got["size"] == want["size"]
    here = loop.versions()
    same_stack = all(shipped_log["versions"].get(k) == here[k] for k in ("torch", "cpu"))
    if same_stack:
        assert got["loss"] == want["loss"] and got["aux"] == want["aux"]
    else:
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
