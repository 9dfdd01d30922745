"""Fixtures of the multi-process tests: the tiny LLaVA of ``tests/explain`` (whose helpers are
put on ``sys.path``); the launchers are in ``_launch.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

_ROOT = Path(__file__).resolve().parents[2]
_path = str(_ROOT / "tests" / "explain")
if _path not in sys.path:
    sys.path.insert(0, _path)

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The tiny random LLaVA of the explain tests, saved with its processor."""
    from _explain_helpers import save_llava_dir

    return save_llava_dir(tmp_path_factory.mktemp("llava_model"))
