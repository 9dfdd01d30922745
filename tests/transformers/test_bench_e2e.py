"""Smoke test of benchmarks/bench_e2e.py (one repeat, tiny configs), so that it cannot rot.

Nothing is timed against a threshold: the test checks that every case runs and is reported.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is importable from the repository root (pytest's pythonpath)
    return importlib.import_module("benchmarks.bench_e2e")


def test_tiny_cpu_run_reports_every_case(bench, tmp_path):
    out = tmp_path / "e2e.md"
    families = ["qwen2_vl", "llava_onevision", "llava"]
    argv = ["--device", "cpu", "--config", "tiny", "--repeats", "1", "--warmup", "0"]
    argv += ["--visual-tokens", "40", "--threads", "1", "--out", str(out)]
    for family in families:
        argv += ["--family", family]
    threads = torch.get_num_threads()
    try:
        report = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == report
    assert "transformers" in report and "git commit" in report and "--visual-tokens 40" in report
    rows = [line for line in report.splitlines() if re.match(r"\| (qwen2_vl|llava)", line)]
    assert len(rows) == len(families) * 2 * 3  # (e2e, cached vision) x (unpatched, 50%, 25%)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        family, mode, keep, seq_len, visual, ttft, speedup, prune_ms, pct = cells
        assert family in families and mode in ("e2e", "cached vision")
        assert int(visual) > 0 and int(seq_len) > int(visual)
        assert float(ttft) > 0 and speedup.endswith("x")
        if keep == "unpatched":
            assert speedup == "1.00x" and prune_ms == "" and pct == ""
        else:
            assert keep in ("50%", "25%") and float(prune_ms) > 0 and float(pct) > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--visual-tokens", "2"], "--visual-tokens must be >= 4"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--family", "gpt2"], "invalid choice"),
    ],
)
def test_bad_arguments(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
