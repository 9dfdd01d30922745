"""Paired statistics of the grounded eval against exact values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tokenprune_kernels.grounded import stats as S


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (10, 0, 2 / 1024),  # all ten discordant pairs one way: 2 * (1/2)^10
        (0, 1, 1.0),
        (3, 8, 2 * (1 + 11 + 55 + 165) / 2048),  # 2 * P[Bin(11, 1/2) <= 3] = 0.2265625
        (5, 5, 1.0),  # the doubled tail exceeds 1
        (1, 6, 2 * (1 + 7) / 128),  # 0.125
    ],
)
def test_mcnemar_exact_small_tables(b, c, p):
    assert S.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert S.mcnemar_exact(c, b) == S.mcnemar_exact(b, c)


def test_mcnemar_exact_large_counts_match_log_gamma_sum():
    b, c = 61, 30
    n = b + c
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        - n * math.log(2)) for i in range(c + 1))  # fmt: skip
    assert S.mcnemar_exact(b, c) == pytest.approx(2 * tail, rel=1e-9)
    assert S.mcnemar_exact(b, c) < 0.01
    with pytest.raises(ValueError, match="counts"):
        S.mcnemar_exact(-1, 2)


def test_discordant_counts_a_hand_made_table():
    # both right 3, only first 4, only second 1, both wrong 2
    first = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    second = [1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    assert S.discordant(first, second) == (4, 1)
    assert S.mcnemar_exact(*S.discordant(first, second)) == pytest.approx(2 * 6 / 32)
    with pytest.raises(ValueError, match="same questions"):
        S.discordant(first, second[:-1])


def test_wilson_interval_textbook_values():
    lo, hi = S.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = S.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert S.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    with pytest.raises(ValueError, match="successes"):
        S.wilson_interval(11, 10)


def test_paired_bootstrap_intervals():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g) < 0.8
    b = a.clone()
    b[:40] = ~b[:40]  # 40 questions flip
    idx = S.resample_index(400, 500, seed=1)
    assert torch.equal(idx, S.resample_index(400, 500, seed=1))
    assert S.paired_difference_interval(a, a, idx) == (0.0, 0.0)
    assert S.paired_ratio_interval(a, a, idx) == (1.0, 1.0)
    diff = float(a.double().mean() - b.double().mean())
    lo, hi = S.paired_difference_interval(a, b, idx)
    assert lo <= diff <= hi and hi - lo < 0.1
    # the paired interval is narrower than the one from resampling the methods independently
    idx2 = S.resample_index(400, 500, seed=2)
    unpaired = a.double()[idx].mean(1) - b.double()[idx2].mean(1)
    assert hi - lo < float(unpaired.quantile(0.975) - unpaired.quantile(0.025))
    assert S.paired_ratio_interval(a, torch.zeros(400, dtype=torch.bool), idx) is None
    with pytest.raises(ValueError, match="same questions"):
        S.paired_difference_interval(a, b, idx[:, :10])
