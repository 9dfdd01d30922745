"""Fixtures of the multi-process tests: the tiny LLaVA of the explain tests
(``tokenprune_kernels.testing_models.explain``); the launchers are in ``_launch.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The tiny random LLaVA of the explain tests, saved with its processor."""
    from tokenprune_kernels.testing_models.explain import save_llava_dir

    return save_llava_dir(tmp_path_factory.mktemp("llava_model"))
