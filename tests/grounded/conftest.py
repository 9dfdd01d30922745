"""Fixtures of the grounded tests: the processor, and the grounded Qwen2-VL with random weights
from the test module's ``MODEL_SEED`` (sdpa ``model``, eager ``eager``), one per module."""

from __future__ import annotations

import pytest

from tokenprune_kernels.grounded.model import build_config, build_model, build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def model(request):
    return build_model(seed=request.module.MODEL_SEED)


@pytest.fixture(scope="module")
def eager(request):
    return build_model(build_config(attn_implementation="eager"), seed=request.module.MODEL_SEED)
