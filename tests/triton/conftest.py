"""Triton tests: on the GPU when there is one, else in the interpreter (small shapes only)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> str:
    """'cuda' on a GPU machine, else 'cpu' (the tests' root conftest set TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the module allocates starts as garbage, so an unwritten entry shows."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    from tokenprune_kernels.triton import select as sel

    monkeypatch.setattr(sel, "_alloc", alloc)  # gather.py allocates through it too
