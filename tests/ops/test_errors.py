"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import backend_params, make_inputs

LAYOUT = [[("t", 2), ("v", 7), ("q", 3)], [("t", 1), ("v", 4), ("q", 2)]]


@pytest.fixture
def inp():
    return make_inputs(
        LAYOUT, heads_q=4, heads_k=2, head_dim=8, generator=torch.Generator().manual_seed(3)
    )


def attention(inp, **over):
    args = dict(
        q=inp.q, k=inp.k, cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k,
        visual_idx=inp.visual_idx, cu_seqlens_v=inp.cu_seqlens_v,
    )  # fmt: skip
    args.update(over)
    return tp.instruction_attention(**args)


def merge(inp, kept, **over):
    args = dict(
        inputs_embeds=inp.inputs_embeds, position_ids=inp.position_ids, cu_seqlens=inp.cu_seqlens,
        visual_embeds=inp.visual_embeds, visual_idx=inp.visual_idx, cu_seqlens_v=inp.cu_seqlens_v,
        kept_idx=kept,
    )  # fmt: skip
    args.update(over)
    return tp.merge_kept(**args)


@pytest.mark.parametrize(
    "over,error,match",
    [
        (lambda i: {"q": i.q[:, 0]}, ValueError, r"q must be 3-D \[total_q, heads_q, head_dim\], got a 2-D"),
        (lambda i: {"k": i.k[None]}, ValueError, r"k must be 3-D \[total_k, heads_k, head_dim\], got a 4-D"),
        (lambda i: {"q": i.q[:, :3]}, ValueError, r"query heads must be a multiple of key heads.*q.shape\[1\] = 3 and k.shape\[1\] = 2"),
        (lambda i: {"k": i.k[..., :4]}, ValueError, r"same head_dim.*q.shape\[2\] = 8 and k.shape\[2\] = 4"),
        (lambda i: {"q": i.q.double(), "k": i.k.double()}, TypeError, r"q must be float32, float16 or bfloat16, got float64"),
        (lambda i: {"k": i.k.half()}, TypeError, r"k must have the dtype of q"),
        (lambda i: {"cu_seqlens_q": i.cu_seqlens_q.float()}, TypeError, r"cu_seqlens_q must be int32 or int64, got float32"),
        (lambda i: {"visual_idx": i.visual_idx[None]}, ValueError, r"visual_idx must be 1-D \[total_v\] local key positions, got a 2-D"),
        (lambda i: {"k": i.k.to("meta")}, ValueError, r"one device: q is on cpu but k is on meta"),
        (lambda i: {"cu_seqlens_k": i.cu_seqlens_k[:2]}, ValueError, r"cu_seqlens_k has 2 entries but cu_seqlens_q has 3"),
        (lambda i: {"cu_seqlens_q": torch.tensor([1, 3, 5])}, ValueError, r"cu_seqlens_q must start at 0"),
        (lambda i: {"cu_seqlens_q": torch.tensor([0, 4, 3])}, ValueError, r"cu_seqlens_q must be non-decreasing.*cu_seqlens_q\[1\] = 4 > cu_seqlens_q\[2\] = 3"),
        (lambda i: {"cu_seqlens_v": torch.tensor([0, 7, 10])}, ValueError, r"cu_seqlens_v must end at visual_idx.shape\[0\] = 11, got cu_seqlens_v\[-1\] = 10"),
        (lambda i: {"q_pos": torch.tensor([9, 10, 12, 6, 7])}, ValueError, r"q_pos\[2\] = 12 is outside sample 0's key range \[0, 12\)"),
        (lambda i: {"q_pos": i.q_pos[:3]}, ValueError, r"q_pos must have one entry per query \(5\), got 3"),
        (lambda i: {"visual_idx": i.visual_idx.flip(0)}, ValueError, r"visual_idx must be strictly increasing within each sample"),
        (lambda i: {"visual_idx": i.visual_idx + 20}, ValueError, r"visual_idx\[0\] = 22 is outside sample 0's key sequence \[0, 12\)"),
        (lambda i: {"softmax_scale": -1.0}, ValueError, r"softmax_scale must be a finite number > 0"),
    ],
    ids=[
        "q_rank", "k_rank", "heads_not_multiple", "head_dim_differs", "dtype_float64",
        "dtype_mismatch", "offsets_dtype", "visual_idx_rank", "devices_differ", "batch_mismatch",
        "offsets_not_from_zero", "offsets_decreasing", "offsets_wrong_total", "q_pos_range",
        "q_pos_size", "visual_idx_order", "visual_idx_range", "softmax_scale",
    ],
)  # fmt: skip
def test_instruction_attention_errors(inp, over, error, match):
    with pytest.raises(error, match=match):
        attention(inp, **over(inp))


def test_zero_query_heads_is_an_error(inp):
    """0 heads would average over nothing (NaN); it is refused instead."""
    with pytest.raises(ValueError, match=r"q must have at least one head, got q.shape\[1\] = 0"):
        attention(inp, q=inp.q[:, :0])


def test_sample_without_instruction_tokens_is_an_error():
    inp = make_inputs([[("t", 2), ("v", 5), ("q", 2)], [("t", 3), ("v", 4), ("q", 0)]])
    with pytest.raises(ValueError, match=r"sample 1 has 4 visual tokens but no instruction tokens"):
        attention(inp, q_pos=inp.q_pos)


def test_sample_without_visual_tokens_passes_through():
    inp = make_inputs([[("t", 2), ("q", 2)], [("t", 3), ("v", 4), ("q", 1)]])
    out = tp.prune_and_merge(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, inp.position_ids,
        inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, keep_ratio=0.5,
    )  # fmt: skip
    assert out[2].tolist() == [0, 4, 4 + 4 + 2]  # sample 0 whole; sample 1 keeps 2 of 4
    assert torch.equal(out[0][:4], inp.inputs_embeds[:4])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\], got 0.0"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\], got 1.5"),
        ({"keep_ratio": -0.25}, r"keep_ratio must be in \(0, 1\], got -0.25"),
        ({"keep_ratio": float("nan")}, r"keep_ratio must be in \(0, 1\], got nan"),
        ({"keep_count": 0}, r"keep_count must be >= 1, got 0"),
        ({"keep_count": 5}, r"keep_count must be <= the visual tokens of every sample, got keep_count=5 but sample 1 has 4"),
        ({}, r"give exactly one of keep_ratio, keep_count and keep_mass"),
        ({"keep_ratio": 0.5, "keep_count": 2}, r"give exactly one of keep_ratio, keep_count and keep_mass"),
        ({"keep_ratio": 0.5, "keep_mass": 0.9}, r"give exactly one of keep_ratio, keep_count and keep_mass"),
        ({"keep_mass": 0.0}, r"keep_mass must be in \(0, 1\], got 0.0"),
        ({"keep_mass": 1.5}, r"keep_mass must be in \(0, 1\], got 1.5"),
        ({"keep_mass": float("nan")}, r"keep_mass must be in \(0, 1\], got nan"),
        ({"keep_mass": 0.5, "min_keep_ratio": -0.1}, r"min_keep_ratio must be in \[0, 1\], got -0.1"),
        ({"keep_mass": 0.5, "max_keep_ratio": 0.0}, r"max_keep_ratio must be in \(0, 1\], got 0.0"),
        ({"keep_mass": 0.5, "max_keep_ratio": 1.2}, r"max_keep_ratio must be in \(0, 1\], got 1.2"),
        ({"keep_mass": 0.5, "min_keep_ratio": 0.6, "max_keep_ratio": 0.5},
         r"min_keep_ratio must be <= max_keep_ratio, got min_keep_ratio=0.6 > max_keep_ratio=0.5"),
        ({"keep_ratio": 0.5, "max_keep_ratio": 0.5}, r"min_keep_ratio and max_keep_ratio bound keep_mass only"),
        ({"keep_mass": 0.5, "relevance": "sum"}, r"relevance must be one of 'softmax', 'normalize', got 'sum'"),
    ],
)  # fmt: skip
def test_select_errors(inp, kw, match):
    scores = torch.randn(inp.visual_idx.shape[0])
    with pytest.raises(ValueError, match=match):
        tp.select_topk(scores, inp.cu_seqlens_v, **kw)


def test_mass_normalize_needs_masses(inp):
    """relevance='normalize' reads the scores as masses: a negative or infinite one is an error
    (naming the first), NaN is not (it ranks last and weighs nothing)."""
    scores = torch.rand(inp.visual_idx.shape[0])
    scores[3] = float("nan")
    assert tp.mass_keep_counts(scores, inp.cu_seqlens_v, 0.5, relevance="normalize").shape == (2,)
    for bad in (-0.5, float("inf")):
        scores[5] = bad
        match = rf"scores must be finite and >= 0 \(or NaN\) .*got scores\[5\] = {bad}"
        with pytest.raises(ValueError, match=match):
            tp.select_topk(scores, inp.cu_seqlens_v, keep_mass=0.5, relevance="normalize")
        with pytest.raises(ValueError, match=match):
            tp.mass_keep_counts(scores, inp.cu_seqlens_v, 0.5, relevance="normalize")
    # softmax reads logits: any value
    assert tp.select_topk(scores, inp.cu_seqlens_v, keep_mass=0.5)[1].shape == (3,)


def test_select_dtype_and_rank_errors(inp):
    with pytest.raises(TypeError, match=r"scores must be float32, float16 or bfloat16, got int64"):
        tp.select_topk(torch.arange(11), inp.cu_seqlens_v, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"scores must be 1-D \[total_v\], got a 2-D"):
        tp.select_topk(torch.randn(11, 1), inp.cu_seqlens_v, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"cu_seqlens_v must end at scores.shape\[0\] = 10"):
        tp.select_topk(torch.randn(10), inp.cu_seqlens_v, keep_ratio=0.5)


def test_gather_errors(inp):
    kept = torch.tensor([0, 3, 10])
    with pytest.raises(
        ValueError, match=r"kept_idx must index the 11 visual tokens, got an entry 11"
    ):
        tp.gather_kept(inp.visual_embeds, inp.visual_position_ids, torch.tensor([0, 11]))
    with pytest.raises(TypeError, match=r"kept_idx must be int64, got torch.int32"):
        tp.gather_kept(inp.visual_embeds, inp.visual_position_ids, kept.int())
    with pytest.raises(
        ValueError, match=r"position_ids must have one column per visual token \(11\)"
    ):
        tp.gather_kept(inp.visual_embeds, inp.visual_position_ids[:, :5], kept)
    with pytest.raises(
        ValueError,
        match=r"position_ids must be 1-D or 2-D \[total_v\] or \[rows, total_v\], got a 3-D",
    ):
        tp.gather_kept(inp.visual_embeds, inp.visual_position_ids[None], kept)
    with pytest.raises(
        TypeError, match=r"visual_embeds must be float32, float16 or bfloat16, got float64"
    ):
        tp.gather_kept(inp.visual_embeds.double(), inp.visual_position_ids, kept)


def test_merge_errors(inp):
    kept = torch.tensor([0, 3, 10])
    with pytest.raises(
        ValueError, match=r"visual_embeds must have the hidden size of inputs_embeds \(32\), got 16"
    ):
        merge(inp, kept, visual_embeds=inp.visual_embeds[:, :16])
    with pytest.raises(TypeError, match=r"visual_embeds must have the dtype of inputs_embeds"):
        merge(inp, kept, visual_embeds=inp.visual_embeds.half())
    with pytest.raises(
        ValueError, match=r"visual_idx must have one entry per row of visual_embeds \(11\), got 10"
    ):
        merge(inp, kept, visual_idx=inp.visual_idx[:10])
    with pytest.raises(ValueError, match=r"cu_seqlens must end at inputs_embeds.shape\[0\] = 19"):
        merge(inp, kept, cu_seqlens=torch.tensor([0, 12, 18]))
    with pytest.raises(
        ValueError, match=r"visual_idx\[7\] = 7 is outside sample 1's sequence \[0, 7\)"
    ):
        merge(inp, kept, visual_idx=torch.tensor([2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10]))


@pytest.mark.parametrize(
    ("backend_name", "device"),
    [pytest.param("auto", "cpu", id="auto"), *backend_params("merge_kept")],
)
def test_merge_needs_ascending_kept_idx_on_every_backend(inp, backend_name, device):
    """The op checks before any backend runs (``device``: where the backend would run; the error
    comes first, whatever the tensors' device)."""
    from tokenprune_kernels import backend

    with (
        backend.use_backend(backend_name),
        pytest.raises(
            ValueError,
            match=r"kept_idx must be strictly increasing.*kept_idx\[1\] = 3 >= kept_idx\[2\] = 1",
        ),
    ):
        merge(inp, torch.tensor([0, 3, 1]))


def test_mapper_errors(inp):
    attn = torch.rand(inp.visual_idx.shape[0])
    with pytest.raises(ValueError, match=r"kernel_size must be an odd int >= 1, got 4"):
        tp.mapper_forward(attn, inp.cu_seqlens_v, [torch.zeros(1)] * 8, kernel_size=4)
    with pytest.raises(
        ValueError, match=r"params must hold 6 tensors per block plus 2 for the head.*got 7"
    ):
        tp.mapper_forward(attn, inp.cu_seqlens_v, [torch.zeros(1)] * 7)
    with pytest.raises(TypeError, match=r"attn must be float32, got torch.float16"):
        tp.mapper_forward(attn.half(), inp.cu_seqlens_v, [torch.zeros(1)] * 8)
    params = [p.detach() for p in TokenMapper(MapperConfig(channels=(2, 4))).op_params()]
    params[8] = torch.zeros(4, 3)  # block 1's pointwise weight must be [4, 2]
    with pytest.raises(ValueError, match=r"params\[8\] \(blocks.1.pw.weight\)"):
        tp.mapper_forward(attn, inp.cu_seqlens_v, params, kernel_size=5)


def test_mapper_rejects_negative_attention(inp):
    """A negative attention value would become NaN in log(n * attn + eps): refused instead."""
    params = [p.detach() for p in TokenMapper(MapperConfig(channels=(2, 4))).op_params()]
    attn = torch.rand(inp.visual_idx.shape[0])
    attn[5] = -0.25
    with pytest.raises(
        ValueError, match=r"attn must be >= 0 \(attention probabilities\), got attn\[5\] = -0.25"
    ):
        tp.mapper_forward(attn, inp.cu_seqlens_v, params)


@pytest.mark.parametrize("backend_name", ["ref", "auto"])
@pytest.mark.parametrize(
    "config,match",
    [
        ({"mapper_kernel_size": 4}, r"kernel_size must be an odd int >= 1, got 4"),
        ({"mapper_input_eps": 0.0}, r"input_eps must be a finite float > 0, got 0.0"),
    ],
)
def test_composite_checks_mapper_config(inp, backend_name, config, match):
    from tokenprune_kernels import backend

    params = [p.detach() for p in TokenMapper(MapperConfig(channels=(2, 4))).op_params()]
    with backend.use_backend(backend_name), pytest.raises(ValueError, match=match):
        tp.prune_visual_tokens(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.visual_embeds, inp.visual_position_ids, params, keep_ratio=0.5, **config,
        )  # fmt: skip


def test_unknown_backend_is_an_error(inp, monkeypatch):
    monkeypatch.setenv("TOKENPRUNE_BACKEND", "fast")
    with pytest.raises(
        ValueError,
        match=r"TOKENPRUNE_BACKEND must be one of auto, ref, cpp, cuda, triton; got 'fast'",
    ):
        attention(inp)
