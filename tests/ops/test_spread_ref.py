"""The spread rule's reference (stage c with ``spread``) against a naive pairwise restatement,
and the rule's invariants."""

from __future__ import annotations

import math

import pytest
import torch

from tokenprune_kernels.reference import (
    select_topk_ref,
    spread_select_ref,
    spread_suppressed_ref,
)


def grid_coords(shapes: list[tuple[int, int, int]]) -> torch.Tensor:
    """Raster-order (segment, row, col) of images/frames ``(t, h, w)`` laid one after another;
    segment ids start at an arbitrary offset and skip values (as M-RoPE ids do)."""
    rows = []
    seg0 = 7
    for t, h, w in shapes:
        for f in range(t):
            for r in range(h):
                for c in range(w):
                    rows.append((seg0 + 3 * f, 100 + r, -5 + c))
        seg0 += 3 * t + 11
    return torch.tensor(rows, dtype=torch.int64)


def naive_kept(scores, cu, counts, coords, radius) -> list[int]:
    """Pairwise restatement: visit in (nan last, -score, index) order; accept a token unless an
    accepted one shares its segment within Chebyshev ``radius``; keep accepted first."""
    values = scores.float().tolist()
    cs = coords.tolist()
    kept = []
    for b in range(len(cu) - 1):
        idx = list(range(cu[b], cu[b + 1]))
        idx.sort(
            key=lambda i: (math.isnan(values[i]), 0.0 if math.isnan(values[i]) else -values[i], i)
        )
        acc, sup = [], []
        for i in idx:
            near = any(
                cs[j][0] == cs[i][0]
                and abs(cs[j][1] - cs[i][1]) <= radius
                and abs(cs[j][2] - cs[i][2]) <= radius
                for j in acc
            )
            (sup if near else acc).append(i)
        kept.extend(sorted((acc + sup)[: counts[b]]))
    return kept


SAMPLES = [
    [(1, 1, 1)],
    [(1, 3, 5)],
    [(1, 7, 4), (1, 2, 9)],
    [(3, 5, 6)],
    [(1, 13, 11)],
    [],
]


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spread_ref_matches_naive(radius: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(100 + radius)
    coords = torch.cat(
        [grid_coords(s) for s in SAMPLES if s] + [torch.zeros(0, 3, dtype=torch.int64)]
    )
    lens = [sum(t * h * w for t, h, w in s) for s in SAMPLES]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    tv = cu[-1]
    scores = torch.randn(tv, generator=gen).to(dtype)
    scores[torch.randperm(tv, generator=gen)[:9]] = scores[0].clone()  # ties
    scores[3] = float("nan")
    scores[11] = float("-inf")
    scores[12] = -0.0
    for frac in (0.05, 0.3, 1.0):
        counts = [min(n, max(1, round(frac * n))) if n else 0 for n in lens]
        kept, cu_kept = spread_select_ref(
            scores, torch.tensor(cu), torch.tensor(counts), coords, radius
        )
        assert kept.tolist() == naive_kept(scores, cu, counts, coords, radius)
        assert cu_kept.tolist() == torch.tensor([0, *counts]).cumsum(0).tolist()


def test_spread_radius_zero_is_topk() -> None:
    gen = torch.Generator().manual_seed(5)
    coords = grid_coords([(2, 6, 7)])
    scores = torch.randn(coords.shape[0], generator=gen)
    cu = torch.tensor([0, coords.shape[0]])
    counts = torch.tensor([17])
    assert torch.equal(
        spread_select_ref(scores, cu, counts, coords, 0)[0],
        select_topk_ref(scores, cu, counts)[0],
    )


def test_spread_invariants() -> None:
    """Accepted tokens are pairwise apart; every suppressed token has an accepted neighbour ranked
    above it; segments never suppress each other."""
    gen = torch.Generator().manual_seed(9)
    coords = grid_coords([(2, 9, 8)])
    n = coords.shape[0]
    scores = torch.rand(n, generator=gen)
    sup = spread_suppressed_ref(scores, torch.tensor([0, n]), coords, 1)
    acc = (~sup).nonzero().flatten().tolist()
    c = coords.tolist()

    def near(i: int, j: int) -> bool:
        return c[i][0] == c[j][0] and max(abs(c[i][1] - c[j][1]), abs(c[i][2] - c[j][2])) <= 1

    assert all(not near(i, j) for i in acc for j in acc if i < j)
    for i in sup.nonzero().flatten().tolist():
        assert any(near(i, j) and scores[j] > scores[i] for j in acc)
    # The highest token of each frame is accepted.
    half = n // 2
    assert not sup[int(scores[:half].argmax())] and not sup[half + int(scores[half:].argmax())]
