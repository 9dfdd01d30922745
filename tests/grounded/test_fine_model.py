"""benchmarks/grounded/models/grounded4_fine: the 4-layer model fine-tuned on the opt-in types.
It reads the small glyph where the shipped model cannot (the same fixed validation questions),
and its files are the ones benchmarks/results/grounded_fine_eval.md evaluated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded.methods import answer_token, prepare, pruned_logits
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import load_mapper

ROOT = Path(__file__).resolve().parents[2]
FINE = ROOT / "benchmarks" / "grounded" / "models" / "grounded4_fine"


def _correct(model_dir: Path, qtype: str, n: int = 20) -> int:
    """Unpruned answers right of validation questions 0 .. n-1 of ``qtype`` at 224 x 224."""
    model, proc = M.load_model_dir(model_dir)
    model.eval()
    ok = 0
    for i in range(n):
        s = make_sample("val", i, 0, (224, 224), qtype)
        inputs = M.build_inputs(proc, [s.image], [s.question.text])
        with torch.no_grad():
            tok = answer_token(pruned_logits(model, prepare(model, inputs)))
        ok += tok == M.TOKEN_ID[s.question.answer]
    return ok


def test_fine_model_reads_the_glyph_the_shipped_model_cannot():
    # measured when committed: 20 / 20 and 0 / 20 (chance 2 / 20)
    assert _correct(FINE / "model", "read_glyph") >= 17
    assert _correct(Path(M.MODEL_DIR), "read_glyph") <= 5


def test_committed_fine_model_files():
    log = json.loads((FINE / "train_log.json").read_text())
    args = log["args"]
    assert args["fine_probe"] is True and args["steps"] == 1800 and args["layers"] == 4
    assert set(args["types"]) == {
        "colour_of_shape", "shape_of_colour", "count_colour", "left_of", "extreme",
        "count_small", "read_glyph",
    }  # fmt: skip
    assert log["test"]["by_type"]["read_glyph"]["accuracy"] > 0.5
    mapper = load_mapper(FINE / "mapper_narrow.safetensors")
    assert mapper.config.channels == (8, 16, 32, 64)
    header = json.loads((ROOT / "benchmarks/results/grounded_fine_eval.json").read_text())["header"]
    for key, f in (("model_sha256", FINE / "model" / "model.safetensors"),
                   ("mapper_sha256", FINE / "mapper_narrow.safetensors")):  # fmt: skip
        assert header[key] == hashlib.sha256(f.read_bytes()).hexdigest(), key
