"""Stage b: the mapper op on every backend of the op table against the reference."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.mapper.functional import mapper_forward_ref
from tokenprune_kernels.testing import backend_params, strided

BACKENDS = backend_params("mapper_forward")
# Ragged batches with empty samples and samples shorter than the kernel's halo.
LENGTHS = [[3, 0, 17, 1], [1], [40, 2, 0, 9]]


def tolerance(device: str) -> dict[str, float]:
    """CPU: exact float32 products (the interpreter too), only the summation order differs. GPU:
    Triton's pointwise convolutions run as tf32x3 dots."""
    return {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 5e-4, "atol": 5e-4}


def mapper_params(channels, kernel_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TokenMapper(MapperConfig(channels=channels, kernel_size=kernel_size))
    return [p.detach() for p in model.op_params()]


def inputs(lengths: list[int], index_dtype: torch.dtype, gen: torch.Generator):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(index_dtype)
    attn = torch.rand(int(cu[-1]), generator=gen) ** 3 / max(1, int(cu[-1]))
    attn[torch.rand(attn.shape, generator=gen) < 0.1] = 0.0  # exact zeros, as attention has
    return attn, cu


def mapped(backend_name: str, device: str, attn, cu, params, kernel_size: int) -> torch.Tensor:
    with backend.use_backend(backend_name):
        got = tp.mapper_forward(
            attn.to(device), cu.to(device), [p.to(device) for p in params], kernel_size
        )
    assert got.dtype == torch.float32 and got.shape == attn.shape
    return got.cpu()


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize(("channels", "kernel_size"), [((4, 8, 5), 5), ((3,), 3), ((6, 7), 1)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_backends_match_reference(backend_name, device, channels, kernel_size, index_dtype, gen):
    """The stage's parity test: every backend's logits are the reference's."""
    params = mapper_params(channels, kernel_size, gen)
    for lengths in LENGTHS:
        attn, cu = inputs(lengths, index_dtype, gen)
        want = mapper_forward_ref(attn, cu, params, kernel_size, 1e-4)
        got = mapped(backend_name, device, attn, cu, params, kernel_size)
        torch.testing.assert_close(got, want, **tolerance(device))


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs(backend_name, device, index_dtype, gen):
    """attn, the offsets and every parameter as non-contiguous views."""
    params = mapper_params((4, 8, 5), 5, gen)
    attn, cu = inputs([3, 0, 17, 1], index_dtype, gen)
    want = mapper_forward_ref(attn, cu, params, 5, 1e-4)
    got = mapped(backend_name, device, strided(attn), strided(cu), map(strided, params), 5)
    torch.testing.assert_close(got, want, **tolerance(device))
