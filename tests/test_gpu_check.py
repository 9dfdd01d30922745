"""scripts/gpu_check.sh in its --dry-run mode (every step's CPU form), and the parity harness it
runs (benchmarks/parity.py) on the CPU, so that neither rots before a GPU machine runs them."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("env", "build", "tests_cuda", "tests_triton", "parity", "bench", "e2e", "ncu")


def _parity():
    # benchmarks/ is importable from the repository root (pytest's pythonpath)
    return importlib.import_module("benchmarks.parity")


def test_usage_error():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=1800
    )
    summary = (out / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-4000:] + result.stderr[-2000:]
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary
        assert (out / f"{step}.log").is_file()
    assert "(dry run, no GPU)" in summary
    assert "GPU command:" in (out / "build.log").read_text()
    assert "compiles for sm_90" in (out / "build.log").read_text()
    assert "tests collected" in (out / "tests_cuda.log").read_text()
    assert "failed: 0" in (out / "parity.md").read_text()
    assert (out / "parity.json").is_file()
    assert (out / "bench_kernels.md").read_text().startswith("# SMOKE RUN")
    assert "'config': '7b'" in (out / "e2e.log").read_text()


def test_parity_harness_on_cpu(tmp_path):
    parity = _parity()
    out = tmp_path / "parity.md"
    assert (
        parity.main(["--device", "cpu", "--smoke", "--dtypes", "float32", "--out", str(out)]) == 0
    )
    text = out.read_text()
    for stage in ("attention", "attention_heads", "mapper", "select", "merge", "prune_and_merge"):
        assert f"| {stage} | ragged | float32 | ref |" in text
    assert "FAIL" not in text


def test_parity_harness_flags_a_wrong_selection(tmp_path, monkeypatch):
    """A backend whose selection differs from the reference's fails its rows and the run."""
    import tokenprune_kernels

    real = tokenprune_kernels.select_topk

    def shifted(*args, **kwargs):
        kept, cu = real(*args, **kwargs)
        return torch.roll(kept, 1), cu

    monkeypatch.setattr(tokenprune_kernels, "select_topk", shifted)
    parity = _parity()
    out = tmp_path / "parity.md"
    assert (
        parity.main(["--device", "cpu", "--smoke", "--dtypes", "float32", "--out", str(out)]) == 1
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| select |")]
    assert rows and all("| NO | FAIL |" in line for line in rows)


def test_parity_errors_ignore_matching_nans():
    parity = _parity()
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert parity._errors(a, a.clone()) == (0.0, 0.0)
    max_abs, max_rel = parity._errors(a, torch.tensor([1.0, float("nan"), 2.0]))
    assert max_abs == 1.0 and max_rel == 0.5
