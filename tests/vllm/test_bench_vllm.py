"""benchmarks/bench_vllm.py's report (no server): percentiles and the table, so that it cannot rot.
The serving run itself needs vLLM and minutes per server; it is not run by the tests."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is importable from the repository root (pytest's pythonpath)
    return importlib.import_module("benchmarks.bench_vllm")


def test_percentile(bench):
    assert bench.percentile([3.0], 90) == 3.0
    assert bench.percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_table_and_plot(bench, tmp_path):
    args = bench.parse_args(["--requests", "1:2,4:4", "--out", str(tmp_path / "r.md")])
    assert args.concurrency_levels() == [1, 4]
    settings = [bench.Setting("unpruned", None), bench.Setting("keep 0.25", 0.25)]
    cells = {}
    for s, scale in zip(settings, (1.0, 0.25), strict=True):
        for c, n in args.plan:
            cells[(s.name, c)] = bench.Cell(
                s.name, c, [scale * (i + 1) for i in range(n)], n * scale
            )
    meta = dict(device="cpu", versions="vllm x", commit="abc", command="cmd", lm_params=68e6,
                prompt_tokens=797)  # fmt: skip
    md = bench.to_markdown(cells, settings, args, meta)
    rows = [
        line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")
    ]
    assert len(rows) == 4
    assert "| 1 | keep 0.25 | 2 | 0.375 |" in md and "| 4.00x lower | 4.00x |" in md
    pytest.importorskip("matplotlib")  # not in the vLLM venv
    bench.plot(cells, settings, args, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
