"""The compiled kernels of the spread rule (``_spread_select``: C++ on the CPU, CUDA on a GPU)
against the plain-PyTorch reference ``spread_select_ref`` and a naive pairwise restatement
written here. Selections must be identical (same indices). The CUDA cases carry the ``cuda``
marker (skipped without a GPU; scripts/gpu_check.sh runs them)."""

from __future__ import annotations

import math

import kernel_cases as cases
import pytest
import torch

from tokenprune_kernels import backend
from tokenprune_kernels.reference import spread_select_ref

pytestmark = pytest.mark.usefixtures("compiled_ext")

DEVICES = [pytest.param("cpu", id="cpp"), pytest.param("cuda", marks=pytest.mark.cuda)]

LAYOUTS = {
    "n1": [1],
    "n2": [2],
    "n3": [3],
    "n31": [31],
    "n127": [127],
    "n4099": [4099],
    "ragged": [5, 0, 17, 1, 130, 2, 31],
    "zeros": [0, 7, 0],
    "empty": [0],
}


def sample_coords(n: int, g: torch.Generator, sparse: bool) -> list[tuple[int, int, int]]:
    """``n`` strictly increasing (segment, row, col): several raster-order grids of random widths
    and offsets (negative ones too), segment ids with gaps; ``sparse`` drops about half of each
    grid's positions (missing neighbours, ragged rows)."""

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    out: list[tuple[int, int, int]] = []
    seg = rand(-5, 5)
    while len(out) < n:
        piece = min(n - len(out), rand(1, max(1, n // 2)))
        width = rand(1, 13)
        r0, c0 = rand(-40, 40), rand(-40, 40)
        if sparse:
            positions = sorted(torch.randperm(2 * piece, generator=g)[:piece].tolist())
        else:
            positions = list(range(piece))
        out += [(seg, r0 + p // width, c0 + p % width) for p in positions]
        seg += rand(1, 4)
    return out


def make_case(lengths, dtype, kind, g, *, sparse=False, index_dtype=torch.int64):
    """(scores, cu_seqlens_v, coords) of one packed batch."""
    coords = [c for n in lengths for c in sample_coords(n, g, sparse)]
    coords_t = torch.tensor(coords, dtype=torch.int64).reshape(-1, 3).to(index_dtype)
    cu = cases.offsets(lengths, index_dtype)
    scores = cases.make_scores(sum(lengths), dtype, kind, g)
    return scores, cu, coords_t


def naive_kept(scores, cu, counts, coords, radius) -> list[int]:
    """Pairwise restatement with Python ints: visit by (NaN last, score desc, index asc); accept
    unless an accepted token of the same segment is within Chebyshev ``radius``."""
    values = scores.float().tolist()
    xy = coords.tolist()
    bounds = cu.tolist()
    kept: list[int] = []
    for b, k in enumerate(counts.tolist()):
        idx = sorted(
            range(bounds[b], bounds[b + 1]),
            key=lambda i: (1, 0.0, i) if math.isnan(values[i]) else (0, -values[i], i),
        )
        acc: list[int] = []
        sup: list[int] = []
        for i in idx:
            near = any(
                xy[j][0] == xy[i][0]
                and abs(xy[j][1] - xy[i][1]) <= radius
                and abs(xy[j][2] - xy[i][2]) <= radius
                for j in acc
            )
            (sup if near else acc).append(i)
        kept.extend(sorted((acc + sup)[:k]))
    return kept


def spread(device, scores, cu, counts, coords, radius, total="sum"):
    """The private op on ``device`` (total_kept: the host-known sum, or None)."""
    total_kept = int(counts.sum()) if total == "sum" else total
    kept, cu_kept = torch.ops.tokenprune._spread_select(
        scores.to(device), cu.to(device), counts.to(device), coords.to(device), radius, total_kept
    )
    assert kept.device.type == device and cu_kept.device.type == device
    return kept.cpu(), cu_kept.cpu()


def check(device, scores, cu, counts, coords, radius, *, naive=False, total="sum"):
    kept, cu_kept = spread(device, scores, cu, counts, coords, radius, total)
    if naive:
        assert kept.tolist() == naive_kept(scores, cu, counts, coords, radius), counts
        want_cu = cases.offsets(counts.tolist(), cu.dtype)
    else:
        want, want_cu = spread_select_ref(scores, cu, counts, coords, radius)
        assert kept.dtype == torch.int64
        assert torch.equal(kept, want), (radius, counts)
    assert cu_kept.dtype == cu.dtype
    assert torch.equal(cu_kept, want_cu)


def count_modes(lengths, g):
    """Keep counts: random, the edges (1, n, n - 1, n // 2), and about 1/32 (the pass stops
    early) - never above n, 0 for an empty sample."""
    small = torch.tensor([min(n, max(1, n // 32)) for n in lengths], dtype=torch.int64)
    return [cases.make_counts(lengths, "random", g), cases.make_counts(lengths, "edges", g), small]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spread_matches_reference(device, layout, dtype, kind, radius, gen):
    lengths = LAYOUTS[layout]
    index_dtype = cases.INDEX_DTYPES[(len(layout) + radius) % 2]
    scores, cu, coords = make_case(lengths, dtype, kind, gen, sparse=radius % 2 == 1,
                                   index_dtype=index_dtype)  # fmt: skip
    for counts in count_modes(lengths, gen):
        check(device, scores, cu, counts, coords, radius)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["ties", "special", "constant", "nan"])
def test_spread_matches_naive_pairwise(device, kind, gen):
    lengths = [40, 0, 97, 3]
    for radius in (1, 2, 5):
        scores, cu, coords = make_case(lengths, torch.float32, kind, gen, sparse=radius == 2)
        for counts in count_modes(lengths, gen):
            check(device, scores, cu, counts, coords, radius, naive=True)


@pytest.mark.parametrize("device", DEVICES)
def test_spread_huge_radius_and_extreme_coords(device, gen):
    """A window with more rows than the sample has tokens (the kernels scan the sample instead)
    and coordinates near the int64 limits (the window saturates, nothing overflows)."""
    big = 2**62
    coords = torch.tensor(
        [(0, -big, -big), (0, -big, big), (0, 0, 0), (0, big, -big), (0, big, big),
         (1, 5, 5), (1, 5, 6), (1, 9, 5), (2, 2**63 - 1, 2**63 - 1)],
        dtype=torch.int64,
    )  # fmt: skip
    cu = torch.tensor([0, 9])
    for radius in (1, 3, 10**6, big, 2**63 - 1):
        for _ in range(4):
            scores = torch.randn(9, generator=gen)
            for k in range(10):
                check(device, scores, cu, torch.tensor([k]), coords, radius, naive=True)
    scores, cu, coords = make_case([300, 41], torch.float32, "normal", gen, sparse=True)
    counts = torch.tensor([150, 41])
    check(device, scores, cu, counts, coords, 10**9, naive=True)


@pytest.mark.parametrize("device", DEVICES)
def test_spread_non_contiguous_inputs(device, gen):
    lengths = [127, 0, 31, 4099]
    scores, cu, coords = make_case(lengths, torch.bfloat16, "ties", gen, index_dtype=torch.int32)
    wide_scores = torch.stack([scores, -scores], 1).reshape(-1)[::2]  # stride 2
    coords_t = coords.t().contiguous().t()  # strides (1, Tv)
    coords_s = torch.stack([coords, -coords], 2).reshape(-1, 6)[:, ::2]  # strides (6, 2)
    cu_s = torch.stack([cu, cu], 1)[:, 0]  # stride 2
    for counts in count_modes(lengths, gen):
        counts_s = torch.stack([counts, counts], 1)[:, 1]
        want = spread_select_ref(scores, cu, counts, coords, 2)
        for s, c, xy, k in (
            (wide_scores, cu, coords_t, counts),
            (scores, cu_s, coords_s, counts_s),
        ):
            assert not (s.is_contiguous() and c.is_contiguous() and xy.is_contiguous()
                        and k.is_contiguous())  # fmt: skip
            kept, cu_kept = spread(device, s, c, k, xy, 2)
            assert torch.equal(kept, want[0]) and torch.equal(cu_kept, want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_spread_large_sample_many_samples_and_no_total(device, gen):
    """One large grid (the pass stops early at 1/32, or runs to the end), many small samples, and
    no total_kept (the CUDA kernel then reads it on the device)."""
    lengths = [16384]
    scores, cu, coords = make_case(lengths, torch.float16, "normal", gen)
    for k in (512, 9000, 16383):
        check(device, scores, cu, torch.tensor([k]), coords, 1)
    lengths = torch.randint(0, 60, (503,), generator=gen).tolist()
    scores, cu, coords = make_case(lengths, torch.float32, "ties", gen, sparse=True)
    counts = cases.make_counts(lengths, "random", gen)
    check(device, scores, cu, counts, coords, 1, total=None)
    check(device, scores, cu, counts, coords, 2)


def test_spread_same_result_for_any_thread_count(gen):
    lengths = [4099, 17, 2000, 0, 333]
    scores, cu, coords = make_case(lengths, torch.float32, "ties", gen)
    counts = cases.make_counts(lengths, "random", gen)
    want = spread_select_ref(scores, cu, counts, coords, 1)[0]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(spread("cpu", scores, cu, counts, coords, 1)[0], want)
    finally:
        torch.set_num_threads(before)


def test_spread_stage_runs_the_cpp_kernel_through_the_table(gen):
    assert backend.choose("spread_select", "cpu") == "cpp"
    scores, cu, coords = make_case([50, 9], torch.float32, "normal", gen)
    counts = torch.tensor([12, 9])
    got = backend.call("spread_select", "cpu", scores, cu, counts, coords, 1, total_kept=21)
    want = spread_select_ref(scores, cu, counts, coords, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_spread_rejects_bad_arguments(device):
    s = torch.randn(6, device=device)
    cu = torch.tensor([0, 2, 6], device=device)
    k = torch.tensor([1, 2], device=device)
    xy = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]],
                      device=device)  # fmt: skip
    op = torch.ops.tokenprune._spread_select
    with pytest.raises(ValueError, match="coords"):
        op(s, cu, k, xy[:5], 1)
    with pytest.raises(ValueError, match="coords"):
        op(s, cu, k, xy[:, :2], 1)
    with pytest.raises(ValueError, match="coords"):
        op(s, cu, k, xy.reshape(-1), 1)
    with pytest.raises(TypeError, match="coords"):
        op(s, cu, k, xy.float(), 1)
    with pytest.raises(ValueError, match="radius"):
        op(s, cu, k, xy, -1)
    with pytest.raises(ValueError, match="keep_counts"):
        op(s, cu, torch.tensor([1, 2, 3], device=device), xy, 1)
    with pytest.raises(TypeError, match="keep_counts"):
        op(s, cu, k.int(), xy, 1)
    with pytest.raises(TypeError, match="scores"):
        op(s.double(), cu, k, xy, 1)
    with pytest.raises(ValueError, match="total_kept"):
        op(s, cu, k, xy, 1, 7)
    if device == "cpu":  # values are the public op's business on CUDA (no synchronisation)
        with pytest.raises(ValueError, match="strictly increasing"):
            op(s, cu, k, xy[[0, 1, 3, 2, 4, 5]], 1)
        with pytest.raises(ValueError, match="strictly increasing"):
            op(s, cu, k, xy[[0, 0, 2, 3, 4, 5]], 1)
        with pytest.raises(ValueError, match="keep_counts"):
            op(s, cu, torch.tensor([3, 1]), xy, 1)
        with pytest.raises(ValueError, match="total_kept must equal"):
            op(s, cu, k, xy, 1, 2)
    kept, cu_kept = op(s, cu, k, xy, 1, 3)
    assert kept.numel() == 3 and cu_kept.tolist() == [0, 1, 3]


@pytest.mark.cuda
def test_spread_bad_values_stay_in_bounds_on_cuda(gen):
    """Out-of-range offsets and counts reach no memory outside the buffers: the calls return, the
    device reports no error, and a valid call afterwards is right."""
    scores, cu, coords = make_case([40, 25], torch.float32, "normal", gen)
    dev = "cuda"
    op = torch.ops.tokenprune._spread_select
    for bad_cu in ([0, 10**9, 65], [0, -7, 65], [5, 3, 65], [0, 40, 10**6]):
        for bad_k in ([10**6, -4], [40, 25], [0, 0]):
            op(scores.to(dev), torch.tensor(bad_cu, device=dev), torch.tensor(bad_k, device=dev),
               coords.to(dev), 2, 30)  # fmt: skip
    torch.cuda.synchronize()  # a fault would surface here
    check(dev, scores, cu, torch.tensor([7, 25]), coords, 2)
