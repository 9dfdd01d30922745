"""Triton tests: on the GPU when there is one, else in the interpreter (small shapes only)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> str:
    """'cuda' on a GPU machine, else 'cpu' (the tests' root conftest set TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
