"""The schemas defined by csrc/torch_bindings.cpp equal the Python table, and every op exists."""

from __future__ import annotations

import pytest
import torch

from tokenprune_kernels import _extension
from tokenprune_kernels.ops.schemas import COMPILED_SCHEMAS, NAMESPACE, PUBLIC_SCHEMAS


@pytest.mark.parametrize("name", sorted(PUBLIC_SCHEMAS))
def test_public_schema(name):
    op = getattr(torch.ops.tokenprune, name).default
    assert str(op._schema) == f"{NAMESPACE}::{PUBLIC_SCHEMAS[name]}"


@pytest.mark.parametrize("name", sorted(COMPILED_SCHEMAS))
def test_compiled_schema(name):
    if not _extension.available():
        pytest.skip(f"compiled extension not built: {_extension.load_error()}")
    op = getattr(torch.ops.tokenprune, name).default
    assert str(op._schema) == f"{NAMESPACE}::{COMPILED_SCHEMAS[name]}"
    assert _extension.has_kernel(name, "CPU")
