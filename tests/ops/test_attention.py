"""Stage a: instruction attention, the reference against a naive float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.reference import instruction_attention_ref
from tokenprune_kernels.testing import make_inputs, simple_layout, strided


def naive_instruction_attention(inp, scale=None):
    """Loops over samples, heads, queries and keys in float64, straight from the definition."""
    q, k = inp.q.double(), inp.k.double()
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu_q, cu_k, cu_v = (x.tolist() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.cu_seqlens_v))
    out = torch.zeros(inp.visual_idx.shape[0], dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        nq = cu_q[b + 1] - cu_q[b]
        if cu_v[b + 1] == cu_v[b]:
            continue
        for i in range(nq):
            qi = cu_q[b] + i
            pos = int(inp.q_pos[qi])
            for h in range(hq):
                kh = h // (hq // hk)
                logits = [scale * float(q[qi, h] @ k[cu_k[b] + j, kh]) for j in range(pos + 1)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for v in range(cu_v[b], cu_v[b + 1]):
                    j = int(inp.visual_idx[v])
                    if j <= pos:
                        out[v] += math.exp(logits[j] - m) / z / (nq * hq)
    return out


LAYOUTS = {
    "single": [simple_layout(7, 3, n_system=4)],
    "one_visual": [simple_layout(1, 1, n_system=0)],
    "ragged_multi_image": [
        [("t", 3), ("v", 5), ("t", 2), ("v", 4), ("q", 3), ("t", 2)],
        [("t", 1), ("v", 2), ("q", 5)],
        [("t", 2), ("q", 2)],  # no visual tokens: passes through
        [("v", 11), ("q", 1)],
    ],
    # Instruction tokens before and between images: visual keys after a query are invisible to it.
    "interleaved_queries": [[("t", 2), ("q", 2), ("v", 6), ("q", 3), ("v", 3), ("q", 1)]],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)], ids=["gqa2", "mha", "mqa"])
def test_reference_matches_naive(layout, heads, gen):
    inp = make_inputs(
        layout, heads_q=heads[0], heads_k=heads[1], head_dim=8, generator=gen, qk_std=2.0
    )
    got = instruction_attention_ref(
        inp.q,
        inp.k,
        inp.cu_seqlens_q,
        inp.cu_seqlens_k,
        inp.visual_idx,
        inp.cu_seqlens_v,
        inp.q_pos,
    )
    want = naive_instruction_attention(inp)
    assert got.dtype == torch.float32 and got.shape == inp.visual_idx.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_default_q_pos_is_bottom_right(gen):
    inp = make_inputs(LAYOUTS["ragged_multi_image"], generator=gen)
    assert inp.queries_last
    args = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    torch.testing.assert_close(
        tp.instruction_attention(*args), tp.instruction_attention(*args, inp.q_pos)
    )


def test_softmax_scale_and_int32_offsets(gen):
    inp = make_inputs([simple_layout(13, 4, n_system=3)], index_dtype=torch.int32, generator=gen)
    got = tp.instruction_attention(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
        softmax_scale=0.3,
    )  # fmt: skip
    torch.testing.assert_close(
        got.double(), naive_instruction_attention(inp, scale=0.3), rtol=1e-5, atol=1e-7
    )


def test_normaliser_includes_non_visual_keys(gen):
    """Visual columns get less than all the mass: system and instruction keys take their share."""
    inp = make_inputs([simple_layout(9, 2, n_system=5)], generator=gen)
    got = tp.instruction_attention(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v
    )
    assert 0.0 < float(got.sum()) < 1.0


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_stay_close_to_float64(dtype, tol, gen):
    """fp16/bf16 q, k: the error is the inputs' rounding only (accumulation is float32)."""
    inp = make_inputs(LAYOUTS["ragged_multi_image"], generator=gen)
    want = naive_instruction_attention(inp)
    got = tp.instruction_attention(
        inp.q.to(dtype), inp.k.to(dtype), inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
        inp.cu_seqlens_v,
    )  # fmt: skip
    assert got.dtype == torch.float32
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < tol, rel


def every_backend(op: str) -> list[str]:
    """The backends that run ``op`` on CPU tensors here (Triton: the interpreter)."""
    return [b for b in ("ref", "cpp", "triton") if backend.implemented(op, b, "cpu")]


@pytest.mark.parametrize("backend_name", every_backend("instruction_attention"))
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs(backend_name, index_dtype, gen):
    """Every argument a non-contiguous view (q and k strided along head_dim too)."""
    inp = make_inputs(LAYOUTS["ragged_multi_image"], index_dtype=index_dtype, generator=gen)
    args = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.q_pos)  # fmt: skip
    want = naive_instruction_attention(inp)
    with backend.use_backend(backend_name):
        got = tp.instruction_attention(*(strided(t) for t in args))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
