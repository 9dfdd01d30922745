"""Inputs shared by the Triton kernel tests (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import torch


def planted(n: int, dtype: torch.dtype, gen: torch.Generator, levels: int = 4) -> torch.Tensor:
    """Few distinct values (ties everywhere), negatives, NaN, +-inf, -0.0 and +0.0 planted."""
    s = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / 2).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, float("nan"), -0.0]
    pick = torch.randperm(n, generator=gen)[: min(n, len(specials))]
    for i, p in enumerate(pick.tolist()):
        s[p] = specials[i]
    return s
