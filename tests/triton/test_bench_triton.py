"""benchmarks/bench_triton.py still runs end to end (tiny shapes, interpreter, nothing timed)."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.interpret


def _load():
    # benchmarks/ is importable from the repository root (pytest's pythonpath)
    return importlib.import_module("benchmarks.bench_triton")


def test_smoke_run_writes_a_table(tmp_path):
    out = tmp_path / "smoke.md"
    bench = _load()
    assert bench.main(["--smoke", "--impls", "triton", "eager", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# SMOKE RUN")
    for stage in bench.STAGES:
        assert f"| {stage} | 23 |" in text
    assert "| triton |" in text and "| eager |" in text


def test_floor_bytes_count_the_merge_output():
    bench = _load()
    import torch

    from tokenprune_kernels.testing import make_inputs

    s = make_inputs([[("t", 4), ("v", 10), ("q", 2)]], hidden=8, position_rows=3)
    nbytes, flops = bench.stage_traffic("merge", s, [], 5, kept=5)
    n_out = 4 + 5 + 2
    assert nbytes == 2 * n_out * 8 * 4 + 2 * n_out * 3 * 8 + n_out * 8 + 10 * 8 + 5 * 8
    assert flops == 0
    assert torch.is_tensor(s.q)
