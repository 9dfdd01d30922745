"""Every Triton kernel the op table uses has lowering cases, and they lower for Hopper (sm_90)
without a GPU."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tokenprune_kernels.triton import lowering


def test_every_kernel_has_cases_named_after_its_module():
    """Each ``*_kernel`` of each module the table names is lowered; every case's signature is its
    kernel's arguments, in order."""
    for module in lowering.modules():
        mod = importlib.import_module(f"tokenprune_kernels.triton.{module}")
        kernels = {v for n, v in vars(mod).items() if n.endswith("_kernel")}
        cases = lowering.CASES[module]()
        assert kernels and {c.kernel for c in cases} == kernels, module
        for c in cases:
            assert c.name.startswith(f"{module}.")
            assert list(c.signature) == c.kernel.arg_names
            assert {n for n, t in c.signature.items() if t == "constexpr"} == set(c.constexprs)


def test_mapper_cases_name_the_host_constants():
    from tokenprune_kernels.triton import mapper

    default = lowering.mapper_cases()[0]
    assert default.constexprs["BLOCK_M"] == mapper.BLOCK_M
    assert default.constexprs["BLOCK_N"] == mapper.BLOCK_N
    assert default.constexprs["DOT_PRECISION"] == mapper.DOT_PRECISION
    assert default.options["num_warps"] == mapper.NUM_WARPS


def test_case_checks_the_kernels_arguments():
    from tokenprune_kernels.triton import gather

    kernel = gather._merge_maps_kernel
    with pytest.raises(ValueError, match=r"give the type of pointer argument 'cu_ptr'"):
        lowering.case("x", kernel, {}, {"BLOCK": 8}, {})
    with pytest.raises(ValueError, match=r"\['not_an_arg'\] are not arguments"):
        lowering.case("x", kernel, {"not_an_arg": "i32"}, {"BLOCK": 8}, {})


def test_every_kernel_lowers_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_kernels.triton.lowering", "--capability", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == len(lowering.all_cases()), proc.stdout + proc.stderr
    for module in lowering.modules():
        assert any(f" {module}." in line for line in lines), f"no {module} kernel lowered"
