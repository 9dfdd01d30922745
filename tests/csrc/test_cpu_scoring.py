"""The compiled CPU kernels of the scoring stages (``_instruction_attention``, ``_mapper_forward``)
against the plain-PyTorch reference, on awkward ragged shapes, every dtype and strided views.

Tolerances (the kernels and the reference compute from the same inputs, in float32):
- attention: ``rtol=1e-5, atol=1e-9``. The GEMM accumulates in a different order (and bf16
  tiles through bf16 dot products with fp32 accumulation, exact products), the exponential is our
  own (within 2 ulp); measured errors stay below 1e-6 relative.
- mapper: ``rtol=1e-5, atol=2e-5`` on logits of magnitude ~1: GEMM and conv summation orders,
  LayerNorm and SiLU differ in the last bits and the five blocks compound them.
Selections downstream must be identical wherever the scores are not near-tied.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.reference import instruction_attention_ref, mapper_forward_ref
from tokenprune_kernels.testing import make_inputs, simple_layout

pytestmark = pytest.mark.usefixtures("compiled_ext")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATTN_TOL = {"rtol": 1e-5, "atol": 1e-9}
MAPPER_TOL = {"rtol": 1e-5, "atol": 2e-5}


def ops():
    return torch.ops.tokenprune


# --------------------------------------------------------------------------------------------
# _instruction_attention

ATTN_LAYOUTS = {
    "one_visual": [simple_layout(1, 1, n_system=0)],
    "ragged_with_empty": [
        [("t", 3), ("v", 5), ("t", 2), ("v", 4), ("q", 3), ("t", 2)],
        [],  # an empty sample
        [("t", 2), ("q", 2)],  # no visual tokens
        [("v", 131), ("q", 1)],
        [("t", 1), ("v", 2), ("q", 5)],
    ],
    # Queries before and between images: a visual key after a query is masked for it.
    "interleaved_queries": [[("t", 2), ("q", 2), ("v", 6), ("q", 3), ("v", 3), ("q", 1)]],
    # Several key tiles, a partial last one, the causal mask inside a tile.
    "primes_long": [simple_layout(4099, 7, n_system=13, n_after=3), simple_layout(257, 3)],
}
HEADS = {"gqa": (28, 4), "mha": (3, 3), "mqa": (6, 1)}


def _attention_args(inp, q_pos):
    return (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.q_pos if q_pos else None)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("layout", ATTN_LAYOUTS.keys())
def test_attention_matches_reference(layout, heads, dtype, gen):
    head_dim = {"one_visual": 1, "ragged_with_empty": 7, "interleaved_queries": 16}.get(layout, 64)
    inp = make_inputs(
        ATTN_LAYOUTS[layout], heads_q=heads[0], heads_k=heads[1], head_dim=head_dim,
        dtype=dtype, generator=gen, qk_std=2.0,
    )  # fmt: skip
    args = _attention_args(inp, q_pos=not inp.queries_last)
    got = ops()._instruction_attention(*args)
    want = instruction_attention_ref(*args)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **ATTN_TOL)
    if inp.queries_last:  # q_pos given explicitly: the same positions, the same result
        assert torch.equal(ops()._instruction_attention(*_attention_args(inp, True)), got)


def _with_threads(n: int, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_rows_split_over_the_scratch(dtype, gen):
    """n_q * G rows times N_v above the scratch budget (8 MiB): the first sample's rows split in
    two items; the items fill three waves, so the third reuses the first's scratch buffer."""
    layouts = [simple_layout(2053, 37, n_system=5), simple_layout(11, 2),
               simple_layout(601, 40), simple_layout(1999, 37)]  # fmt: skip
    inp = make_inputs(layouts, heads_q=28, heads_k=1, head_dim=8, dtype=dtype, generator=gen)
    args = _attention_args(inp, q_pos=False)
    got = ops()._instruction_attention(*args)
    torch.testing.assert_close(got, instruction_attention_ref(*args), **ATTN_TOL)
    for threads in (1, 3):
        assert torch.equal(_with_threads(threads, lambda: ops()._instruction_attention(*args)), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_strided_views_and_scale(dtype, gen):
    """q with a non-unit last stride, k a permuted view (and one with a non-unit last stride)."""
    inp = make_inputs(ATTN_LAYOUTS["ragged_with_empty"], heads_q=4, heads_k=2, head_dim=10,
                      dtype=dtype, generator=gen)  # fmt: skip
    q = torch.stack([inp.q, torch.zeros_like(inp.q)], dim=-1)[..., 0]  # last stride 2
    k_perm = inp.k.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [Tk, Hk, D], stride(0) = D
    k_step = torch.stack([inp.k, torch.ones_like(inp.k)], dim=-1)[..., 0]
    assert not q.is_contiguous() and not k_perm.is_contiguous() and k_step.stride(2) == 2
    rest = (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v, inp.q_pos)
    want = instruction_attention_ref(inp.q, inp.k, *rest, 0.37)
    for k in (k_perm, k_step):
        got = ops()._instruction_attention(q, k, *rest, 0.37)
        torch.testing.assert_close(got, want, **ATTN_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_does_not_depend_on_the_thread_count(dtype, gen):
    inp = make_inputs([simple_layout(1031, 9), simple_layout(300, 4), simple_layout(77, 2)],
                      heads_q=8, heads_k=2, head_dim=32, dtype=dtype, generator=gen)  # fmt: skip
    args = _attention_args(inp, q_pos=False)
    results = [_with_threads(n, lambda: ops()._instruction_attention(*args)) for n in (1, 2, 3)]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_attention_bad_values_are_named():
    inp = make_inputs([simple_layout(5, 2, n_system=1)], heads_q=2, heads_k=1, head_dim=4)
    q, k, cq, ck, vidx, cv = _attention_args(inp, False)[:6]
    op = ops()._instruction_attention
    with pytest.raises(ValueError, match=r"visual_idx\[4\] = 99 is outside sample 0"):
        op(q, k, cq, ck, torch.tensor([1, 2, 3, 4, 99]), cv)
    with pytest.raises(ValueError, match="visual_idx must increase strictly"):
        op(q, k, cq, ck, torch.tensor([1, 2, 2, 3, 4]), cv)
    with pytest.raises(ValueError, match=r"q_pos\[1\] = 8 is outside sample 0"):
        op(q, k, cq, ck, vidx, cv, torch.tensor([6, 8]))
    with pytest.raises(ValueError, match="has 5 visual tokens but no instruction queries"):
        op(q[:0], k, torch.tensor([0, 0]), ck, vidx, cv)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        op(q, k.double(), cq, ck, vidx, cv)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number > 0"):
        op(q, k, cq, ck, vidx, cv, None, -1.0)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal Tk"):
        op(q, k[:-1], cq, ck, vidx, cv)


# --------------------------------------------------------------------------------------------
# _mapper_forward

MAPPER_COUNTS = {
    "one_token": [1],
    "ragged_with_empty": [0, 1, 2, 5, 0, 131, 7, 0],
    # sample edges inside windows (128 tokens) and inside their halos
    "window_edges": [300, 0, 257, 1, 128, 129, 3],
    "long": [4099],
}
CHANNELS = {"method": (32, 64, 128, 256, 512), "odd_widths": (3, 17, 33), "one_block": (5,),
            "deep": (16,) * 7}  # fmt: skip


def _mapper(channels, kernel_size: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(sum(channels) + kernel_size)
    model = TokenMapper(MapperConfig(channels=channels, kernel_size=kernel_size)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return [p.detach() for p in model.op_params()]


def _attn(counts: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(counts) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(counts), 0)
    attn = torch.rand(int(cu[-1]), generator=gen) ** 3 / max(1, max(counts))
    attn[torch.rand(attn.shape, generator=gen) < 0.05] = 0.0  # log(eps) inputs
    return attn, cu


@pytest.mark.parametrize("channels", CHANNELS.values(), ids=CHANNELS.keys())
@pytest.mark.parametrize("counts", MAPPER_COUNTS.keys())
def test_mapper_matches_reference(counts, channels, gen):
    attn, cu = _attn(MAPPER_COUNTS[counts], gen)
    params = _mapper(channels)
    got = ops()._mapper_forward(attn, cu, params, 5, 1e-4)
    want = mapper_forward_ref(attn, cu, params, 5, 1e-4)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **MAPPER_TOL)


@pytest.mark.parametrize("kernel_size", [1, 3, 7, 21])
def test_mapper_kernel_sizes_and_int32_offsets(kernel_size, gen):
    """K = 21 with 5 blocks: a 50-token halo, wider than most samples here."""
    attn, cu = _attn([2, 13, 0, 97, 40, 1], gen)
    params = _mapper((8, 24, 16, 40, 8), kernel_size)
    got = ops()._mapper_forward(attn, cu.int(), params, kernel_size, 3e-3)
    want = mapper_forward_ref(attn, cu, params, kernel_size, 3e-3)
    torch.testing.assert_close(got, want, **MAPPER_TOL)


def test_mapper_strided_attn_and_non_contiguous_params(gen):
    attn, cu = _attn([7, 300, 19], gen)
    strided = torch.stack([attn, -torch.ones_like(attn)], dim=-1)[:, 0]
    params = _mapper((4, 9))
    transposed = [p.t().contiguous().t() if p.dim() == 2 else p for p in params]
    assert not strided.is_contiguous() and not transposed[8].is_contiguous()
    want = mapper_forward_ref(attn, cu, params, 5, 1e-4)
    torch.testing.assert_close(ops()._mapper_forward(strided, cu, transposed, 5, 1e-4), want,
                               **MAPPER_TOL)  # fmt: skip


def test_mapper_samples_are_independent(gen):
    """Per-sample zero padding: a sample's logits are the same alone and between others."""
    counts = [3, 200, 1, 150]
    attn, cu = _attn(counts, gen)
    params = _mapper(CHANNELS["method"])
    packed = ops()._mapper_forward(attn, cu, params, 5, 1e-4)
    for b, n in enumerate(counts):
        alone = ops()._mapper_forward(attn[cu[b] : cu[b + 1]], torch.tensor([0, n]), params, 5,
                                      1e-4)  # fmt: skip
        torch.testing.assert_close(packed[cu[b] : cu[b + 1]], alone, rtol=1e-6, atol=1e-6)


def test_mapper_does_not_depend_on_the_thread_count(gen):
    attn, cu = _attn([1000, 3, 517], gen)
    params = _mapper(CHANNELS["method"])
    results = [
        _with_threads(n, lambda: ops()._mapper_forward(attn, cu, params, 5, 1e-4))
        for n in (1, 2, 3)
    ]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_mapper_bad_arguments_are_named(gen):
    attn, cu = _attn([4, 5], gen)
    params = _mapper((4, 8))
    op = ops()._mapper_forward
    with pytest.raises(TypeError, match="attn must be float32"):
        op(attn.double(), cu, params, 5, 1e-4)
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        op(attn, cu, params, 4, 1e-4)
    with pytest.raises(ValueError, match="input_eps must be a finite float > 0"):
        op(attn, cu, params, 5, 0.0)
    with pytest.raises(ValueError, match=r"params\[2\] must have shape \[C_out, 1\], got \[1, 4\]"):
        op(attn, cu, [*params[:2], params[2].t(), *params[3:]], 5, 1e-4)
    with pytest.raises(ValueError, match="params must hold 6 tensors per block"):
        op(attn, cu, params[:-1], 5, 1e-4)
    with pytest.raises(TypeError, match=r"params\[1\] must be float32"):
        op(attn, cu, [params[0], params[1].double(), *params[2:]], 5, 1e-4)
    with pytest.raises(ValueError, match=r"cu_seqlens_v\[-1\] must equal Tv"):
        op(attn, cu[:-1], params, 5, 1e-4)


# --------------------------------------------------------------------------------------------
# The public ops on the compiled backend: the same selections as the reference.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_prune_and_merge_selects_like_the_reference(keep_ratio, dtype, gen):
    layouts = [simple_layout(997, 32, n_after=5), [("t", 2), ("q", 3)], simple_layout(61, 7)]
    inp = make_inputs(layouts, heads_q=28, heads_k=4, head_dim=128, hidden=48, dtype=dtype,
                      generator=gen, qk_std=1.5)  # fmt: skip
    params = _mapper(CHANNELS["method"])
    args = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds,
            inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
            inp.cu_seqlens_v, params)  # fmt: skip
    assert backend.choose("instruction_attention", "cpu") == "cpp"
    assert backend.choose("mapper_forward", "cpu") == "cpp"
    got = tp.prune_and_merge(*args, keep_ratio=keep_ratio)
    with backend.use_backend("ref"):
        want = tp.prune_and_merge(*args, keep_ratio=keep_ratio)
    scores, ref_scores = got[5], want[5]
    torch.testing.assert_close(scores, ref_scores, **MAPPER_TOL)
    # Well separated at every sample's cut: the score difference is far below the margin.
    error = float((scores - ref_scores).abs().max())
    bounds = inp.cu_seqlens_v.tolist()
    for b in range(len(bounds) - 1):
        s = torch.sort(ref_scores[bounds[b] : bounds[b + 1]], descending=True).values
        n = s.numel()
        keep = min(max(int(keep_ratio * n + 0.5), 1), n)
        if 0 < keep < n:
            assert float(s[keep - 1] - s[keep]) > 10 * error, (b, keep)
    for i in (0, 1, 2, 3, 4):  # embeds, positions, offsets, source rows, kept indices
        assert torch.equal(got[i], want[i]), i
