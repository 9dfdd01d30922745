"""Shared fixtures and the markers' skip rules (decided at collection, never at import)."""

from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. triton.jit reads this when a kernel
# module is imported, so it is set here, before any test imports one (never on a GPU machine).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    triton = importlib.util.find_spec("triton") is not None
    for item in items:
        # Markers, not item.keywords: keywords also hold the names of the test's directories (a
        # checkout in a folder named "cuda" would skip every test).
        if item.get_closest_marker("cuda") is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("interpret") is not None and not triton:
            item.add_marker(pytest.mark.skip(reason="needs triton"))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test (fresh inputs per test, reproducible per test id)."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across runs (str hash is salted)
    return torch.Generator().manual_seed(seed)
