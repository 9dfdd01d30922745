"""The spread rule through the public ops: ``select_topk(spread_coords=..., spread_radius=...)``
(stage ``spread_select``) on every backend the op table lists for it against
``reference.spread_select_ref``, the composites with spread against the reference composites,
and the errors naming ``spread_coords`` / ``spread_radius``."""

from __future__ import annotations

import zlib

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import backend_params, make_inputs, planted_scores, strided

BACKENDS = backend_params("spread_select")
COMPOSITE_BACKENDS = [pytest.param("auto", "cpu", id="auto"), *backend_params("prune_and_merge")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Samples of awkward sizes: empty ones, one token, primes, one past 4096.
SIZES = [1, 0, 2, 3, 31, 127, 0, 4099]


def sample_coords(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 3] int64 (segment, row, col) of one sample: ``n`` tokens cut into images of random
    widths (the last image's last row may be short), laid in raster order, as M-RoPE ids do:
    segment ids start anywhere and jump, rows and columns start at an offset of the image."""
    rows, seg, left = [], int(torch.randint(-3, 50, (1,), generator=gen)), n
    while left > 0:
        w = int(torch.randint(1, 70, (1,), generator=gen))
        h = int(torch.randint(1, 70, (1,), generator=gen))
        take = min(left, w * h)
        r0 = seg + int(torch.randint(0, 5, (1,), generator=gen))
        i = torch.arange(take)
        rows.append(torch.stack([torch.full_like(i, seg), r0 + i // w, r0 + 1 + i % w], 1))
        seg += int(torch.randint(1, 100, (1,), generator=gen))
        left -= take
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)


def spread_inputs(sizes: list[int], dtype: torch.dtype, gen: torch.Generator, planted: bool):
    """(scores [Tv], cu_seqlens_v [B+1] int64, coords [Tv, 3] int64) for samples of ``sizes``;
    ``planted``: few distinct values (ties), NaN, +-inf, -0.0 and +0.0 in every sample."""
    parts = [
        planted_scores(n, dtype, gen) if planted else torch.randn(n, generator=gen).to(dtype)
        for n in sizes
    ]
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(sizes), 0)
    coords = torch.cat([sample_coords(n, gen) for n in sizes])
    return torch.cat(parts), cu, coords


def want_spread(scores, cu, coords, radius, relevance="softmax", **keep):
    """The reference: the keep rule's counts, then ``spread_select_ref``."""
    counts = reference.keep_rule_counts_ref(scores, cu, v.KeepRule(**keep), relevance)
    return reference.spread_select_ref(scores, cu, counts, coords, radius)


def spread(backend_name, device, scores, cu, coords, radius, **keep):
    """``select_topk`` with spread on ``backend_name``; results on the CPU."""
    with backend.use_backend(backend_name):
        kept, cu_kept = tp.select_topk(
            scores.to(device), cu.to(device), spread_coords=coords.to(device),
            spread_radius=radius, **keep,
        )  # fmt: skip
    return kept.cpu(), cu_kept.cpu()


KEEPS = [{"keep_ratio": 0.25}, {"keep_ratio": 0.5}, {"keep_ratio": 1.0}, {"keep_count": 1},
         {"keep_mass": 0.6, "min_keep_ratio": 0.02, "max_keep_ratio": 0.7}]  # fmt: skip


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planted", [False, True], ids=["random", "ties_nan_inf"])
def test_spread_backends_match_reference(backend_name, device, dtype, planted):
    """The stage's parity test: identical indices and offsets on every backend, for radii 0-3,
    every keep rule, int32 and int64 offsets and coordinates."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, planted)).encode()))
    scores, cu, coords = spread_inputs(SIZES, dtype, gen, planted)
    for radius, index_dtype in ((0, torch.int64), (1, torch.int32), (2, torch.int64),
                                (3, torch.int32)):  # fmt: skip
        cu_i, coords_i = cu.to(index_dtype), coords.to(index_dtype)
        for keep in KEEPS:
            want = want_spread(scores, cu_i, coords_i, radius, **keep)
            got = spread(backend_name, device, scores, cu_i, coords_i, radius, **keep)
            assert torch.equal(got[0], want[0]), (backend_name, radius, keep)
            assert got[1].dtype == index_dtype and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_spread_small_cases(backend_name, device):
    """Hand-checked: a 1 x 6 row and a 3 x 3 image, ties broken by the lower index, -0.0 equal
    to +0.0, NaN last, segments never suppressing each other."""
    row = torch.tensor([[0, 0, c] for c in range(6)])
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    cu = torch.tensor([0, 6])
    pick = lambda k, r, sc=s, c=row: spread(backend_name, device, sc, cu, c, r, keep_count=k)[0]  # noqa: E731
    assert pick(3, 1).tolist() == [0, 2, 4]  # 1, 3 and 5 each touch an accepted neighbour
    assert pick(4, 1).tolist() == [0, 1, 2, 4]  # then the suppressed, best first
    assert pick(2, 2).tolist() == [0, 3]
    assert pick(3, 0).tolist() == [0, 1, 2]  # radius 0: the plain top-k
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0, -0.0, 0.0])
    assert pick(2, 1, ties).tolist() == [0, 2]  # the lower index first among equals
    assert pick(4, 1, ties).tolist() == [0, 1, 2, 4]  # accepted 0, 2, 4; then 1
    nan = torch.tensor([float("nan"), 1.0, float("-inf"), 0.0, -0.0, float("nan")])
    assert pick(3, 1, nan).tolist() == [1, 3, 5]  # 1, 3 then NaN 5 (-inf at 2 is suppressed)
    # Two frames of one position each: different segments, both accepted.
    frames = torch.tensor([[3, 0, 0], [3, 0, 1], [9, 0, 0], [9, 0, 1]])
    f = torch.tensor([4.0, 3.0, 2.0, 1.0])
    got = spread(backend_name, device, f, torch.tensor([0, 4]), frames, 1, keep_count=2)[0]
    assert got.tolist() == [0, 2]


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_spread_strided_inputs(backend_name, device):
    """Non-contiguous scores, offsets and coordinates (a column-major [Tv, 3], every other row
    of a wider buffer) select what the reference selects."""
    gen = torch.Generator().manual_seed(77)
    for dtype in DTYPES:
        scores, cu, coords = spread_inputs([1, 0, 37, 3, 130], dtype, gen, planted=True)
        for index_dtype in (torch.int64, torch.int32):
            cu_i, coords_i = cu.to(index_dtype), coords.to(index_dtype)
            want = want_spread(scores, cu_i, coords_i, 1, keep_ratio=0.3)
            column_major = coords_i.T.contiguous().T
            every_other = torch.zeros(2 * coords_i.shape[0], 5, dtype=index_dtype)
            every_other[::2, 1:4] = coords_i
            for c in (column_major, every_other[::2, 1:4], strided(coords_i.T).T):
                assert not c.is_contiguous() and torch.equal(c, coords_i)
                got = spread(backend_name, device, strided(scores), strided(cu_i), c, 1,
                             keep_ratio=0.3)  # fmt: skip
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_spread_radius_zero_and_no_coords_are_the_plain_top_k():
    gen = torch.Generator().manual_seed(3)
    scores, cu, coords = spread_inputs([40, 0, 77], torch.float32, gen, planted=True)
    plain = tp.select_topk(scores, cu, keep_ratio=0.3)
    for got in (tp.select_topk(scores, cu, keep_ratio=0.3, spread_coords=coords),
                tp.select_topk(scores, cu, keep_ratio=0.3, spread_radius=0)):  # fmt: skip
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    spread1 = tp.select_topk(scores, cu, keep_ratio=0.3, spread_coords=coords, spread_radius=1)
    assert not torch.equal(spread1[0], plain[0])  # the rule changes something here


# ----------------------------------------------------------------------------- composites


def _mapper_params(gen) -> list[torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = MapperConfig(channels=(4, 8, 16), kernel_size=5)
    return [p.detach() for p in TokenMapper(config).eval().op_params()]


LAYOUTS = [
    [("t", 3), ("v", 29), ("t", 2), ("v", 13), ("q", 4), ("t", 2)],
    [("t", 2), ("q", 3)],  # no visual tokens
    [("t", 1), ("v", 2), ("q", 1)],
    [("v", 97), ("q", 7)],
]


@pytest.mark.parametrize(("backend_name", "device"), COMPOSITE_BACKENDS)
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize(
    "keep", [{"keep_ratio": 0.25}, {"keep_mass": 0.5, "max_keep_ratio": 0.6}], ids=["ratio", "mass"]
)
def test_composites_with_spread_equal_reference(backend_name, device, use_mapper, keep):
    """Both composites with spread: the kept tokens are the reference rule's on the scores the
    backend ranked, the scores the reference's, the gathered / merged rows the reference's; and
    the reference composites (``prune_*_ref`` with a SpreadRule) agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((use_mapper, keep)).encode()))
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5)
    params = _mapper_params(gen) if use_mapper else []
    bounds = inp.cu_seqlens_v.tolist()
    coords = torch.cat([sample_coords(bounds[b + 1] - bounds[b], gen)
                        for b in range(len(bounds) - 1)]).to(torch.int32)  # fmt: skip
    kw = {"q_pos": inp.q_pos, "spread_coords": coords, "spread_radius": 1, **keep}
    x = inp.to(device)
    dev = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    p = [t.to(device) for t in params]
    with backend.use_backend(backend_name), torch.no_grad():
        pruned = tp.prune_visual_tokens(
            x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.visual_idx, x.cu_seqlens_v,
            x.visual_embeds, x.visual_position_ids, p, **dev,
        )  # fmt: skip
        merged = tp.prune_and_merge(
            x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.inputs_embeds, x.position_ids,
            x.cu_seqlens, x.visual_embeds, x.visual_idx, x.cu_seqlens_v, p, **dev,
        )  # fmt: skip
    pruned, merged = [t.cpu() for t in pruned], [t.cpu() for t in merged]
    relevance = "softmax" if use_mapper else "normalize"
    kept, cu_kept = want_spread(pruned[4], inp.cu_seqlens_v, coords, 1, relevance, **keep)
    assert torch.equal(pruned[2], kept) and torch.equal(pruned[3], cu_kept)
    assert torch.equal(pruned[0], inp.visual_embeds[kept])
    assert torch.equal(pruned[1], inp.visual_position_ids[:, kept])
    assert torch.equal(merged[4], kept) and torch.equal(merged[5], pruned[4])
    want_merge = reference.merge_kept_ref(
        inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
        inp.cu_seqlens_v, kept,
    )  # fmt: skip
    for g, w in zip(merged[:4], want_merge, strict=True):
        assert torch.equal(g, w)
    rule, spread_rule = v.KeepRule(**keep), v.SpreadRule(coords, 1)
    mapper = v.MapperArgs(params)
    ref_prune = reference.prune_visual_tokens_ref(
        inp.scoring(q_pos=True), inp.visual_embeds, inp.visual_position_ids, mapper, rule,
        spread_rule,
    )  # fmt: skip
    torch.testing.assert_close(ref_prune[4], pruned[4], rtol=2e-4, atol=2e-5)
    assert torch.equal(ref_prune[2], kept)  # these inputs have no near-ties at the boundary
    ref_merge = reference.prune_and_merge_ref(
        inp.scoring(q_pos=True), inp.inputs_embeds, inp.position_ids, inp.cu_seqlens,
        inp.visual_embeds, mapper, rule, spread_rule,
    )  # fmt: skip
    assert torch.equal(ref_merge[4], kept) and torch.equal(ref_merge[0], merged[0])
    plain = reference.prune_visual_tokens_ref(
        inp.scoring(q_pos=True), inp.visual_embeds, inp.visual_position_ids, mapper, rule
    )
    assert not torch.equal(plain[2], kept)  # the spread rule changed the kept set


@pytest.mark.parametrize(("backend_name", "device"), COMPOSITE_BACKENDS)
def test_composite_with_spread_under_torch_compile(backend_name, device):
    gen = torch.Generator().manual_seed(11)
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5).to(device)
    bounds = inp.cu_seqlens_v.tolist()
    coords = torch.cat([sample_coords(bounds[b + 1] - bounds[b], gen)
                        for b in range(len(bounds) - 1)]).to(device)  # fmt: skip

    def fn(q, k, inputs_embeds):
        out = tp.prune_and_merge(
            q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inputs_embeds, inp.position_ids,
            inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v,
            keep_ratio=0.3, spread_coords=coords, spread_radius=2,
        )  # fmt: skip
        return out[0].sum(-1), out[4]

    torch._dynamo.reset()
    with torch.no_grad(), backend.use_backend(backend_name):
        want = fn(inp.q, inp.k, inp.inputs_embeds)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(
            inp.q, inp.k, inp.inputs_embeds
        )
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


# --------------------------------------------------------------------------------- errors


def _select(**kw):
    scores = torch.randn(6)
    cu = torch.tensor([0, 4, 6])
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [2, 0, 0], [2, 0, 1]])
    args = {"keep_ratio": 0.5, "spread_coords": coords, "spread_radius": 1, **kw}
    return tp.select_topk(scores, cu, **args)


def _composite(**kw):
    inp = make_inputs([[("t", 2), ("v", 5), ("q", 2)], [("v", 3), ("q", 1)]])
    coords = torch.tensor([[0, 0, c] for c in range(5)] + [[0, 0, c] for c in range(3)])
    args = {"keep_ratio": 0.5, "spread_coords": coords, "spread_radius": 1, **kw}
    return tp.prune_and_merge(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, inp.position_ids,
        inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, **args,
    )  # fmt: skip


SPREAD_ERRORS = [
    ({"spread_coords": None, "spread_radius": 2}, ValueError,
     r"spread_radius = 2 needs spread_coords"),
    ({"spread_radius": -1}, ValueError, r"spread_radius must be an int in \[0, 64\], got -1"),
    ({"spread_radius": 65}, ValueError, r"spread_radius must be an int in \[0, 64\], got 65"),
    ({"spread_radius": 1.0}, TypeError, r"spread_radius must be an int, got float"),
    ({"spread_radius": True}, TypeError, r"spread_radius must be an int, got bool"),
]  # fmt: skip


@pytest.mark.parametrize(("kw", "exc", "match"), SPREAD_ERRORS)
@pytest.mark.parametrize("call", [_select, _composite], ids=["select_topk", "prune_and_merge"])
def test_spread_radius_errors(call, kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


def test_spread_coords_errors():
    c = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [2, 0, 0], [2, 0, 1]])
    with pytest.raises(TypeError, match=r"spread_coords must be int32 or int64, got float32"):
        _select(spread_coords=c.float())
    with pytest.raises(ValueError, match=r"spread_coords must be \[total_v, 3\] = \[6, 3\]"):
        _select(spread_coords=c[:, :2])
    with pytest.raises(ValueError, match=r"spread_coords must be \[total_v, 3\] = \[6, 3\]"):
        _select(spread_coords=c[:5])
    with pytest.raises(ValueError, match=r"spread_coords must be 2-D"):
        _select(spread_coords=c.flatten())
    with pytest.raises(TypeError, match=r"spread_coords must be a Tensor or None, got list"):
        _select(spread_coords=c.tolist())
    # Another device (the meta device stands in for a GPU here).
    with pytest.raises(ValueError, match=r"spread_coords must be on the device of the scores"):
        v.check_spread(v.SpreadRule(c.to("meta"), 1), 6, torch.device("cpu"))
    # Order: strictly increasing within a sample; a new sample may start anywhere.
    restart = c.clone()
    restart[4:] = torch.tensor([[-5, 0, 0], [-5, 0, 1]])  # sample 1 starts below sample 0: fine
    _select(spread_coords=restart)
    for i, row, msg in (
        (3, [0, 1, 0], r"spread_coords\[2\] = \(0, 1, 0\) >= spread_coords\[3\] = \(0, 1, 0\) "
                       r"in sample 0"),
        (1, [0, 0, -1], r"spread_coords\[0\] = \(0, 0, 0\) >= spread_coords\[1\] = \(0, 0, -1\)"),
        (5, [1, 9, 9], r"spread_coords\[4\] = \(2, 0, 0\) >= spread_coords\[5\] = \(1, 9, 9\) "
                       r"in sample 1"),
    ):  # fmt: skip
        bad = c.clone()
        bad[i] = torch.tensor(row)
        with pytest.raises(ValueError, match=r"strictly increasing in lexicographic.*" + msg):
            _select(spread_coords=bad)
        with pytest.raises(ValueError, match=msg):
            _select(spread_coords=bad.to(torch.int32), keep_mass=0.5, keep_ratio=None)


def test_composite_spread_coords_errors():
    good = torch.tensor([[0, 0, c] for c in range(5)] + [[0, 0, c] for c in range(3)])
    _composite(spread_coords=good)
    bad = good.clone()
    bad[6] = torch.tensor([0, 0, 0])  # sample 1: (0,0,0) after (0,0,0)
    with pytest.raises(ValueError, match=r"spread_coords\[5\] = \(0, 0, 0\) >= spread_coords\[6\]"):
        _composite(spread_coords=bad)
    with pytest.raises(ValueError, match=r"spread_coords must be \[total_v, 3\] = \[8, 3\]"):
        _composite(spread_coords=good[:7])
    with pytest.raises(TypeError, match=r"spread_coords must be int32 or int64"):
        _composite(spread_coords=good.double())
    # The offsets' own error comes first, whatever the coordinates.
    with pytest.raises(ValueError, match=r"cu_seqlens_v must be non-decreasing"):
        tp.select_topk(torch.randn(8), torch.tensor([0, 9, 8]), keep_ratio=0.5,
                       spread_coords=bad, spread_radius=1)  # fmt: skip


def test_device_mask_agrees_with_the_order_rule():
    """Random small coordinates (repeats and decreases everywhere): select_topk raises exactly
    when some sample's coordinates do not strictly increase (checked here in plain Python), so
    the one-read device mask lets nothing through and flags nothing wrongly."""
    gen = torch.Generator().manual_seed(21)
    raised = passed = 0
    for _ in range(60):
        sizes = torch.randint(0, 5, (int(torch.randint(1, 4, (1,), generator=gen)),),
                              generator=gen).tolist()  # fmt: skip
        n = sum(sizes)
        coords = torch.randint(0, 2, (n, 3), generator=gen)
        if bool(torch.rand(1, generator=gen) < 0.5):  # mostly sorted: valid cases too
            for b in range(len(sizes)):
                lo, hi = sum(sizes[:b]), sum(sizes[: b + 1])
                keys = [tuple(c) for c in coords[lo:hi].tolist()]
                order = sorted(range(hi - lo), key=lambda i, k=keys: k[i])
                coords[lo:hi] = coords[lo:hi][order]
        cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
        rows = coords.tolist()
        ok = all(
            tuple(rows[i]) > tuple(rows[i - 1])
            for b in range(len(sizes))
            for i in range(int(cu[b]) + 1, int(cu[b + 1]))
        )
        call = lambda c=coords, cu=cu, n=n: tp.select_topk(  # noqa: E731
            torch.randn(n), cu, keep_ratio=0.5, spread_coords=c, spread_radius=1
        )
        if ok:
            call()
            passed += 1
        else:
            with pytest.raises(ValueError, match="spread_coords must be strictly increasing"):
                call()
            raised += 1
    assert raised > 10 and passed > 10
