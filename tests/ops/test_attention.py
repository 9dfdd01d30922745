"""Stage a: instruction attention, the reference and every backend of the op table against a naive
float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.reference import instruction_attention_ref
from tokenprune_kernels.testing import backend_params, make_inputs, simple_layout


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


BACKENDS = backend_params("instruction_attention")
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
    got = instruction_attention_ref(*inp.scoring(q_pos=True))
    want = naive_instruction_attention(inp)
    assert got.dtype == torch.float32 and got.shape == inp.visual_idx.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def attention(backend_name: str, device: str, *args, **kwargs) -> torch.Tensor:
    """``instruction_attention`` on ``backend_name``, the tensors moved to ``device``, the result
    on the CPU."""
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
    with backend.use_backend(backend_name):
        got = tp.instruction_attention(*args, **kwargs)
    assert got.dtype == torch.float32 and got.shape == args[4].shape
    return got.cpu()


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)], ids=["gqa2", "mha", "mqa"])
def test_backends_match_naive(backend_name, device, layout, heads, gen):
    """The stage's parity test: every backend against the float64 definition."""
    inp = make_inputs(
        layout, heads_q=heads[0], heads_k=heads[1], head_dim=8, generator=gen, qk_std=2.0
    )
    got = attention(backend_name, device, *inp.scoring(q_pos=True))
    torch.testing.assert_close(got.double(), naive_instruction_attention(inp), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_default_q_pos_is_bottom_right(backend_name, device, gen):
    inp = make_inputs(LAYOUTS["ragged_multi_image"], generator=gen)
    assert inp.queries_last
    torch.testing.assert_close(
        attention(backend_name, device, *inp.scoring()),
        attention(backend_name, device, *inp.scoring(q_pos=True)),
    )


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_softmax_scale_and_int32_offsets(backend_name, device, gen):
    inp = make_inputs([simple_layout(13, 4, n_system=3)], index_dtype=torch.int32, generator=gen)
    got = attention(backend_name, device, *inp.scoring()._replace(softmax_scale=0.3))
    torch.testing.assert_close(
        got.double(), naive_instruction_attention(inp, scale=0.3), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_normaliser_includes_non_visual_keys(backend_name, device, gen):
    """Visual columns get less than all the mass: system and instruction keys take their share."""
    inp = make_inputs([simple_layout(9, 2, n_system=5)], generator=gen)
    got = attention(backend_name, device, *inp.scoring())
    assert 0.0 < float(got.sum()) < 1.0


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_stay_close_to_float64(backend_name, device, dtype, tol, gen):
    """fp16/bf16 q, k: the error is the inputs' rounding only (accumulation is float32)."""
    inp = make_inputs(LAYOUTS["ragged_multi_image"], generator=gen)
    want = naive_instruction_attention(inp)
    s = inp.scoring()
    got = attention(backend_name, device, *s._replace(q=s.q.to(dtype), k=s.k.to(dtype)))
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < tol, rel


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs(backend_name, device, index_dtype, gen):
    """Every argument a non-contiguous view (q and k strided along head_dim too)."""
    inp = make_inputs(LAYOUTS["ragged_multi_image"], index_dtype=index_dtype, generator=gen)
    got = attention(backend_name, device, *inp.strided().scoring(q_pos=True))
    torch.testing.assert_close(got.double(), naive_instruction_attention(inp), rtol=1e-4, atol=1e-6)
