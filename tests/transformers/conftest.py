"""Shared fixtures of the transformers-integration tests (tiny random models built in-process;
nothing is downloaded). The model builders and oracles live in
``tokenprune_kernels.testing_models`` (``qwen``, ``llava``)."""

from __future__ import annotations

import pytest
import transformers

from tokenprune_kernels.transformers import revert_tokenprune

transformers.logging.set_verbosity_error()


@pytest.fixture
def make_qwen():
    """Factory ``make_qwen(model_type, attn="sdpa", seed=0)`` -> a tiny random Qwen VL model
    (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``), fp32, eval mode, reverted after the test."""
    from tokenprune_kernels.testing_models.qwen import make_model

    made = []

    def factory(model_type: str, attn: str = "sdpa", seed: int = 0):
        model = make_model(model_type, attn=attn, seed=seed)
        made.append(model)
        return model

    yield factory
    for model in made:
        revert_tokenprune(model)
