"""Interval estimates and paired tests for accuracies measured on one fixed test set.

Every method scores the SAME questions, so two methods are compared on their per-question
outcomes: the exact McNemar test on the discordant pairs and a paired bootstrap interval of
the accuracy difference (both resample or count questions, never methods separately).
"""

from __future__ import annotations

import math

import torch


def _as_bool(x: torch.Tensor | list[bool], name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of outcomes, got {list(t.shape)}"
        )
    return t.to(torch.bool)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (95% for the default
    ``z``). Returns ``(low, high)`` in ``[0, 1]``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got {successes}, {n}")
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the boundaries
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under the null each of the ``b + c`` discordant pairs
    (``b``: only the first method right, ``c``: only the second) is a fair coin, so
    ``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])`` (1.0 when there is no discordant
    pair). Exact integer arithmetic, no normal approximation."""
    if b < 0 or c < 0:
        raise ValueError(f"b and c must be counts >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def discordant(
    first: torch.Tensor | list[bool], second: torch.Tensor | list[bool]
) -> tuple[int, int]:
    """``(b, c)``: questions only ``first`` answers right, and only ``second``."""
    a, o = _as_bool(first, "first"), _as_bool(second, "second")
    if a.shape != o.shape:
        raise ValueError(f"first and second must score the same questions: {a.shape} vs {o.shape}")
    return int((a & ~o).sum()), int((~a & o).sum())


def resample_index(n: int, n_boot: int = 2000, seed: int = 0) -> torch.Tensor:
    """``[n_boot, n]`` int64 bootstrap draws of question indices (with replacement; one fixed
    generator so every comparison of a run uses the same draws)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"n and n_boot must be >= 1, got {n}, {n_boot}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def _percentiles(x: torch.Tensor, level: float) -> tuple[float, float]:
    lo, hi = torch.quantile(x.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2]).double())
    return float(lo), float(hi)


def paired_difference_interval(
    first: torch.Tensor | list[bool],
    second: torch.Tensor | list[bool],
    index: torch.Tensor,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``acc(first) - acc(second)`` over the paired bootstrap draws
    ``index`` (:func:`resample_index`): each draw resamples questions, both methods together."""
    a, o = _as_bool(first, "first"), _as_bool(second, "second")
    if a.shape != o.shape or index.shape[-1] != a.numel():
        raise ValueError("first, second and index must cover the same questions")
    d = a.double()[index].mean(1) - o.double()[index].mean(1)
    return _percentiles(d, level)


def paired_ratio_interval(
    first: torch.Tensor | list[bool],
    reference: torch.Tensor | list[bool],
    index: torch.Tensor,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of ``acc(first) / acc(reference)`` over the paired bootstrap draws
    (draws where the reference scores 0 are dropped; None when all are)."""
    a, r = _as_bool(first, "first"), _as_bool(reference, "reference")
    if a.shape != r.shape or index.shape[-1] != a.numel():
        raise ValueError("first, reference and index must cover the same questions")
    num, den = a.double()[index].mean(1), r.double()[index].mean(1)
    ok = den > 0
    if not bool(ok.any()):
        return None
    return _percentiles(num[ok] / den[ok], level)


__all__ = [
    "discordant",
    "mcnemar_exact",
    "paired_difference_interval",
    "paired_ratio_interval",
    "resample_index",
    "wilson_interval",
]
