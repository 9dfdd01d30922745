"""Fixtures of the compiled-kernel tests: the extension module, loaded or skipped."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def _required() -> bool:
    return os.environ.get("TOKENPRUNE_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def compiled_ext() -> ModuleType:
    """``tokenprune_kernels._C``; skips when it is not built, fails under TOKENPRUNE_REQUIRE_EXT=1."""
    try:
        return importlib.import_module("tokenprune_kernels._C")
    except ImportError as exc:
        if _required():
            pytest.fail(f"TOKENPRUNE_REQUIRE_EXT is set but tokenprune_kernels._C failed: {exc}")
        pytest.skip(f"tokenprune_kernels._C is not built: {exc}")
