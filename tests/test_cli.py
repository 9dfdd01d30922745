"""The ``tokenprune`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune_kernels.cli import main
from tokenprune_kernels.ops.schemas import PUBLIC_SCHEMAS


def test_env_lists_versions_and_backend_per_op(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "torch",
        "compiled extension",
        "backend per op on cpu",
        "backend per op on cuda",
    ):
        assert needle in out
    for op in PUBLIC_SCHEMAS:
        assert op in out


def test_bench_quick_writes_table(tmp_path, capsys):
    out_file = tmp_path / "bench.md"
    assert main(["bench", "--quick", "--out", str(out_file)]) == 0
    text = out_file.read_text()
    for needle in (
        "- device:",
        "- torch:",
        "- commit:",
        "- command: `tokenprune bench --quick",
        "| op |",
    ):
        assert needle in text
    for op in (
        "instruction_attention",
        "instruction_attention_heads",
        "mapper_forward",
        "mass_keep_counts",
        "select_topk",
        "spread_select",
        "gather_kept",
        "merge_kept",
        "prune_and_merge",
    ):
        assert f"| {op} | 1024 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| ref |" in line]
    assert all("1.00x" in row for row in rows)
    # CPU roofline columns: a GEMM time where the stage has FLOPs, a copy time everywhere.
    assert "| fp32 GEMM ms (same FLOPs) | copy ms (same bytes) | x roofline |" in text
    for line in text.splitlines():
        if line.startswith("| ") and "| 1024 |" in line:
            op, *_, gemm, copy, roof = (c.strip() for c in line.strip("| ").split("|"))
            has_flops = op in (
                "instruction_attention",
                "instruction_attention_heads",
                "mapper_forward",
                "prune_and_merge",
            )
            assert (gemm != "-") == has_flops and float(copy) > 0 and float(roof) > 0, line


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_kernels", "env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend per op on cpu" in proc.stdout


def test_bench_refuses_missing_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_every_subcommand_is_wired():
    from tokenprune_kernels.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == {"env", "bench", "explain", "train-mapper", "eval", "demo"}


def test_train_mapper_through_the_top_level_command_reports_a_missing_dir(tmp_path, capsys):
    from tokenprune_kernels.cli import main

    code = main(["train-mapper", "--labels", str(tmp_path / "nope"), "--out", "m.safetensors"])
    assert code != 0
    assert "nope" in capsys.readouterr().err


def test_git_commit_names_the_checkout(monkeypatch):
    """git_commit: the short HEAD of this checkout (marked where tracked files differ), and
    "unknown" where git cannot run."""
    from tokenprune_kernels import bench

    root = Path(bench.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        pytest.skip("no git")
    got = bench.git_commit()
    if head.returncode != 0:
        assert got == "unknown"
    else:
        assert got in (head.stdout.strip(), head.stdout.strip() + " (with uncommitted changes)")
        assert bench.environment("cpu")["commit"] == got

    def no_git(*args, **kwargs):
        raise OSError("git not found")

    monkeypatch.setattr(bench.subprocess, "run", no_git)
    assert bench.git_commit() == "unknown"
