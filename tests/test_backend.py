"""Backend choice: one place, overridable, says clearly what runs."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import _extension, backend
from tokenprune_kernels.backend import COMPOSITE_OPS, STAGE_OPS
from tokenprune_kernels.ops.schemas import PUBLIC_SCHEMAS


def test_extension_builds_where_required():
    """CI sets TOKENPRUNE_REQUIRE_EXT=1: a broken build must fail the suite, not fall back."""
    if os.environ.get("TOKENPRUNE_REQUIRE_EXT") != "1":
        pytest.skip("TOKENPRUNE_REQUIRE_EXT is not set")
    assert _extension.available(), _extension.load_error()
    for op in backend.kernels("cpp"):
        assert _extension.has_kernel(op, "CPU"), op


def test_describe_covers_every_op_and_stage():
    """Every public op, and the stages another public op runs (spread_select: select_topk's)."""
    assert set(backend.describe("cpu")) == set(STAGE_OPS + COMPOSITE_OPS)
    assert (
        set(PUBLIC_SCHEMAS)
        == set(backend.PUBLIC_OPS)
        == set(STAGE_OPS + COMPOSITE_OPS) - set(backend.RUN_BY)
    )


def test_auto_prefers_compiled_on_cpu():
    """Every stage with a C++ kernel in the op table runs it on CPU (when built), the rest ref."""
    table = backend.describe("cpu")
    for op in STAGE_OPS:
        compiled = "cpp" in backend.OPS[op] and _extension.available()
        assert table[op] == ("cpp" if compiled else "ref"), op
    assert {op for op in STAGE_OPS if "cpp" in backend.OPS[op]} >= {
        "instruction_attention", "mapper_forward", "select_topk", "gather_kept", "merge_kept"
    }  # fmt: skip


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "ref")
    assert set(backend.describe("cpu").values()) == {"ref"}
    assert backend.describe("cuda")["select_topk"] == "ref"


def test_use_backend_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    with backend.use_backend("ref"):
        assert backend.requested() == "ref"
        with backend.use_backend("auto"):
            assert backend.requested() == "auto"
        assert backend.requested() == "ref"
    assert backend.requested() == "auto"


def test_forcing_a_backend_an_op_lacks_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU needs the interpreter
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.choose("select_topk", "cpu") == "ref"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("select_topk", "cpu") == "triton"
    monkeypatch.setenv(backend.ENV_VAR, "cpp")
    lacking = [op for op in STAGE_OPS if "cpp" not in backend.OPS[op]]
    for op in lacking:  # no C++ kernel in the table
        assert backend.choose(op, "cpu") == "ref"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    assert backend.choose("instruction_attention", "cpu") == "ref"  # CUDA kernels: CUDA tensors


def test_triton_is_never_chosen_automatically_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert "triton" not in "".join(backend.describe("cpu").values())


def test_composites_fuse_select_and_merge_when_select_is_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    table = backend.describe("cpu")
    assert table["select_topk"] == "triton"
    assert "select_topk+merge_kept=triton(fused)" in table["prune_and_merge"]
    assert "select_topk+gather_kept=triton(fused)" in table["prune_visual_tokens"]


def test_forcing_compiled_without_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(_extension, "_ext", None)
    monkeypatch.setattr(_extension, "_load_error", "ImportError: simulated")
    monkeypatch.setenv(backend.ENV_VAR, "cpp")
    with pytest.raises(
        RuntimeError, match=r"TOKENPRUNE_BACKEND=cpp needs the compiled extension.*simulated"
    ):
        backend.choose("select_topk", "cpu")


def test_missing_extension_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(_extension, "_ext", None)
    monkeypatch.setattr(_extension, "_load_error", "ImportError: simulated")
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    with caplog.at_level(logging.WARNING, logger="tokenprune_kernels"):
        for _ in range(3):
            kept, _ = tp.select_topk(torch.randn(9), torch.tensor([0, 9]), keep_ratio=0.5)
    messages = [r.getMessage() for r in caplog.records if "reference path" in r.getMessage()]
    assert len(messages) == 1 and "simulated" in messages[0]
    assert kept.numel() == 5


def test_auto_on_cuda_takes_triton_where_no_compiled_kernel(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    table = backend.describe("cuda")
    for op in STAGE_OPS:
        compiled = backend.implemented(op, "cuda", "cuda")
        fallback = "triton" if "triton" in backend.OPS[op] else "ref"  # mass_keep_counts: ref
        assert table[op] == ("cuda" if compiled else fallback), op
    for op, stages in backend.COMPOSITES.items():  # cuda and triton both fuse select + last
        assert f"select_topk+{stages[-1]}={table['select_topk']}(fused)" in table[op], op
