"""Stage e: the composites equal the stages chained by hand, on every backend."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend, reference
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import make_inputs, strided

LAYOUTS = [
    [("t", 3), ("v", 29), ("t", 2), ("v", 13), ("q", 4), ("t", 2)],
    [("t", 2), ("q", 3)],
    [("t", 1), ("v", 2), ("q", 1)],
    [("v", 97), ("q", 7)],
]


def _small_mapper(gen) -> TokenMapper:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return TokenMapper(MapperConfig(channels=(4, 8, 8, 16, 16), kernel_size=5)).eval()


@pytest.mark.parametrize("backend_name", ["auto", "ref"])
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_visual_tokens_equals_chain(backend_name, use_mapper, dtype, gen):
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen)
    params = _small_mapper(gen).op_params() if use_mapper else []
    attn = reference.instruction_attention_ref(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v
    )
    scores = (
        reference.mapper_forward_ref(attn, inp.cu_seqlens_v, params, 5, 1e-4) if params else attn
    )
    counts = reference.keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.25)
    kept, cu_kept = reference.select_topk_ref(scores, inp.cu_seqlens_v, counts)
    with backend.use_backend(backend_name), torch.no_grad():
        out = tp.prune_visual_tokens(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.visual_embeds, inp.visual_position_ids, params, keep_ratio=0.25,
        )  # fmt: skip
    assert torch.equal(out[2], kept) and torch.equal(out[3], cu_kept)
    assert torch.equal(out[0], inp.visual_embeds[kept])
    assert torch.equal(out[1], inp.visual_position_ids[:, kept])
    torch.testing.assert_close(out[4], scores)


@pytest.mark.parametrize("backend_name", ["auto", "ref"])
@pytest.mark.parametrize("keep", [{"keep_ratio": 0.5}, {"keep_count": 2}, {"keep_ratio": 1.0}])
def test_prune_and_merge_equals_chain(backend_name, keep, gen):
    inp = make_inputs(LAYOUTS, generator=gen)
    params = _small_mapper(gen).op_params()
    with backend.use_backend(backend_name), torch.no_grad():
        out = tp.prune_and_merge(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, inp.position_ids,
            inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, params,
            q_pos=inp.q_pos, **keep,
        )  # fmt: skip
        pruned = tp.prune_visual_tokens(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.visual_embeds, inp.visual_position_ids, params, **keep,
        )  # fmt: skip
    kept = pruned[2]
    want = reference.merge_kept_ref(
        inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
        inp.cu_seqlens_v, kept,
    )  # fmt: skip
    assert torch.equal(out[4], kept)
    for g, w in zip(out[:4], want, strict=True):
        assert torch.equal(g, w)
    if keep.get("keep_ratio") == 1.0:
        assert out[0].shape[0] == inp.inputs_embeds.shape[0]


@pytest.mark.parametrize("backend_name", ["auto", "ref"])
def test_empty_batch(backend_name):
    """B = 0 (cu_seqlens = [0]) is an empty batch, not an error, on every op."""
    cu = torch.tensor([0])
    idx = torch.zeros(0, dtype=torch.int64)
    q, k = torch.zeros(0, 2, 4), torch.zeros(0, 1, 4)
    with backend.use_backend(backend_name):
        attn = tp.instruction_attention(q, k, cu, cu, idx, cu)
        kept, cu_kept = tp.select_topk(attn, cu, keep_ratio=0.5)
        out = tp.prune_and_merge(
            q, k, cu, cu, torch.zeros(0, 8), torch.zeros(3, 0, dtype=torch.int64), cu,
            torch.zeros(0, 8), idx, cu, keep_ratio=0.5,
        )  # fmt: skip
    assert attn.shape == (0,) and kept.shape == (0,) and cu_kept.tolist() == [0]
    assert out[0].shape == (0, 8) and out[1].shape == (3, 0) and out[2].tolist() == [0]


def every_backend(op: str) -> list[str]:
    """The backends that run ``op`` on CPU tensors here (Triton: the interpreter)."""
    return [b for b in ("ref", "cpp", "triton") if backend.implemented(op, b, "cpu")]


@pytest.mark.parametrize("backend_name", every_backend("select_topk"))
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
def test_composites_strided_inputs(backend_name, use_mapper, gen):
    """Every argument a non-contiguous view: both composites equal the reference's results."""
    layouts = [[("t", 1), ("v", 2), ("q", 2)], [("v", 3), ("q", 1)], [("t", 2), ("q", 1)]]
    inp = make_inputs(layouts, generator=gen, qk_std=1.5)
    params = _small_mapper(gen).op_params() if use_mapper else []
    params = [p.detach() for p in params]
    keep = {"keep_count": 1}
    prune = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
             inp.visual_embeds, inp.visual_position_ids)  # fmt: skip
    merge = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, inp.position_ids,
             inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v)  # fmt: skip
    with torch.no_grad():
        with backend.use_backend("ref"):
            want_prune = tp.prune_visual_tokens(*prune, params, q_pos=inp.q_pos, **keep)
            want_merge = tp.prune_and_merge(*merge, params, q_pos=inp.q_pos, **keep)
        s = inp.strided()
        with backend.use_backend(backend_name):
            # cu_seqlens_v = [0, 2, 5, 5] as a view whose flat memory reads [0, 9, 2, 9].
            cu_v = torch.tensor([0, 9, 2, 9, 5, 9, 5])[::2]
            got_prune = tp.prune_visual_tokens(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, cu_v, s.visual_embeds,
                s.visual_position_ids, [strided(p) for p in params], q_pos=s.q_pos, **keep,
            )  # fmt: skip
            got_merge = tp.prune_and_merge(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.inputs_embeds, s.position_ids,
                s.cu_seqlens, s.visual_embeds, s.visual_idx, cu_v, [strided(p) for p in params],
                q_pos=s.q_pos, **keep,
            )  # fmt: skip
    for got, want in ((got_prune, want_prune), (got_merge, want_merge)):
        for g, w in zip(got[:-1], want[:-1], strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)
        torch.testing.assert_close(got[-1], want[-1], rtol=2e-4, atol=2e-5)
