"""Every Triton kernel the op table uses is lowered for Hopper (sm_90) without a GPU, as the
specialisations its host code really launches, with no register spills."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tokenprune_kernels.triton import lowering

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """This process's environment without the interpreter, importing this checkout's package."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def cases() -> list[lowering.LoweringCase]:
    return lowering.all_cases()


def test_every_kernel_has_cases_named_after_its_module(cases):
    """Each ``*_kernel`` of each module the table names is launched by its scenarios; every
    case's signature is its kernel's arguments, in order, and every dtype is lowered."""
    for module in lowering.modules():
        mod = importlib.import_module(f"tokenprune_kernels.triton.{module}")
        kernels = {getattr(v, "fn", v) for n, v in vars(mod).items() if n.endswith("_kernel")}
        mine = [c for c in cases if c.name.startswith(f"{module}.")]
        assert kernels and {c.spec.kernel.fn for c in mine} == kernels, module
        for c in mine:
            assert list(c.spec.signature) == c.spec.kernel.arg_names
    for name in ("_row_stats_kernel", "_visual_colsum_kernel", "_select_kernel",
                 "_copy_rows_kernel"):  # fmt: skip
        types = {t for c in cases if c.spec.name == name for t in c.spec.signature.values()}
        assert {"*fp32", "*fp16", "*bf16"} <= types, name


def test_cases_carry_the_launch_specialisation(cases):
    """Pointers of the (aligned) scenario tensors and integers divisible by 16 get the
    ``tt.divisibility`` hint a launch gets; the token-count integers never do (they are not
    specialised, so they cannot multiply the compilations)."""
    by_kernel: dict[str, list] = {}
    for c in cases:
        by_kernel.setdefault(c.spec.name, []).append(c.spec)
    for name, specs in by_kernel.items():
        for spec in specs:
            pointers = [a for a, t in spec.signature.items() if str(t).startswith("*")]
            assert set(pointers) <= set(spec.hinted()), (name, spec.hinted())
    colsum = by_kernel["_visual_colsum_kernel"][0]
    assert {"strides[0]", "strides[2]", "strides[3]"} <= set(colsum.hinted())
    mapper = by_kernel["_mapper_forward_kernel"][0]
    assert mapper.signature["total"] == "i32" and "total" not in mapper.hinted()
    assert {"act_stride16", "dw_stride16"} <= set(mapper.hinted())
    from tokenprune_kernels.triton import mapper as mp

    names = list(mapper.signature)
    constexprs = {names[path[0]]: v for path, v in mapper.constexprs.items()}
    assert constexprs["BLOCK_M"] == mp.BLOCK_M and constexprs["BLOCK_N"] == mp.BLOCK_N
    assert constexprs["DOT_PRECISION"] == mp.DOT_PRECISION
    assert mapper.options["num_warps"] == mp.NUM_WARPS
    assert "slice_len" in by_kernel["_radix_pass_kernel"][0].hinted()
    assert by_kernel["_row_stats_kernel"][0].options["num_stages"] == 3


def test_an_unaligned_view_loses_its_hint():
    """The hints come from the launch arguments, not from a table: a score view one element
    into its storage is launched (and so lowered) without the pointer hint."""
    import torch

    from tokenprune_kernels.triton.launch import capture, specialisation
    from tokenprune_kernels.triton.select import select_topk_triton

    cu = torch.tensor([0, 40], dtype=torch.int32)
    keep = torch.tensor([5])
    for offset, hinted in ((0, True), (1, False)):
        scores = torch.empty(48)[offset : offset + 40]
        with capture() as launches:
            select_topk_triton(scores, cu, keep, total_kept=5)
        (spec,) = [specialisation(r) for r in launches]
        assert ("scores_ptr" in spec.hinted()) is hinted


def test_committed_table_lists_every_case(cases):
    """benchmarks/results/kernel_resources.md has a row for every case lowered here."""
    table = (ROOT / "benchmarks" / "results" / "kernel_resources.md").read_text()
    missing = [c.name for c in cases if f"| `{c.name}` |" not in table]
    assert not missing, (
        f"kernel_resources.md lacks {missing}: regenerate it with "
        "python3 benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.md"
    )


def _run_lowering() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenprune_kernels.triton.lowering", "--capability", "90"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=1200,
    )


def test_every_kernel_lowers_for_sm90_without_spills(cases):
    proc = _run_lowering()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == len(cases), proc.stdout + proc.stderr
    for line in lines:
        match = re.search(r": (\d+) registers, spill (\d+)/(\d+) B", line)
        assert match and int(match.group(1)) <= 255, line
        assert match.group(2) == match.group(3) == "0", line
    for module in lowering.modules():
        assert any(f" {module}." in line for line in lines), f"no {module} kernel lowered"


SPILLER = """
import torch
import triton
import triton.language as tl

from tokenprune_kernels.triton import lowering
from tokenprune_kernels.triton.launch import Launch, specialisation


@triton.jit
def _spill_kernel(x_ptr, N: tl.constexpr):
    # one warp holding a 128 x 128 fp32 tile: 512 values per thread, more than 255 registers
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs[:, None] * N + offs[None, :])
    y = tl.sum(tl.exp(x) * x, 0) + tl.sum(tl.sqrt(x) * x, 1)
    tl.store(x_ptr + offs, y)


record = Launch(_spill_kernel, (1,), (torch.empty(128 * 128),), {"N": 128, "num_warps": 1})
case = lowering.LoweringCase("spill", specialisation(record))
info = lowering.lower(case)
print("SPILL", info["spill_stores"], info["spill_loads"])
"""


def test_the_spill_report_sees_spills(tmp_path):
    """The ptxas report the check relies on does show spills when a kernel has them."""
    script = tmp_path / "spiller.py"
    script.write_text(textwrap.dedent(SPILLER))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stores, loads = (int(x) for x in proc.stdout.split("SPILL")[1].split())
    assert stores > 0 and loads > 0, proc.stdout
