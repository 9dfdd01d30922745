"""Fixtures shared by the mapper tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from tokenprune_kernels.mapper import MapperConfig, TokenMapper

TINY_CHANNELS = (3, 4, 5)


def _make_mapper(
    channels: Sequence[int] = TINY_CHANNELS, kernel_size: int = 5, seed: int = 0
) -> TokenMapper:
    """A mapper whose every parameter (biases and LayerNorm affine included) is random, so a test
    cannot pass because some term happens to be 0 or 1."""
    torch.manual_seed(seed)
    model = TokenMapper(MapperConfig(channels=tuple(channels), kernel_size=kernel_size))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=gen))
    return model


@pytest.fixture
def make_mapper() -> Callable[..., TokenMapper]:
    """Factory: ``make_mapper(channels=(3, 4, 5), kernel_size=5, seed=0) -> TokenMapper``."""
    return _make_mapper


def random_attention(lengths: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Packed ``[sum(lengths)]`` float32 attention-like values: positive, each sample summing to
    about 0.5, with a few peaks."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        a = torch.rand(n, generator=gen) ** 4 + 1e-6
        parts.append((0.5 * a / a.sum()).to(torch.float32) if n else a)
    return torch.cat(parts) if parts else torch.zeros(0)


@pytest.fixture
def make_attention() -> Callable[..., torch.Tensor]:
    """Factory: ``make_attention(lengths, seed=0) -> [sum(lengths)] float32``."""
    return random_attention
