"""The public ops on the Triton backend: same results as the reference, fused composites included.

Runs the kernels in the interpreter on the CPU (tiny shapes) and natively on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend, reference
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import make_inputs

pytestmark = pytest.mark.interpret

LAYOUTS = [
    [("t", 3), ("v", 29), ("t", 2), ("v", 13), ("q", 4), ("t", 2)],
    [("t", 2), ("q", 3)],  # no visual tokens: passes through
    [("t", 1), ("v", 2), ("q", 1)],
    [("v", 37), ("q", 5), ("t", 1)],
]


def _mapper(gen: torch.Generator, device: str) -> list[torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    mapper = TokenMapper(MapperConfig(channels=(4, 8, 8, 16, 16), kernel_size=5)).eval()
    return [p.detach().to(device) for p in mapper.op_params()]


def _scores(inp, params) -> torch.Tensor:
    attn = reference.instruction_attention_ref(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
        inp.q_pos,
    )  # fmt: skip
    if not params:
        return attn
    return reference.mapper_forward_ref(attn, inp.cu_seqlens_v, params, 5, 1e-4)


def _assert_separated(scores: torch.Tensor, cu: torch.Tensor, keep: float) -> None:
    """The reference's k-th and (k+1)-th scores differ by far more than the kernels' rounding, so
    the kept set must match exactly (otherwise the test would be testing rounding)."""
    counts = reference.keep_counts_ref(cu, keep)
    for b in range(cu.numel() - 1):
        s = scores[int(cu[b]) : int(cu[b + 1])].double().sort(descending=True).values
        k = int(counts[b])
        if 0 < k < s.numel():
            gap = float(s[k - 1] - s[k])
            assert gap > 1e-5 * max(1.0, float(s[k - 1].abs())), "near-tie: reseed the test"


@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prune_and_merge_fused_equals_reference(use_mapper, dtype, device, gen):
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen, qk_std=1.5).to(device)
    params = _mapper(gen, device) if use_mapper else []
    _assert_separated(_scores(inp, params), inp.cu_seqlens_v, 0.5)
    args = (
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, inp.position_ids,
        inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, params,
    )  # fmt: skip
    with torch.no_grad():
        with backend.use_backend("ref"):
            want = tp.prune_and_merge(*args, keep_ratio=0.5, q_pos=inp.q_pos)
        with backend.use_backend("triton"):
            got = tp.prune_and_merge(*args, keep_ratio=0.5, q_pos=inp.q_pos)
    names = ("embeds", "position_ids", "cu_seqlens_out", "src_idx", "kept_idx")
    for name, g, w in zip(names, got[:5], want[:5], strict=True):
        assert torch.equal(g, w), name
    torch.testing.assert_close(got[5], want[5], rtol=2e-4, atol=2e-5)


def test_prune_visual_tokens_fused_equals_reference(device, gen):
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5).to(device)
    params = _mapper(gen, device)
    _assert_separated(_scores(inp, params), inp.cu_seqlens_v, 0.25)
    args = (
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
        inp.visual_embeds, inp.visual_position_ids, params,
    )  # fmt: skip
    with torch.no_grad():
        with backend.use_backend("ref"):
            want = tp.prune_visual_tokens(*args, keep_ratio=0.25, q_pos=inp.q_pos)
        with backend.use_backend("triton"):
            got = tp.prune_visual_tokens(*args, keep_ratio=0.25, q_pos=inp.q_pos)
    for g, w in zip(got[:4], want[:4], strict=True):
        assert torch.equal(g, w)
    torch.testing.assert_close(got[4], want[4], rtol=2e-4, atol=2e-5)


def test_stage_ops_on_triton_equal_reference(device, gen):
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5).to(device)
    params = _mapper(gen, device)
    att = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    with torch.no_grad():
        with backend.use_backend("ref"):
            attn = tp.instruction_attention(*att)
            logits = tp.mapper_forward(attn, inp.cu_seqlens_v, params)
            kept, cu_kept = tp.select_topk(logits, inp.cu_seqlens_v, keep_count=2)
            gathered = tp.gather_kept(inp.visual_embeds, inp.visual_position_ids, kept)
            merged = tp.merge_kept(
                inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
                inp.visual_idx, inp.cu_seqlens_v, kept,
            )  # fmt: skip
        with backend.use_backend("triton"):
            torch.testing.assert_close(tp.instruction_attention(*att), attn, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(
                tp.mapper_forward(attn, inp.cu_seqlens_v, params), logits, rtol=2e-4, atol=2e-5
            )
            got_kept, got_cu = tp.select_topk(logits, inp.cu_seqlens_v, keep_count=2)
            got_gathered = tp.gather_kept(inp.visual_embeds, inp.visual_position_ids, kept)
            got_merged = tp.merge_kept(
                inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
                inp.visual_idx, inp.cu_seqlens_v, kept,
            )  # fmt: skip
    assert torch.equal(got_kept, kept) and torch.equal(got_cu, cu_kept)
    for g, w in zip((*got_gathered, *got_merged), (*gathered, *merged), strict=True):
        assert torch.equal(g, w)


def test_triton_composite_under_torch_compile(device, gen):
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5).to(device)
    params = _mapper(gen, device)

    def fn(q, k, inputs_embeds, visual_embeds):
        out = tp.prune_and_merge(
            q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inputs_embeds, inp.position_ids,
            inp.cu_seqlens, visual_embeds * 1.0, inp.visual_idx, inp.cu_seqlens_v, params,
            keep_ratio=0.5,
        )  # fmt: skip
        return out[0].sum(-1), out[1], out[4]

    args = (inp.q, inp.k, inp.inputs_embeds, inp.visual_embeds)
    torch._dynamo.reset()
    with torch.no_grad(), backend.use_backend("triton"):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
