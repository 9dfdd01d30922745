"""Triton stages c and d (tokenprune_kernels/triton/select.py) against the reference.

Selections must equal the reference's indices exactly; gathers and merges bit for bit. Runs in
the interpreter on a CPU machine (small shapes, small chunks so that samples span several chunks
and slices), on the GPU when there is one. Every buffer the module allocates is poisoned first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from tokenprune_kernels.reference import (
    gather_kept_ref,
    keep_counts_ref,
    merge_kept_ref,
    score_keys_ref,
    select_topk_ref,
)
from tokenprune_kernels.testing import make_inputs
from tokenprune_kernels.triton import select as sel

pytestmark = pytest.mark.interpret

SIZES = [1, 2, 3, 5, 31, 127, 257]
SMALL_BLOCK = 16  # chunk size in most tests: a 257-token sample spans 17 chunks
SCHEDULES = [False, True]  # serial, wide
FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # bf16 -> fp32 is exact in the interpreter


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the module allocates starts as garbage, so an unwritten entry shows."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(sel, "_alloc", alloc)


@triton.jit
def _keys_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    key = sel._score_keys(tl.load(x_ptr + offs, mask=m, other=0.0))
    tl.store(out_ptr + offs, key.to(tl.int64), mask=m)


def planted(n: int, dtype: torch.dtype, gen: torch.Generator, levels: int = 4) -> torch.Tensor:
    """Few distinct values (ties everywhere), negatives, NaN, +-inf, -0.0 and +0.0 planted."""
    s = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / 2).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, float("nan"), -0.0]
    pick = torch.randperm(n, generator=gen)[: min(n, len(specials))]
    for i, p in enumerate(pick.tolist()):
        s[p] = specials[i]
    return s


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
        scores = planted(n, dtype, gen)
        for k in sorted({1, max(1, n // 3), max(1, n - 1), n}):
            check_select(scores, torch.tensor([0, n]), torch.tensor([k]), device)
    scores = torch.randn(n, generator=gen)
    block = max(4, triton.next_power_of_2(n) // 4)  # wide: about four slices
    check_select(scores, torch.tensor([0, n]), torch.tensor([max(1, n // 2)]), device, True, block)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_select_ragged_batch_with_empty_samples(wide, index_dtype, device, gen):
    sizes = [0, 7, 0, 1, 40, 2, 0, 97, 0]
    scores, cu = pack([planted(n, torch.float32, gen) if n else torch.empty(0) for n in sizes],
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
        [planted(4099, torch.float32, gen, levels=40), planted(13, torch.float32, gen)]
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
        scores = planted(n, torch.float32, gen)
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


# ---------------------------------------------------------------------------- gather, merge

LAYOUTS = [
    [("t", 3), ("v", 37), ("q", 4)],
    [("t", 2), ("q", 3)],  # no visual tokens: passes through
    [("v", 1), ("q", 1)],  # visual first
    [("t", 5), ("v", 11), ("t", 2), ("v", 20), ("q", 3), ("t", 4)],  # two images
    [("t", 1), ("v", 130), ("q", 2)],
]


def random_kept(cu_v: torch.Tensor, gen: torch.Generator, allow_empty: bool = False):
    """A random ascending subset of each sample (non-empty unless allow_empty)."""
    kept = [torch.zeros(0, dtype=torch.int64)]
    for b in range(cu_v.numel() - 1):
        lo, hi = int(cu_v[b]), int(cu_v[b + 1])
        if hi > lo:
            k = int(torch.randint(0 if allow_empty else 1, hi - lo + 1, (1,), generator=gen))
            kept.append(lo + torch.randperm(hi - lo, generator=gen)[:k].sort().values)
    return torch.cat(kept)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype.is_floating_point:  # bit for bit
            bits = torch.int16 if g.element_size() == 2 else torch.int32
            g, w = g.view(bits), w.view(bits)
        assert torch.equal(g, w)


def moved(tensors, device):
    return tuple(t.to(device) for t in tensors)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows", [1, 3])
def test_gather_matches_reference(dtype, rows, device, gen):
    index_dtype = torch.int32 if rows == 3 else torch.int64
    inp = make_inputs(LAYOUTS, hidden=24, dtype=dtype, index_dtype=index_dtype, generator=gen)
    pos = inp.visual_position_ids.to(index_dtype)
    pos = pos[0] if rows == 1 else pos
    kept = random_kept(inp.cu_seqlens_v, gen)
    want = gather_kept_ref(inp.visual_embeds, pos, kept)
    assert_same(sel.gather_kept_triton(*moved((inp.visual_embeds, pos, kept), device)), want)


def merge_args(dtype, index_dtype, rows, gen, hidden=40, layouts=LAYOUTS):
    inp = make_inputs(layouts, hidden=hidden, dtype=dtype, index_dtype=index_dtype, generator=gen)
    pos = inp.position_ids.to(index_dtype)
    pos = pos[1] if rows == 1 else pos
    return inp, (inp.inputs_embeds, pos, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
                 inp.cu_seqlens_v)  # fmt: skip


@pytest.mark.parametrize(
    "dtype,index_dtype,rows",
    [(torch.float32, torch.int64, 3), (torch.float16, torch.int32, 1),
     (torch.bfloat16, torch.int64, 1), (torch.float16, torch.int64, 3)],
)  # fmt: skip
def test_merge_matches_reference(dtype, index_dtype, rows, device, gen):
    inp, args = merge_args(dtype, index_dtype, rows, gen)
    tv = inp.visual_idx.numel()
    for kept in (
        random_kept(inp.cu_seqlens_v, gen),
        random_kept(inp.cu_seqlens_v, gen, allow_empty=True),
        torch.arange(tv),  # everything kept: masked_scatter
        torch.zeros(0, dtype=torch.int64),  # nothing kept
        torch.tensor([0, tv - 1]),
    ):
        assert_same(sel.merge_kept_triton(*moved((*args, kept), device)),
                    merge_kept_ref(*args, kept))  # fmt: skip


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize(
    "dtype,index_dtype,rows", [(torch.float32, torch.int32, 3), (torch.float16, torch.int64, 1)]
)
def test_select_merge_matches_reference(wide, dtype, index_dtype, rows, device, gen):
    inp, args = merge_args(dtype, index_dtype, rows, gen)
    scores = planted(inp.visual_idx.numel(), dtype, gen)
    for ratio in (0.3, 1.0):
        counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=ratio)
        kept, _ = select_topk_ref(scores, inp.cu_seqlens_v, counts)
        want = (*merge_kept_ref(*args, kept), kept)
        got = sel.select_merge_triton(
            *moved((scores, inp.cu_seqlens_v, counts, *args[:5]), device), block_v=32, wide=wide
        )
        assert_same(got, want)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize("rows", [1, 3])
def test_select_gather_matches_reference(wide, rows, device, gen):
    inp = make_inputs(LAYOUTS, hidden=24, dtype=torch.float16, generator=gen)
    pos = inp.visual_position_ids if rows == 3 else inp.visual_position_ids[2]
    scores = planted(inp.visual_idx.numel(), torch.float32, gen)
    counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.45)
    kept, cu_kept = select_topk_ref(scores, inp.cu_seqlens_v, counts)
    want = (*gather_kept_ref(inp.visual_embeds, pos, kept), kept, cu_kept)
    got = sel.select_gather_triton(
        *moved((scores, inp.cu_seqlens_v, counts, inp.visual_embeds, pos), device), block_v=32,
        wide=wide,
    )  # fmt: skip
    assert_same(got, want)


def test_production_sizes_once(device, gen):
    """Production chunk sizes end to end: the fused paths with the default schedule."""
    layouts = [[("t", 7), ("v", 2500), ("q", 5)], [("t", 3), ("q", 2)], [("v", 40), ("q", 1)]]
    inp, args = merge_args(torch.bfloat16, torch.int64, 3, gen, hidden=16, layouts=layouts)
    scores = planted(inp.visual_idx.numel(), torch.float16, gen, levels=30)
    counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.25)
    kept, cu_kept = select_topk_ref(scores, inp.cu_seqlens_v, counts)
    got = sel.select_merge_triton(*moved((scores, inp.cu_seqlens_v, counts, *args[:5]), device))
    assert_same(got, (*merge_kept_ref(*args, kept), kept))
    got = sel.select_gather_triton(*moved((scores, inp.cu_seqlens_v, counts, args[3],
                                           inp.visual_position_ids), device))  # fmt: skip
    assert_same(got, (*gather_kept_ref(args[3], inp.visual_position_ids, kept), kept, cu_kept))


def test_merge_strided_inputs_and_nothing_visual(device, gen):
    """Row-strided embeddings (a slice of a wider buffer), and a batch without visual tokens."""
    inp, args = merge_args(torch.float32, torch.int64, 3, gen, hidden=33)
    wide_text = torch.randn(inp.inputs_embeds.shape[0], 50, generator=gen)
    wide_vis = torch.randn(inp.visual_embeds.shape[0], 50, generator=gen)
    wide_text[:, :33] = inp.inputs_embeds
    wide_vis[:, :33] = inp.visual_embeds
    kept = random_kept(inp.cu_seqlens_v, gen)
    strided = (wide_text[:, :33], args[1], args[2], wide_vis[:, :33], *args[4:], kept)
    assert_same(sel.merge_kept_triton(*moved(strided, device)), merge_kept_ref(*args, kept))

    text = make_inputs([[("t", 4), ("q", 2)], [("q", 3)]], hidden=8, generator=gen)
    none = torch.zeros(0, dtype=torch.int64)
    args = (text.inputs_embeds, text.position_ids, text.cu_seqlens, text.visual_embeds,
            text.visual_idx, text.cu_seqlens_v)  # fmt: skip
    assert_same(sel.merge_kept_triton(*moved((*args, none), device)), merge_kept_ref(*args, none))
    counts = torch.zeros(2, dtype=torch.int64)
    got = sel.select_merge_triton(*moved((torch.empty(0), text.cu_seqlens_v, counts, *args[:5]),
                                         device))  # fmt: skip
    assert_same(got, (*merge_kept_ref(*args, none), none))


def test_lowering_cases_cover_every_kernel():
    kernels = {case.kernel for case in sel.LOWERING_CASES}
    assert kernels == {
        sel._select_kernel,
        sel._radix_pass_kernel,
        sel._wide_compact_kernel,
        sel._merge_maps_kernel,
        sel._copy_rows_kernel,
    }
    for case in sel.LOWERING_CASES:
        assert case.name.startswith("select.")
        assert list(case.signature) == case.kernel.arg_names
