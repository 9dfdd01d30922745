"""Stage d and the merge: the reference against naive per-sample loops, every backend of the op
table against it (bit for bit: they are copies)."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.reference import gather_kept_ref, merge_kept_ref
from tokenprune_kernels.testing import backend_params, make_inputs, strided

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GATHER_BACKENDS = backend_params("gather_kept")
MERGE_BACKENDS = backend_params("merge_kept")
LAYOUTS = [
    [("t", 3), ("v", 5), ("t", 2), ("v", 4), ("q", 3), ("t", 2)],
    [("t", 1), ("v", 1), ("q", 2)],
    [("t", 2), ("q", 2)],  # no visual tokens
    [("v", 37), ("q", 1)],
    [("t", 4), ("v", 131), ("q", 5), ("t", 3)],
]


def random_kept(cu_v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random ascending subset per sample (possibly empty, possibly all)."""
    kept = []
    bounds = cu_v.tolist()
    for b in range(len(bounds) - 1):
        n = bounds[b + 1] - bounds[b]
        mask = torch.rand(n, generator=gen) < torch.rand(1, generator=gen)
        kept.append(torch.nonzero(mask).flatten() + bounds[b])
    return torch.cat(kept).to(torch.int64)


def naive_merge(inp, kept):
    """Per sample, walk the sequence: text rows always, visual rows if kept."""
    kept_set = set(kept.tolist())
    cu_l, cu_v = inp.cu_seqlens.tolist(), inp.cu_seqlens_v.tolist()
    rows, src, counts = [], [], []
    for b in range(len(cu_l) - 1):
        local_to_v = {int(inp.visual_idx[v]): v for v in range(cu_v[b], cu_v[b + 1])}
        count = 0
        for r in range(cu_l[b + 1] - cu_l[b]):
            g = cu_l[b] + r
            if r in local_to_v:
                v = local_to_v[r]
                if v not in kept_set:
                    continue
                rows.append(inp.visual_embeds[v])
            else:
                rows.append(inp.inputs_embeds[g])
            src.append(g)
            count += 1
        counts.append(count)
    cu_out = torch.tensor([0, *torch.cumsum(torch.tensor(counts), 0).tolist()])
    embeds = torch.stack(rows) if rows else inp.inputs_embeds[:0]
    src = torch.tensor(src, dtype=torch.int64)
    return embeds, inp.position_ids[:, src], cu_out, src


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_reference_matches_naive(dtype, gen):
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen)
    kept = random_kept(inp.cu_seqlens_v, gen)
    got = merge_kept_ref(
        inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
        inp.cu_seqlens_v, kept,
    )  # fmt: skip
    want = naive_merge(inp, kept)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w.to(g.dtype))


def merged(backend_name: str, device: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``merge_kept`` on ``backend_name``, the arguments moved to ``device``, results on the CPU."""
    with backend.use_backend(backend_name):
        out = tp.merge_kept(*(t.to(device) for t in args))
    return tuple(t.cpu() for t in out)


def gathered(backend_name: str, device: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``gather_kept`` on ``backend_name``, as :func:`merged`."""
    with backend.use_backend(backend_name):
        out = tp.gather_kept(*(t.to(device) for t in args))
    return tuple(t.cpu() for t in out)


@pytest.mark.parametrize(("backend_name", "device"), MERGE_BACKENDS)
def test_merge_with_everything_kept_is_masked_scatter(backend_name, device, gen):
    inp = make_inputs(LAYOUTS, generator=gen)
    mask = torch.zeros(inp.inputs_embeds.shape[0], dtype=torch.bool)
    seg = torch.repeat_interleave(torch.arange(len(LAYOUTS)), torch.diff(inp.cu_seqlens_v))
    mask[inp.cu_seqlens[seg] + inp.visual_idx] = True
    scattered = inp.inputs_embeds.masked_scatter(mask[:, None], inp.visual_embeds)
    all_kept = torch.arange(inp.visual_idx.shape[0])
    embeds, pos, cu_out, src = merged(
        backend_name, device, inp.inputs_embeds, inp.position_ids, inp.cu_seqlens,
        inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, all_kept,
    )  # fmt: skip
    assert torch.equal(embeds, scattered)
    assert torch.equal(pos, inp.position_ids)
    assert torch.equal(cu_out, inp.cu_seqlens)
    assert torch.equal(src, torch.arange(inp.inputs_embeds.shape[0]))


@pytest.mark.parametrize(("backend_name", "device"), GATHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, 1, 3], ids=["1d", "r1", "mrope"])
def test_gather_backends_match_reference(backend_name, device, dtype, rows, gen):
    """The gather's parity test: every backend's output is the reference's, bit for bit."""
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen)
    pos = inp.visual_position_ids[0] if rows is None else inp.visual_position_ids[:rows]
    kept = random_kept(inp.cu_seqlens_v, gen)
    want = gather_kept_ref(inp.visual_embeds, pos, kept)
    got = gathered(backend_name, device, inp.visual_embeds, pos, kept)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].shape == (*pos.shape[:-1], kept.shape[0])


@pytest.mark.parametrize(("backend_name", "device"), MERGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("one_d", [False, True], ids=["mrope", "1d"])
def test_merge_backends_match_reference(backend_name, device, dtype, index_dtype, one_d, gen):
    """The merge's parity test: every backend's output is the reference's, bit for bit."""
    inp = make_inputs(LAYOUTS, dtype=dtype, index_dtype=index_dtype, generator=gen)
    pos = inp.position_ids[1] if one_d else inp.position_ids
    kept = random_kept(inp.cu_seqlens_v, gen)
    args = (inp.inputs_embeds, pos, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
            inp.cu_seqlens_v, kept)  # fmt: skip
    want = merge_kept_ref(*args)
    got = merged(backend_name, device, *args)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize(("backend_name", "device"), GATHER_BACKENDS)
def test_gather_strided_inputs(backend_name, device, gen):
    """Non-contiguous embeddings, position ids and kept_idx gather what the reference gathers."""
    embeds, pos = gathered(
        backend_name, device, torch.arange(12.0).reshape(6, 2), torch.arange(6),
        torch.tensor([5, 9, 1, 9])[::2],
    )  # fmt: skip
    assert embeds.tolist() == [[10.0, 11.0], [2.0, 3.0]] and pos.tolist() == [5, 1]
    rows = torch.arange(6).expand(3, 6)  # stride 0 along the rows (text-only M-RoPE ids)
    pos = gathered(backend_name, device, torch.zeros(6, 2), rows, torch.tensor([4, 0]))[1]
    assert pos.tolist() == [[4, 0]] * 3
    for dtype in DTYPES:
        inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen)
        kept = random_kept(inp.cu_seqlens_v, gen)
        for pos in (inp.visual_position_ids, inp.visual_position_ids[1]):
            want = gather_kept_ref(inp.visual_embeds, pos, kept)
            for args in (
                (strided(inp.visual_embeds), strided(pos), strided(kept)),
                (inp.visual_embeds.t().contiguous().t(), pos.t().contiguous().t(), kept),
            ):
                got = gathered(backend_name, device, *args)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("backend_name", "device"), MERGE_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_merge_strided_inputs(backend_name, device, index_dtype, gen):
    """Every argument a non-contiguous view: the merge equals the reference's."""
    inp = make_inputs(LAYOUTS, index_dtype=index_dtype, generator=gen)
    kept = random_kept(inp.cu_seqlens_v, gen)
    args = (inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
            inp.cu_seqlens_v, kept)  # fmt: skip
    want = merge_kept_ref(*args)
    got = merged(backend_name, device, *(strided(t) for t in args))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    # Offsets as a strided view: [0, 5, 9] read flat would be [0, 7, 5].
    cu = torch.tensor([0, 7, 5, 7, 9], dtype=index_dtype)[::2]
    embeds = torch.arange(18.0).reshape(9, 2)
    vis = -torch.arange(6.0).reshape(3, 2) - 1
    vidx = torch.tensor([1, 3, 0], dtype=index_dtype)
    cu_v = torch.tensor([0, 2, 3], dtype=index_dtype)
    args = (embeds, torch.arange(9), cu, vis, vidx, cu_v, torch.tensor([1, 2]))
    got = merged(backend_name, device, *args)
    want = merge_kept_ref(*args[:2], cu.contiguous(), *args[3:])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert got[3].tolist() == [0, 2, 3, 4, 5, 6, 7, 8]
