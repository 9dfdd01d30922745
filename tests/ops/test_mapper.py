"""Stage b: the mapper op on every backend against the reference."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.mapper.functional import mapper_forward_ref
from tokenprune_kernels.testing import strided


def every_backend(op: str) -> list[str]:
    """The backends that run ``op`` on CPU tensors here (Triton: the interpreter)."""
    return [b for b in ("ref", "cpp", "triton") if backend.implemented(op, b, "cpu")]


@pytest.mark.parametrize("backend_name", every_backend("mapper_forward"))
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs(backend_name, index_dtype, gen):
    """attn, the offsets and every parameter as non-contiguous views."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    params = [p.detach() for p in TokenMapper(MapperConfig(channels=(4, 8, 5))).op_params()]
    cu = torch.tensor([0, 3, 3, 20, 21], dtype=index_dtype)
    attn = torch.rand(21, generator=gen) / 8
    want = mapper_forward_ref(attn, cu, params, 5, 1e-4)
    with backend.use_backend(backend_name):
        got = tp.mapper_forward(strided(attn), strided(cu), [strided(p) for p in params])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
