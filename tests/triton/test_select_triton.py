"""Triton stage c (tokenprune_kernels/triton/select.py) against the reference.

Selections must equal the reference's indices exactly. Runs in the interpreter on a CPU machine
(small shapes, small chunks so that samples span several chunks and slices), on the GPU when there
is one. Every buffer the module allocates is poisoned first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from tokenprune_kernels.reference import (
    keep_counts_ref,
    score_keys_ref,
    select_topk_ref,
)
from tokenprune_kernels.testing import planted_scores
from tokenprune_kernels.triton import select as sel

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("poisoned_buffers")]

SIZES = [1, 2, 3, 5, 31, 127, 257]
SMALL_BLOCK = 16  # chunk size in most tests: a 257-token sample spans 17 chunks
SCHEDULES = [False, True]  # serial, wide
FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # bf16 -> fp32 is exact in the interpreter


@triton.jit
def _keys_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    key = sel._score_keys(tl.load(x_ptr + offs, mask=m, other=0.0))
    tl.store(out_ptr + offs, key.to(tl.int64), mask=m)


def deep_ties(n: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 values 1 + a few ulps: keys agree on the top three bytes, so every pass runs."""
    ulps = torch.randint(0, 5, (n,), generator=gen, dtype=torch.int32)
    return (torch.tensor(1.0).view(torch.int32) + ulps).view(torch.float32)


def pack(parts: list[torch.Tensor], index_dtype: torch.dtype = torch.int64):
    cu = torch.zeros(len(parts) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor([p.numel() for p in parts], dtype=torch.int64), 0)
    return torch.cat(parts), cu.to(index_dtype)


def check_select(scores, cu, counts, device, wide=False, block_v=SMALL_BLOCK, host_total=True):
    want_idx, want_cu = select_topk_ref(scores, cu, counts)
    total = int(counts.sum()) if host_total else None
    got_idx, got_cu = sel.select_topk_triton(
        scores.to(device), cu.to(device), counts.to(device), total_kept=total, block_v=block_v,
        wide=wide,
    )  # fmt: skip
    assert got_idx.dtype == torch.int64 and got_cu.dtype == cu.dtype
    assert torch.equal(got_idx.cpu(), want_idx), (got_idx.cpu().tolist(), want_idx.tolist())
    assert torch.equal(got_cu.cpu(), want_cu)


# ------------------------------------------------------------------------------------ keys


def test_score_keys_match_reference(device):
    values = [float("nan"), float("-inf"), -3.5e38, -2.5, -1e-30, -1e-45, -0.0, 0.0, 1e-45]
    values += [1e-30, 1.0, 3.0e38, float("inf"), -float("nan")]
    x = torch.tensor(values, dtype=torch.float32, device=device)
    out = torch.full((x.numel(),), -1, dtype=torch.int64, device=device)
    _keys_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    assert out.cpu().tolist() == score_keys_ref(x.cpu()).tolist()


# ---------------------------------------------------------------------------------- select


@pytest.mark.parametrize("n", SIZES)
def test_select_sizes_and_keep_counts(n, device, gen):
    for dtype in FLOATS:
        scores = planted_scores(n, dtype, gen)
        for k in sorted({1, max(1, n // 3), max(1, n - 1), n}):
            check_select(scores, torch.tensor([0, n]), torch.tensor([k]), device)
    scores = torch.randn(n, generator=gen)
    block = max(4, triton.next_power_of_2(n) // 4)  # wide: about four slices
    check_select(scores, torch.tensor([0, n]), torch.tensor([max(1, n // 2)]), device, True, block)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_select_ragged_batch_with_empty_samples(wide, index_dtype, device, gen):
    sizes = [0, 7, 0, 1, 40, 2, 0, 97, 0]
    scores, cu = pack([planted_scores(n, torch.float32, gen) if n else torch.empty(0) for n in sizes],
                      index_dtype)  # fmt: skip
    block = 32 if wide else SMALL_BLOCK  # wide: 5 slices, the 97-token sample spans 4
    for ratio in (0.05, 0.5, 1.0):
        check_select(scores, cu, keep_counts_ref(cu, keep_ratio=ratio), device, wide, block)
    check_select(scores, cu, keep_counts_ref(cu, keep_count=1), device, wide, block,
                 host_total=False)  # fmt: skip
    check_select(scores.half(), cu, keep_counts_ref(cu, keep_ratio=0.4), device, wide, block)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
def test_select_ties_nan_inf_and_signed_zero(wide, device, gen):
    nan, inf = float("nan"), float("inf")
    cases = [
        ([-0.0, 0.0, -0.0, 0.0, -0.0], 2),  # -0.0 == +0.0: the lowest indices
        ([0.0, -0.0, -1.0, -0.0], 3),
        ([nan, -inf, nan, -inf], 2),  # NaN ranks below -inf
        ([nan, nan, nan], 2),  # NaN among themselves by index
        ([nan, inf, -inf, 1.0, -1.0, nan], 4),
        ([-5.0, -4.0, -6.0, -4.0, -4.0], 2),  # negatives: -4.0 ties, the first two
        ([1e-45, -1e-45, 0.0, -0.0], 2),  # denormals around zero
        ([3.0] * 37, 11),  # all equal
    ]
    for values, k in cases:
        block = 2 if len(values) < 10 else 8
        check_select(torch.tensor(values), torch.tensor([0, len(values)]), torch.tensor([k]),
                     device, wide, block_v=block)  # fmt: skip
    # Many keys equal to the threshold, spread over several chunks and slices.
    scores = torch.cat([torch.full((60,), 2.0), torch.full((5,), 7.0), torch.full((70,), 2.0)])
    scores = scores[torch.randperm(scores.numel(), generator=gen)]
    for k in (3, 40, 134):
        check_select(scores, torch.tensor([0, 135]), torch.tensor([k]), device, wide, block_v=32)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
def test_select_every_radix_pass(wide, device, gen):
    block = 32 if wide else SMALL_BLOCK
    scores, cu = pack([deep_ties(n, gen) for n in (3, 50, 129)])
    for k in (1, 17):
        counts = torch.minimum(torch.tensor([k, k, k]), cu[1:] - cu[:-1])
        check_select(scores, cu, counts, device, wide, block)
    check_select(scores, cu, keep_counts_ref(cu, keep_ratio=0.37), device, wide, block)
    wide_range = torch.randn(300, generator=gen) * torch.logspace(-30, 30, 300)  # all exponents
    check_select(wide_range, torch.tensor([0, 300]), torch.tensor([123]), device, wide, block)


def test_select_production_chunk(device, gen):
    """The production BLOCK_V, serial and wide: a sample spanning three chunks (wide: three
    slices) next to a short one."""
    scores, cu = pack(
        [
            planted_scores(4099, torch.float32, gen, levels=40),
            planted_scores(13, torch.float32, gen),
        ]
    )
    for wide in SCHEDULES:
        check_select(scores, cu, keep_counts_ref(cu, keep_ratio=0.25), device, wide, sel.BLOCK_V)


def test_select_schedule_by_size(device, gen, monkeypatch):
    """wide=None: serial for small samples, wide once Tv >= WIDE_MIN_AVG * B (both exact)."""
    monkeypatch.setattr(sel, "WIDE_MIN_AVG", 64)
    launched = []
    for name in ("_select_kernel", "_wide_compact_kernel"):
        kernel = getattr(sel, name)
        monkeypatch.setattr(sel, name, _Recorder(kernel, name, launched))
    for n, want in ((40, "_select_kernel"), (150, "_wide_compact_kernel")):
        scores = planted_scores(n, torch.float32, gen)
        cu, counts = torch.tensor([0, n]), torch.tensor([n // 4])
        got, _ = sel.select_topk_triton(scores.to(device), cu.to(device), counts, block_v=32)
        assert torch.equal(got.cpu(), select_topk_ref(scores, cu, counts)[0])
        assert launched[-1] == want


class _Recorder:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_select_empty_batch_and_no_tokens(device):
    for wide in SCHEDULES:
        none = torch.zeros(0, dtype=torch.int64)
        check_select(torch.empty(0), torch.tensor([0]), none, device, wide)
        check_select(torch.empty(0), torch.tensor([0, 0, 0]), torch.zeros(2, dtype=torch.int64),
                     device, wide)  # fmt: skip


@pytest.mark.parametrize("wide", SCHEDULES)
def test_radix_histograms_count_only_matching_keys(wide, device, gen, monkeypatch):
    """Every histogram a radix pass builds counts exactly the keys that match the digits chosen
    so far (lanes past the sample's end and keys of other prefixes add nothing, not even to bin
    0), and the selection equals the reference's. Scores: three value groups with different top
    bytes, k inside the middle one, so passes 1.. see many non-matching lanes."""
    if device != "cpu":
        pytest.skip("records the interpreter's histograms")
    from triton.runtime import interpreter

    calls: list[int] = []
    real = interpreter.InterpreterBuilder.create_histogram

    def record(self, data, bins, mask):
        hist = real(self, data, bins, mask)
        calls.append(int(hist.data.sum()))
        return hist

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_histogram", record)
    n, k = 101, 40
    group = torch.randint(0, 3, (n,), generator=gen)
    frac = torch.rand(n, generator=gen)
    scores = torch.where(group == 0, 0.25 + frac / 8, torch.where(group == 1, 1 + frac, 6 + frac))
    counts = torch.tensor([k])
    cu = torch.tensor([0, n])
    check_select(scores, cu, counts, device, wide)

    keys = score_keys_ref(scores).to(torch.int64)
    threshold = int(keys.sort(descending=True).values[k - 1])
    want = []
    for p in range(4):
        top = 32 - 8 * p  # bits of the prefix the pass matches against
        prefix = threshold >> top if p else 0
        match = (keys >> top) == prefix if p else torch.ones(n, dtype=torch.bool)
        per_chunk = [int(part.sum()) for part in match.split(SMALL_BLOCK)]
        want.append(per_chunk if not wide else [sum(per_chunk)])
        shift = 24 - 8 * p  # the pass's digit
        in_bin = int(((keys >> shift) == (threshold >> shift)).sum())
        above = int(((keys >> shift) > (threshold >> shift)).sum())
        if in_bin == k - above:  # the bin is kept whole: no further pass
            break
    assert sum(calls) == sum(map(sum, want)), (calls, want)
    if not wide:
        assert calls == [c for per_pass in want for c in per_pass], (calls, want)
    assert len(want) >= 2, want  # the case does exercise passes after the first
