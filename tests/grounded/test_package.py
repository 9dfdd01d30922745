"""What the installed package holds of the grounded benchmark: everything ``tokenprune eval`` and
``tokenprune demo`` need (modules, shipped model and mapper), and not the training recipe
(benchmarks/grounded/, beside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contents_hold_eval_and_demo_not_the_recipe(tmp_path):
    """``setup.py build_py`` (what a wheel's Python part is built from; the C++ extension
    skipped) into a temporary directory."""
    lib, eggs = tmp_path / "lib", tmp_path / "egg"
    eggs.mkdir()
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(eggs)]
    cmd += ["build_py", "--build-lib", str(lib)]
    env = {**os.environ, "TOKENPRUNE_SKIP_EXT": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    files = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    assert {f.split("/")[0] for f in files} == {"tokenprune_kernels"}
    grounded = {f.removeprefix("tokenprune_kernels/grounded/") for f in files if "/grounded/" in f}
    for name in (
        "scenes.py",
        "model.py",
        "methods.py",
        "evaluate.py",
        "flops.py",
        "stats.py",
        "demo.py",
    ):
        assert name in grounded, name
    for name in ("model/model.safetensors", "model/config.json", "mapper.safetensors"):
        assert f"assets/{name}" in grounded, name
    assert "train.py" not in grounded
    assert not any("benchmarks" in f for f in files)
    for f in files:  # nothing installed imports the recipe
        if f.endswith(".py"):
            text = (lib / f).read_text(encoding="utf-8")
            assert "import benchmarks" not in text and "from benchmarks" not in text, f
