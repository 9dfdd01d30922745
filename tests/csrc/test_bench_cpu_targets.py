"""benchmarks/bench_cpu_targets.py runs end to end (one round at N_v = 1024) and writes its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("compiled_ext")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu_targets.py"


def test_one_round_writes_the_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_cpu_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "targets.md"
    assert module.main(["--n-visual", "1024", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- load average (1, 5, 15 min) at the start:" in text
    for case in module.cases(1024):
        assert f"| 1024 | {case} |" in text
    for a, b in module.RATIOS:
        row = next(line for line in text.splitlines() if f"| {a} / {b} |" in line)
        assert float(row.split("|")[3]) > 0
