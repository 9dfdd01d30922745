"""Stage c: keep counts, deterministic top-k; the reference against a naive sort, every backend
against the reference (identical indices)."""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.reference import keep_counts_ref, score_keys_ref, select_topk_ref
from tokenprune_kernels.testing import backend_params, strided

BACKENDS = backend_params("select_topk")

SIZES = [1, 2, 3, 5, 31, 127, 4099]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def naive_topk(scores: torch.Tensor, cu: list[int], counts: list[int]) -> list[int]:
    """Python's sort on (nan last, -score, index): the contract's order, written independently."""
    values = scores.float().tolist()
    kept = []
    for b in range(len(cu) - 1):
        idx = list(range(cu[b], cu[b + 1]))
        idx.sort(
            key=lambda i: (
                math.isnan(values[i]),
                -values[i] if not math.isnan(values[i]) else 0.0,
                i,
            )
        )
        kept.extend(sorted(idx[: counts[b]]))
    return kept


def planted_scores(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Few distinct values (many ties), plus NaN, +-inf and -0.0/+0.0 planted at random places."""
    s = torch.randint(-3, 4, (n,), generator=gen).float() / 2
    if n >= 8:
        pick = torch.randperm(n, generator=gen)
        s[pick[0]] = float("nan")
        s[pick[1]] = float("inf")
        s[pick[2]] = float("-inf")
        s[pick[3]] = -0.0
        s[pick[4]] = 0.0
        s[pick[5]] = float("nan")
    return s.to(dtype)


def ragged(sizes: list[int], dtype: torch.dtype, gen: torch.Generator, planted: bool):
    parts = [
        planted_scores(n, dtype, gen) if planted else torch.randn(n, generator=gen).to(dtype)
        for n in sizes
    ]
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(sizes), 0)
    return torch.cat(parts), cu


def test_keep_counts_rounding():
    cu = torch.tensor([0, 1, 3, 6, 10, 4109, 4109])  # n = 1, 2, 3, 4, 4099, 0
    assert keep_counts_ref(cu, keep_ratio=0.5).tolist() == [1, 1, 2, 2, 2050, 0]
    assert keep_counts_ref(cu, keep_ratio=0.25).tolist() == [1, 1, 1, 1, 1025, 0]
    assert keep_counts_ref(cu, keep_ratio=1.0).tolist() == [1, 2, 3, 4, 4099, 0]
    assert keep_counts_ref(cu, keep_ratio=1e-9).tolist() == [1, 1, 1, 1, 1, 0]
    # 0.3 * 10 is 3.0000000000000004 in float64: round half up, not ceil, keeps it at 3.
    assert keep_counts_ref(torch.tensor([0, 10]), keep_ratio=0.3).tolist() == [3]
    assert keep_counts_ref(cu, keep_count=1).tolist() == [1, 1, 1, 1, 1, 0]


def test_score_keys_order():
    values = [float("nan"), float("-inf"), -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, float("inf")]
    keys = score_keys_ref(torch.tensor(values)).tolist()
    assert keys[0] == 0
    assert keys[4] == keys[5]  # -0.0 and +0.0 tie
    distinct = keys[:4] + keys[5:]
    assert distinct == sorted(distinct) and len(set(distinct)) == len(distinct)
    assert all(0 <= k < 2**32 for k in keys)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("planted", [False, True], ids=["random", "ties_nan_inf"])
def test_reference_matches_naive(n, planted, gen):
    scores, cu = ragged([n], torch.float32, gen, planted)
    for ratio in (1.0, 0.5, 0.25):
        counts = keep_counts_ref(cu, keep_ratio=ratio)
        kept, cu_kept = select_topk_ref(scores, cu, counts)
        assert kept.tolist() == naive_topk(scores, cu.tolist(), counts.tolist())
        assert cu_kept.tolist() == [0, int(counts.sum())]


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_ties_break_to_lower_index_and_nan_ranks_last(backend_name, device):
    s = torch.tensor([1.0, float("nan"), 2.0, 1.0, float("-inf"), 1.0, -0.0, 0.0], device=device)
    cu = torch.tensor([0, 8], device=device)

    def pick(k: int) -> list[int]:
        with backend.use_backend(backend_name):
            return tp.select_topk(s, cu, keep_count=k)[0].tolist()

    assert pick(1) == [2]
    assert pick(3) == [0, 2, 3]  # ties 0, 3, 5: lowest indices first
    assert pick(5) == [0, 2, 3, 5, 6]  # -0.0 and 0.0 tie: index 6 first
    assert pick(7) == [0, 2, 3, 4, 5, 6, 7]  # -inf above NaN
    assert pick(8) == list(range(8))


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planted", [False, True], ids=["random", "ties_nan_inf"])
def test_backends_match_reference(backend_name, device, dtype, planted, gen):
    """The stage's parity test: identical indices and offsets on every backend."""
    sizes = [1, 0, 2, 37, 4099, 3, 257]
    scores, cu = ragged(sizes, dtype, gen, planted)
    for index_dtype in (torch.int64, torch.int32):
        cu_i = cu.to(index_dtype)
        for kw in (
            {"keep_ratio": 0.5},
            {"keep_ratio": 0.25},
            {"keep_ratio": 1.0},
            {"keep_count": 1},
        ):
            want = select_topk_ref(scores, cu_i, keep_counts_ref(cu_i, **kw))
            with backend.use_backend(backend_name):
                got = tp.select_topk(scores.to(device), cu_i.to(device), **kw)
            assert torch.equal(got[0].cpu(), want[0]), (backend_name, kw)
            assert got[1].dtype == index_dtype and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_kept_are_ascending_and_best(backend_name, device, gen):
    scores, cu = ragged([1000, 333], torch.float32, gen, planted=False)
    with backend.use_backend(backend_name):
        kept, cu_kept = tp.select_topk(scores.to(device), cu.to(device), keep_ratio=0.25)
    kept, cu_kept = kept.cpu(), cu_kept.cpu()
    assert torch.all(kept[1:] > kept[:-1])
    for b in range(2):
        lo, hi = int(cu[b]), int(cu[b + 1])
        mine = kept[int(cu_kept[b]) : int(cu_kept[b + 1])]
        assert torch.all((mine >= lo) & (mine < hi))
        rest = torch.ones(hi - lo, dtype=torch.bool)
        rest[mine - lo] = False
        assert scores[mine].min() >= scores[lo:hi][rest].max()


@pytest.mark.parametrize("keep", [{"keep_ratio": r} for r in (0.5, 0.25, 0.3, 1.0, 1e-9)]
                         + [{"keep_count": 1}, {"keep_count": 3}])  # fmt: skip
def test_host_keep_total_equals_device_rule(keep, gen):
    """The host-side total that sizes the Triton outputs is the sum of the per-sample rule."""
    n = torch.randint(0, 40, (9,), generator=gen)
    n[2], n[5] = 0, 6  # an empty sample; 6 * 0.25 = 1.5 rounds half up
    if "keep_count" in keep:
        n = torch.where(n == 0, n, n.clamp(min=keep["keep_count"]))
    cu = torch.zeros(10, dtype=torch.int64)
    cu[1:] = torch.cumsum(n, 0)
    want = int(reference.keep_counts_ref(cu, **keep).sum())
    assert reference.keep_total_host(cu.tolist(), **keep) == want


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_strided_inputs(backend_name, device, gen):
    """Non-contiguous scores and offsets select what the reference selects."""

    def select(scores, cu, **keep):
        with backend.use_backend(backend_name):
            kept, cu_kept = tp.select_topk(scores.to(device), cu.to(device), **keep)
        return kept.cpu(), cu_kept.cpu()

    scores = torch.tensor([0.0, 9.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0])  # [::2]: [0, 1, 2, 3]
    assert select(scores[::2], torch.tensor([0, 4]), keep_count=1)[0].tolist() == [3]
    cu = torch.tensor([0, 9, 3, 9, 7])  # [::2]: [0, 3, 7]
    kept, cu_kept = select(torch.arange(7.0), cu[::2], keep_count=2)
    assert kept.tolist() == [1, 2, 5, 6] and cu_kept.tolist() == [0, 2, 4]
    expanded = torch.tensor([2.0]).expand(5)  # stride 0: five equal scores
    assert select(expanded, torch.tensor([0, 5]), keep_count=2)[0].tolist() == [0, 1]
    for dtype in DTYPES:
        scores, cu = ragged([1, 0, 37, 3, 130], dtype, gen, planted=True)
        for index_dtype in (torch.int64, torch.int32):
            cu_i = cu.to(index_dtype)
            want = select_topk_ref(scores, cu_i, keep_counts_ref(cu_i, keep_ratio=0.3))
            got = select(strided(scores), strided(cu_i), keep_ratio=0.3)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------- the adaptive rule (keep_mass)

MASS_BACKENDS = backend_params("mass_keep_counts")
RELEVANCES = ["softmax", "normalize"]


def naive_mass_counts(scores, cu, keep_mass, lo_ratio, hi_ratio, relevance):
    """The rule in float64 with Python's sort, written independently of the fixed-point weights:
    relevance = softmax(scores) or scores / sum, summed in the contract's order."""
    values = scores.float().tolist()
    counts = []
    for b in range(len(cu) - 1):
        xs = values[cu[b] : cu[b + 1]]
        n = len(xs)
        if n == 0:
            counts.append(0)
            continue
        finite = [x for x in xs if not math.isnan(x)]
        mx = max(finite) if finite else -math.inf
        if relevance == "softmax":
            w = [0.0 if math.isnan(x) or x == -math.inf else math.exp(x - mx) for x in xs]
        else:
            w = [0.0 if math.isnan(x) else x for x in xs]
        order = sorted(
            range(n), key=lambda i: (math.isnan(xs[i]), 0.0 if math.isnan(xs[i]) else -xs[i], i)
        )
        total, acc, m = sum(w), 0.0, 0
        while m < n and acc < keep_mass * total:
            acc += w[order[m]]
            m += 1
        lo = min(max(math.floor(lo_ratio * n + 0.5), 1), n)
        hi = min(max(math.floor(hi_ratio * n + 0.5), 1), n)
        counts.append(min(max(m, lo), hi))
    return counts


def masses(x: torch.Tensor) -> torch.Tensor:
    """Scores usable with relevance='normalize': finite, >= 0 (NaN kept)."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x).abs()


def mass_counts_ref(scores, cu, keep_mass, lo=0.0, hi=1.0, relevance="softmax"):
    rule = v.KeepRule(keep_mass=keep_mass, min_keep_ratio=lo, max_keep_ratio=hi)
    return reference.keep_rule_counts_ref(scores, cu, rule, relevance)


@pytest.mark.parametrize("relevance", RELEVANCES)
@pytest.mark.parametrize("n", SIZES)
def test_mass_reference_matches_float64(relevance, n, gen):
    """On random scores the fixed-point weights give the counts a float64 softmax gives."""
    scores = torch.randn(n, generator=gen) * 3
    if relevance == "normalize":
        scores = scores.exp()
    cu = torch.tensor([0, n])
    for keep_mass in (0.05, 0.3, 0.5, 0.9, 0.99):
        for lo, hi in ((0.0, 1.0), (0.1, 0.5)):
            got = mass_counts_ref(scores, cu, keep_mass, lo, hi, relevance).tolist()
            assert got == naive_mass_counts(scores, [0, n], keep_mass, lo, hi, relevance)


def test_mass_rule_exact_cases():
    """Ties and exact thresholds: integer weights make 'reaches' exact (>=, not >)."""
    cu = torch.tensor([0, 4])
    four = torch.full((4,), 2.5)
    for t, m in ((0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)):
        assert mass_counts_ref(four, cu, t).tolist() == [m]
        assert mass_counts_ref(four, cu, t, relevance="normalize").tolist() == [m]
    two = torch.tensor([1.0, 3.0])  # masses 1/4 and 3/4
    assert mass_counts_ref(two, torch.tensor([0, 2]), 0.75, relevance="normalize").tolist() == [1]
    assert mass_counts_ref(two, torch.tensor([0, 2]), 0.76, relevance="normalize").tolist() == [2]
    # bounds: at least max(1, rhu(lo * n)), at most max(1, rhu(hi * n)); empty samples keep 0
    cu = torch.tensor([0, 10, 10, 13])
    scores = torch.tensor([9.0] + [0.0] * 9 + [5.0, 0.0, 0.0])
    assert mass_counts_ref(scores, cu, 0.5).tolist() == [1, 0, 1]
    assert mass_counts_ref(scores, cu, 0.5, lo=0.25).tolist() == [3, 0, 1]  # rhu(2.5) = 3
    assert mass_counts_ref(scores, cu, 1.0, hi=0.04).tolist() == [1, 0, 1]  # at least one
    assert mass_counts_ref(scores, cu, 1.0, hi=0.5).tolist() == [5, 0, 2]
    # NaN weighs nothing and ranks last; an all-NaN or all-zero sample keeps its minimum
    nan = float("nan")
    s = torch.tensor([nan, 1.0, 1.0, nan, nan, 0.0, 0.0])
    cu = torch.tensor([0, 3, 5, 7])
    assert mass_counts_ref(s, cu, 1.0).tolist() == [2, 1, 2]
    assert mass_counts_ref(s, cu, 1.0, relevance="normalize").tolist() == [2, 1, 1]
    # +inf logits take all the mass; -inf none
    inf = float("inf")
    s = torch.tensor([inf, 1.0, inf, -inf, 2.0])
    assert mass_counts_ref(s, torch.tensor([0, 5]), 1.0).tolist() == [2]
    assert mass_counts_ref(s[3:], torch.tensor([0, 2]), 1.0).tolist() == [1]


@pytest.mark.parametrize(("backend_name", "device"), MASS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relevance", RELEVANCES)
@pytest.mark.parametrize("planted", [False, True], ids=["random", "ties_nan_inf"])
def test_mass_counts_backends_match_reference(backend_name, device, dtype, relevance, planted,
                                              gen):  # fmt: skip
    """The stage's parity test: identical counts on every backend (ragged, empty samples)."""
    sizes = [1, 0, 2, 37, 4099, 3, 257, 0]
    scores, cu = ragged(sizes, dtype, gen, planted)
    scores = scores * 4 if relevance == "softmax" else masses(scores)
    for index_dtype in (torch.int64, torch.int32):
        cu_i = cu.to(index_dtype)
        for keep_mass, lo, hi in ((0.5, 0.0, 1.0), (0.9, 0.1, 0.6), (1.0, 0.0, 1.0),
                                  (0.01, 0.3, 0.3)):  # fmt: skip
            want = mass_counts_ref(scores, cu_i, keep_mass, lo, hi, relevance)
            with backend.use_backend(backend_name):
                got = tp.mass_keep_counts(scores.to(device), cu_i.to(device), keep_mass, lo, hi,
                                          relevance)  # fmt: skip
            assert got.dtype == torch.int64 and got.device.type == device
            assert torch.equal(got.cpu(), want), (backend_name, keep_mass, lo, hi)


@pytest.mark.parametrize(("backend_name", "device"), MASS_BACKENDS)
def test_mass_counts_strided(backend_name, device, gen):
    for relevance in RELEVANCES:
        for dtype in DTYPES:
            scores, cu = ragged([1, 0, 37, 3, 131], dtype, gen, planted=True)
            scores = scores if relevance == "softmax" else masses(scores)
            for index_dtype in (torch.int64, torch.int32):
                cu_i = cu.to(index_dtype)
                want = mass_counts_ref(scores, cu_i, 0.7, 0.05, 0.9, relevance)
                with backend.use_backend(backend_name):
                    got = tp.mass_keep_counts(strided(scores.to(device)),
                                              strided(cu_i.to(device)), 0.7, 0.05, 0.9,
                                              relevance)  # fmt: skip
                assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planted", [False, True], ids=["random", "ties_nan_inf"])
def test_select_keep_mass_matches_reference(backend_name, device, dtype, planted, gen):
    """select_topk(keep_mass=...): the reference's counts, then its indices, on every backend
    (Triton: the counts as torch ops on the device, then its own selection)."""
    sizes = [1, 0, 2, 37, 1031, 3, 257]
    scores, cu = ragged(sizes, dtype, gen, planted)
    for relevance in RELEVANCES:
        s = scores * 3 if relevance == "softmax" else masses(scores)
        for keep_mass, lo, hi in ((0.5, 0.0, 1.0), (0.95, 0.05, 0.5)):
            counts = mass_counts_ref(s, cu, keep_mass, lo, hi, relevance)
            want = select_topk_ref(s, cu, counts)
            with backend.use_backend(backend_name):
                got = tp.select_topk(s.to(device), strided(cu.to(device)), keep_mass=keep_mass,
                                     min_keep_ratio=lo, max_keep_ratio=hi, relevance=relevance)  # fmt: skip
            assert torch.equal(got[0].cpu(), want[0]), (backend_name, relevance, keep_mass)
            assert torch.equal(got[1].cpu(), want[1])
