"""The compiled CPU kernels of the private ops against the plain-PyTorch reference and against a
naive pure-Python implementation written here. Selections must be identical (same indices, same
tie-breaking); gathers and merges are copies, so their outputs must match bit for bit."""

from __future__ import annotations

import math

import kernel_cases as cases
import pytest
import torch
from kernel_cases import assert_same_bits as assert_same

from tokenprune_kernels.reference import gather_kept_ref, merge_kept_ref, select_topk_ref

pytestmark = pytest.mark.usefixtures("compiled_ext")

# --------------------------------------------------------------------------------------------
# Independent naive implementations (pure Python, no shared code with the reference).


def naive_select(scores: torch.Tensor, cu: torch.Tensor, counts: torch.Tensor) -> list[int]:
    """Per sample: sort by (NaN last, score desc, index asc), keep the first k, ascending."""
    values = scores.float().tolist()
    bounds = cu.tolist()
    kept: list[int] = []

    def rank(i: int) -> tuple[int, float, int]:
        x = values[i]
        return (1, 0.0, i) if math.isnan(x) else (0, -x, i)  # -0.0 == 0.0 in the comparison

    for b, k in enumerate(counts.tolist()):
        top = sorted(range(bounds[b], bounds[b + 1]), key=rank)[:k]
        kept.extend(sorted(top))
    return kept


def naive_merge(cu, visual_idx, cu_v, kept_idx) -> tuple[list[int], list[int], list[int]]:
    """(src rows, visual row or -1 per output row, output offsets) by walking every sample."""
    bounds, vbounds = cu.tolist(), cu_v.tolist()
    vidx, kept = visual_idx.tolist(), set(kept_idx.tolist())
    src, vsrc, cu_out = [], [], [0]
    for b in range(len(bounds) - 1):
        local_to_v = {vidx[v]: v for v in range(vbounds[b], vbounds[b + 1])}
        for r in range(bounds[b + 1] - bounds[b]):
            v = local_to_v.get(r)
            if v is None or v in kept:
                src.append(bounds[b] + r)
                vsrc.append(-1 if v is None else v)
        cu_out.append(len(src))
    return src, vsrc, cu_out


# --------------------------------------------------------------------------------------------
# _select_topk


@pytest.mark.parametrize("kind", cases.SCORE_KINDS)
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(cases.SELECT_LAYOUTS))
def test_select_matches_reference(layout, dtype, kind, gen):
    lengths = cases.SELECT_LAYOUTS[layout]
    cu_dtype = cases.INDEX_DTYPES[len(layout) % 2]
    cu = cases.offsets(lengths, cu_dtype)
    scores = cases.make_scores(sum(lengths), dtype, kind, gen)
    for mode in ("random", "edges"):
        counts = cases.make_counts(lengths, mode, gen)
        kept, cu_kept = cases.ops()._select_topk(scores, cu, counts)
        want, want_cu = select_topk_ref(scores, cu, counts)
        assert kept.dtype == torch.int64
        assert torch.equal(kept, want), (mode, counts)
        assert cu_kept.dtype == cu_dtype
        assert torch.equal(cu_kept, want_cu)
        assert kept.tolist() == naive_select(scores, cu, counts), (mode, counts)


@pytest.mark.parametrize("kind", ["normal", "ties", "bits"])
def test_select_same_result_for_any_thread_count(kind, gen):
    lengths = [40009, 17, 16384]
    cu = cases.offsets(lengths)
    scores = cases.make_scores(sum(lengths), torch.float32, kind, gen)
    counts = cases.make_counts(lengths, "random", gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cases.ops()._select_topk(scores, cu, counts))
    finally:
        torch.set_num_threads(before)
    want, _ = select_topk_ref(scores, cu, counts)
    for kept, _cu in results:
        assert torch.equal(kept, want)


def test_select_many_small_samples(gen):
    """A batch big enough to run in parallel over samples."""
    lengths = torch.randint(0, 50, (997,), generator=gen).tolist()
    cu = cases.offsets(lengths, torch.int32)
    scores = cases.make_scores(sum(lengths), torch.bfloat16, "ties", gen)
    counts = cases.make_counts(lengths, "random", gen)
    kept, cu_kept = cases.ops()._select_topk(scores, cu, counts)
    want, want_cu = select_topk_ref(scores, cu, counts)
    assert torch.equal(kept, want)
    assert torch.equal(cu_kept, want_cu)


def test_select_strided_scores(gen):
    scores = torch.randn(2 * 301, generator=gen)[::2]
    cu = cases.offsets([100, 201])
    counts = torch.tensor([7, 200])
    kept, _ = cases.ops()._select_topk(scores, cu, counts)
    assert torch.equal(kept, select_topk_ref(scores.contiguous(), cu, counts)[0])


def test_select_order_keys():
    """The contract's order on a hand-written case: NaN last, -0.0 == +0.0, ties to lower index."""
    x = [0.0, math.nan, -0.0, -math.inf, 1.0, math.inf, -1.0, -0.0, math.nan, 1.0]
    scores = torch.tensor(x)
    cu = torch.tensor([0, len(x)])
    expected_rank = [5, 4, 9, 0, 2, 7, 6, 3, 1, 8]  # best first
    for k in range(len(x) + 1):
        kept, _ = cases.ops()._select_topk(scores, cu, torch.tensor([k]))
        assert kept.tolist() == sorted(expected_rank[:k]), k


# --------------------------------------------------------------------------------------------
# _gather_kept

GATHER_SHAPES = [(1, 1, 1), (2, 3, 3), (13, 64, 1), (257, 0, 2), (4099, 129, 3)]


def random_kept(tv: int, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(tv, generator=g) < 0.4
    return torch.nonzero(keep).flatten()


@pytest.mark.parametrize("pos_dtype", cases.INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize(("tv", "hidden", "rows"), GATHER_SHAPES)
def test_gather_matches_reference(tv, hidden, rows, dtype, pos_dtype, gen):
    embeds = torch.randn(tv, hidden, generator=gen).to(dtype)
    pos = torch.randint(-1000, 10**6, (rows, tv), generator=gen).to(pos_dtype)
    for kept in (random_kept(tv, gen), torch.arange(tv), torch.empty(0, dtype=torch.int64)):
        got_e, got_p = cases.ops()._gather_kept(embeds, pos, kept)
        want_e, want_p = gather_kept_ref(embeds, pos, kept)
        assert_same(got_e, want_e)
        assert_same(got_p, want_p)
        assert_same(got_e, embeds[kept])
        assert_same(got_p, pos[:, kept])


def test_gather_any_order_and_repeats(gen):
    embeds = torch.randn(50, 8, generator=gen)
    pos = torch.arange(150).reshape(3, 50)
    kept = torch.tensor([49, 0, 0, 7, 49, 3])
    got_e, got_p = cases.ops()._gather_kept(embeds, pos, kept)
    assert_same(got_e, embeds[kept])
    assert_same(got_p, pos[:, kept])


@pytest.mark.parametrize("layout", ["row_stride", "transposed"])
def test_gather_non_contiguous(layout, gen):
    tv, hidden = 37, 24
    if layout == "row_stride":  # dense rows, row stride > H
        embeds = torch.randn(tv, hidden + 5, generator=gen).to(torch.bfloat16)[:, 2 : 2 + hidden]
    else:  # column-major: copied to rows first
        embeds = torch.randn(hidden, tv, generator=gen).to(torch.bfloat16).t()
    pos = torch.randint(0, 999, (tv, 3), generator=gen).t()  # strides (1, 3)
    kept = torch.arange(0, tv, 2)[::2]  # non-contiguous index tensor
    got_e, got_p = cases.ops()._gather_kept(embeds, pos, kept)
    assert_same(got_e, embeds[kept])
    assert_same(got_p, pos[:, kept])


# --------------------------------------------------------------------------------------------
# _merge_kept


def check_merge(args: dict, kept: torch.Tensor) -> None:
    got = cases.ops()._merge_kept(**args, kept_idx=kept)
    want = merge_kept_ref(**args, kept_idx=kept)
    for g_t, w_t in zip(got, want, strict=True):
        assert_same(g_t, w_t)
    # Independent check.
    src, vsrc, cu_out = naive_merge(
        args["cu_seqlens"], args["visual_idx"], args["cu_seqlens_v"], kept
    )
    embeds, pos, cu_got, src_got = got
    assert src_got.tolist() == src
    assert cu_got.tolist() == cu_out
    assert cu_got.dtype == args["cu_seqlens"].dtype
    rows = [
        args["visual_embeds"][v] if v >= 0 else args["inputs_embeds"][r]
        for r, v in zip(src, vsrc, strict=True)
    ]
    if rows:
        assert_same(embeds, torch.stack(rows))
    assert_same(pos, args["position_ids"][:, torch.tensor(src, dtype=torch.int64)])


@pytest.mark.parametrize("mode", cases.MERGE_MODES)
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(cases.MERGE_LAYOUTS))
def test_merge_matches_reference(layout, dtype, mode, gen):
    check_merge(*cases.merge_case(layout, dtype, mode, gen))


@pytest.mark.parametrize(("hidden", "rows"), [(0, 1), (1, 1), (7, 3), (256, 2)])
def test_merge_hidden_sizes(hidden, rows, gen):
    layout = cases.MERGE_LAYOUTS["ragged"]
    args = cases.make_merge_inputs(
        layout, torch.float16, hidden, rows, torch.int64, torch.int32, gen
    )
    check_merge(args, cases.kept_for(args, "random", gen))


def test_merge_non_contiguous(gen):
    args = cases.make_merge_inputs(
        cases.MERGE_LAYOUTS["ragged"], torch.float32, 16, 3, torch.int32, torch.int64, gen
    )
    args["inputs_embeds"] = torch.cat([args["inputs_embeds"], args["inputs_embeds"]], dim=1)[
        :, 8:24
    ]
    args["visual_embeds"] = args["visual_embeds"].t().contiguous().t()
    args["position_ids"] = args["position_ids"].t().contiguous().t()
    check_merge(args, cases.kept_for(args, "random", gen))


# --------------------------------------------------------------------------------------------
# Bad arguments raise (memory safety re-checked by the kernels).


def test_select_rejects_bad_arguments():
    s = torch.randn(10)
    cu = torch.tensor([0, 4, 10])
    k = torch.tensor([2, 3])
    select = cases.ops()._select_topk
    with pytest.raises(ValueError, match="keep_counts"):
        select(s, cu, torch.tensor([5, 3]))  # k > n
    with pytest.raises(ValueError, match="keep_counts"):
        select(s, cu, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="keep_counts"):
        select(s, cu, torch.tensor([1, 1, 1]))  # wrong B
    with pytest.raises(TypeError, match="keep_counts"):
        select(s, cu, k.int())
    with pytest.raises(ValueError, match="cu_seqlens_v"):
        select(s, torch.tensor([0, 4, 9]), k)  # does not end at Tv
    with pytest.raises(ValueError, match="cu_seqlens_v"):
        select(s, torch.tensor([1, 4, 10]), k)  # does not start at 0
    with pytest.raises(ValueError, match="cu_seqlens_v"):
        select(s, torch.tensor([0, 11, 10]), k)  # decreases
    with pytest.raises(ValueError, match="cu_seqlens_v"):
        select(s, torch.tensor([[0, 4, 10]]), k)
    with pytest.raises(TypeError, match="cu_seqlens_v"):
        select(s, cu.float(), k)
    with pytest.raises(ValueError, match="scores"):
        select(s.reshape(2, 5), cu, k)
    with pytest.raises(TypeError, match="scores"):
        select(s.double(), cu, k)
    with pytest.raises(ValueError, match="total_kept must equal sum"):
        select(s, cu, k, 4)
    kept, _ = select(s, cu, k, 5)  # the right total: accepted, same result
    assert torch.equal(kept, select(s, cu, k)[0])


def test_gather_rejects_bad_arguments():
    e = torch.randn(6, 4)
    p = torch.arange(12).reshape(2, 6)
    gather = cases.ops()._gather_kept
    for bad in ([6], [-1], [0, 2, 100]):
        with pytest.raises(ValueError, match="kept_idx"):
            gather(e, p, torch.tensor(bad))
    with pytest.raises(TypeError, match="kept_idx"):
        gather(e, p, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids"):
        gather(e, p[:, :5], torch.tensor([0]))
    with pytest.raises(ValueError, match="position_ids"):
        gather(e, p[0], torch.tensor([0]))  # the private op takes [R, Tv] only
    with pytest.raises(TypeError, match="position_ids"):
        gather(e, p.float(), torch.tensor([0]))
    with pytest.raises(ValueError, match="visual_embeds"):
        gather(e[0], p, torch.tensor([0]))
    with pytest.raises(TypeError, match="visual_embeds"):
        gather(e.double(), p, torch.tensor([0]))


def test_merge_rejects_bad_arguments(gen):
    args = cases.make_merge_inputs(
        [(10, 4), (6, 2)], torch.float32, 8, 1, torch.int64, torch.int64, gen
    )
    args["visual_idx"] = torch.tensor([1, 2, 5, 9, 0, 3])
    kept = torch.tensor([0, 2, 5])
    merge = cases.ops()._merge_kept
    merge(**args, kept_idx=kept)  # valid

    def bad(match, error=ValueError, kept_idx=kept, **changes):
        with pytest.raises(error, match=match):
            merge(**{**args, **changes}, kept_idx=kept_idx)

    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 10, 0, 3]))  # 10 >= sample length
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 9, 0, 6]))  # 6 >= second length
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 9, -1, 3]))
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 2, 9, 0, 3]))  # repeated
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5]))
    bad("visual_idx", TypeError, visual_idx=args["visual_idx"].float())
    bad("kept_idx", kept_idx=torch.tensor([0, 6]))
    bad("kept_idx", kept_idx=torch.tensor([-1, 2]))
    bad("kept_idx", kept_idx=torch.tensor([2, 0]))  # not ascending
    bad("kept_idx", kept_idx=torch.tensor([2, 2]))
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 10, 15]))
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 17, 16]))
    bad("cu_seqlens_v", cu_seqlens_v=torch.tensor([0, 4, 5]))
    bad("cu_seqlens_v", cu_seqlens_v=torch.tensor([0, 6]))  # B differs
    bad("position_ids", position_ids=args["position_ids"][:, :-1])
    bad("visual_embeds", TypeError, visual_embeds=args["visual_embeds"].half())
    bad("visual_embeds", visual_embeds=args["visual_embeds"][:, :-1])
    bad("inputs_embeds", TypeError, inputs_embeds=args["inputs_embeds"].long())
