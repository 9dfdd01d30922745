"""Fixtures of the explain tests: tiny random models built in-process (nothing is downloaded).

The model builders of ``tests/transformers`` (``_qwen_models.py``, ``_llava_configs.py``) are
reused: their folder is put on ``sys.path`` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

_TRANSFORMERS_TESTS = str(Path(__file__).resolve().parent.parent / "transformers")
if _TRANSFORMERS_TESTS not in sys.path:
    sys.path.insert(0, _TRANSFORMERS_TESTS)

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """A local directory holding a tiny random LLaVA and its processor (tokenizer trained on
    nothing: a fixed word-level vocabulary; CLIP image processor; a chat template)."""
    from _explain_helpers import save_llava_dir

    return save_llava_dir(tmp_path_factory.mktemp("llava_model"))
