"""Shared fixtures and the markers' skip rules (decided at collection, never at import)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    triton = importlib.util.find_spec("triton") is not None
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "interpret" in item.keywords and not triton:
            item.add_marker(pytest.mark.skip(reason="needs triton"))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test (fresh inputs per test, reproducible per test id)."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)
