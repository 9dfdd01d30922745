"""Fixtures of the explain tests: tiny random models built in-process (nothing is downloaded),
with the builders of ``tokenprune_kernels.testing_models`` (``explain``: the model directory with
its processor, media, data sets and the independent relevance computation).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """A local directory holding a tiny random LLaVA and its processor (tokenizer trained on
    nothing: a fixed word-level vocabulary; CLIP image processor; a chat template)."""
    from tokenprune_kernels.testing_models.explain import save_llava_dir

    return save_llava_dir(tmp_path_factory.mktemp("llava_model"))
