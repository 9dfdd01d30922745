"""benchmarks/bench_cpu_targets.py runs end to end (one round at N_v = 1024) and writes its table."""

from __future__ import annotations

import pytest

from benchmarks import bench_cpu_targets

pytestmark = pytest.mark.usefixtures("compiled_ext")


def test_one_round_writes_the_ratios(tmp_path):
    out = tmp_path / "targets.md"
    assert bench_cpu_targets.main(["--n-visual", "1024", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- load average (1, 5, 15 min) at the start:" in text
    for case in bench_cpu_targets.cases(1024):
        assert f"| 1024 | {case} |" in text
    for a, b in bench_cpu_targets.RATIOS:
        row = next(line for line in text.splitlines() if f"| {a} / {b} |" in line)
        assert float(row.split("|")[3]) > 0
