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


def mapper_params(
    channels, kernel_size: int, gen: torch.Generator, groups: int = 1, grid: bool = False
) -> list[torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = MapperConfig(
        channels=channels, kernel_size=kernel_size, attention_channels=groups, grid=grid
    )
    return [p.detach() for p in TokenMapper(config).op_params()]


def inputs(lengths: list[int], index_dtype: torch.dtype, gen: torch.Generator, groups: int = 1):
    """attn [Tv] (``groups`` 1) or [Tv, groups] per-head-like signals, and the offsets."""
    cu = torch.tensor([0, *lengths]).cumsum(0).to(index_dtype)
    shape = (int(cu[-1]),) if groups == 1 else (int(cu[-1]), groups)
    attn = torch.rand(shape, generator=gen) ** 3 / max(1, int(cu[-1]))
    attn[torch.rand(attn.shape, generator=gen) < 0.1] = 0.0  # exact zeros, as attention has
    return attn, cu


def mapped(
    backend_name: str, device: str, attn, cu, params, kernel_size: int, grid=None
) -> torch.Tensor:
    with backend.use_backend(backend_name):
        got = tp.mapper_forward(
            attn.to(device),
            cu.to(device),
            [p.to(device) for p in params],
            kernel_size,
            grid=None if grid is None else grid.to(device),
        )
    assert got.dtype == torch.float32 and got.shape == attn.shape[:1]
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


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize(("groups", "grid"), [(2, False), (1, True), (3, True), (5, False)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_multi_channel_input_matches_reference(
    backend_name, device, groups, grid, index_dtype, gen
):
    """Mapper v2's input: per-head-group attention [Tv, G] and the grid [Tv, 2], contiguous and
    as non-contiguous views (a transposed attn, strided grid columns)."""
    params = mapper_params((4, 8, 5), 5, gen, groups, grid)
    for lengths in LENGTHS:
        attn, cu = inputs(lengths, index_dtype, gen, groups)
        pos = torch.rand(attn.shape[0], 2, generator=gen) if grid else None
        want = mapper_forward_ref(attn, cu, params, 5, 1e-4, pos)
        got = mapped(backend_name, device, attn, cu, params, 5, pos)
        torch.testing.assert_close(got, want, **tolerance(device))
        attn_t = attn.t().contiguous().t() if groups > 1 else strided(attn)
        pos_s = None if pos is None else strided(pos)
        got = mapped(backend_name, device, attn_t, strided(cu), map(strided, params), 5, pos_s)
        torch.testing.assert_close(got, want, **tolerance(device))


def test_multi_channel_reference_is_per_sample(gen):
    """Each sample of a packed multi-channel batch is scored as if alone, and the padded
    TokenMapper.forward agrees with the packed reference."""
    config = MapperConfig(channels=(4, 6), attention_channels=2, grid=True)
    model = TokenMapper(config)
    attn, cu = inputs([5, 1, 0, 12], torch.int64, gen, 2)
    pos = torch.rand(attn.shape[0], 2, generator=gen)
    packed = model.forward_packed(attn, cu, pos).detach()
    bounds = cu.tolist()
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        alone = model.forward_packed(attn[lo:hi], torch.tensor([0, hi - lo]), pos[lo:hi])
        torch.testing.assert_close(packed[lo:hi], alone.detach(), rtol=1e-5, atol=1e-6)
        padded = torch.full((1, hi - lo + 3, 2), float("nan"))
        padded[0, : hi - lo] = attn[lo:hi]
        grid = torch.full((1, hi - lo + 3, 2), float("nan"))
        grid[0, : hi - lo] = pos[lo:hi]
        got = model(padded, torch.tensor([hi - lo]), grid).detach()[0, : hi - lo]
        torch.testing.assert_close(got, packed[lo:hi], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda a, g: (a[:, :1], g), ValueError, "params\\[0\\]"),  # 1 + 2 channels, mapper has 4
        (lambda a, g: (a, None), ValueError, "params\\[0\\]"),  # grid missing
        (lambda a, g: (a, g[:, :1]), ValueError, "grid must be \\[total_v, 2\\]"),
        (lambda a, g: (a, g.double()), TypeError, "grid must be float32"),
        (lambda a, g: (a, g.masked_fill(g > 0.5, float("inf"))), ValueError, "grid must be finite"),
        (lambda a, g: (-a, g), ValueError, "attn must be >= 0"),
    ],
)
def test_multi_channel_errors(make, error, match, gen):
    params = mapper_params((4,), 5, gen, 2, True)
    attn, cu = inputs([6, 3], torch.int64, gen, 2)
    attn = attn + 0.01
    pos = torch.rand(attn.shape[0], 2, generator=gen)
    a, g = make(attn, pos)
    with pytest.raises(error, match=match):
        tp.mapper_forward(a, cu, params, 5, grid=g)
