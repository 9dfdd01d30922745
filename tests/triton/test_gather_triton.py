"""Triton stage d (tokenprune_kernels/triton/gather.py) against the reference: gather, merge and
both fed by the selection. Outputs must equal the reference's bit for bit. Runs in the interpreter
on a CPU machine (small shapes, small select chunks), on the GPU when there is one. Every buffer
the module allocates is poisoned first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


from tokenprune_kernels.reference import (
    gather_kept_ref,
    keep_counts_ref,
    merge_kept_ref,
    select_topk_ref,
)
from tokenprune_kernels.testing import make_inputs, planted_scores
from tokenprune_kernels.triton import gather as gat

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("poisoned_buffers")]

SCHEDULES = [False, True]  # serial, wide
FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # bf16 -> fp32 is exact in the interpreter


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
    assert_same(gat.gather_kept_triton(*moved((inp.visual_embeds, pos, kept), device)), want)


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
        assert_same(gat.merge_kept_triton(*moved((*args, kept), device)),
                    merge_kept_ref(*args, kept))  # fmt: skip


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize(
    "dtype,index_dtype,rows", [(torch.float32, torch.int32, 3), (torch.float16, torch.int64, 1)]
)
def test_select_merge_matches_reference(wide, dtype, index_dtype, rows, device, gen):
    inp, args = merge_args(dtype, index_dtype, rows, gen)
    scores = planted_scores(inp.visual_idx.numel(), dtype, gen)
    for ratio in (0.3, 1.0):
        counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=ratio)
        kept, _ = select_topk_ref(scores, inp.cu_seqlens_v, counts)
        want = (*merge_kept_ref(*args, kept), kept)
        got = gat.select_merge_triton(
            *moved((scores, inp.cu_seqlens_v, counts, *args[:5]), device), block_v=32, wide=wide
        )
        assert_same(got, want)


@pytest.mark.parametrize("wide", SCHEDULES, ids=["serial", "wide"])
@pytest.mark.parametrize("rows", [1, 3])
def test_select_gather_matches_reference(wide, rows, device, gen):
    inp = make_inputs(LAYOUTS, hidden=24, dtype=torch.float16, generator=gen)
    pos = inp.visual_position_ids if rows == 3 else inp.visual_position_ids[2]
    scores = planted_scores(inp.visual_idx.numel(), torch.float32, gen)
    counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.45)
    kept, cu_kept = select_topk_ref(scores, inp.cu_seqlens_v, counts)
    want = (*gather_kept_ref(inp.visual_embeds, pos, kept), kept, cu_kept)
    got = gat.select_gather_triton(
        *moved((scores, inp.cu_seqlens_v, counts, inp.visual_embeds, pos), device), block_v=32,
        wide=wide,
    )  # fmt: skip
    assert_same(got, want)


def test_production_sizes_once(device, gen):
    """Production chunk sizes end to end: the fused paths with the default schedule."""
    layouts = [[("t", 7), ("v", 2500), ("q", 5)], [("t", 3), ("q", 2)], [("v", 40), ("q", 1)]]
    inp, args = merge_args(torch.bfloat16, torch.int64, 3, gen, hidden=16, layouts=layouts)
    scores = planted_scores(inp.visual_idx.numel(), torch.float16, gen, levels=30)
    counts = keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.25)
    kept, cu_kept = select_topk_ref(scores, inp.cu_seqlens_v, counts)
    got = gat.select_merge_triton(*moved((scores, inp.cu_seqlens_v, counts, *args[:5]), device))
    assert_same(got, (*merge_kept_ref(*args, kept), kept))
    got = gat.select_gather_triton(*moved((scores, inp.cu_seqlens_v, counts, args[3],
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
    assert_same(gat.merge_kept_triton(*moved(strided, device)), merge_kept_ref(*args, kept))

    text = make_inputs([[("t", 4), ("q", 2)], [("q", 3)]], hidden=8, generator=gen)
    none = torch.zeros(0, dtype=torch.int64)
    args = (text.inputs_embeds, text.position_ids, text.cu_seqlens, text.visual_embeds,
            text.visual_idx, text.cu_seqlens_v)  # fmt: skip
    assert_same(gat.merge_kept_triton(*moved((*args, none), device)), merge_kept_ref(*args, none))
    counts = torch.zeros(2, dtype=torch.int64)
    got = gat.select_merge_triton(*moved((torch.empty(0), text.cu_seqlens_v, counts, *args[:5]),
                                         device))  # fmt: skip
    assert_same(got, (*merge_kept_ref(*args, none), none))
