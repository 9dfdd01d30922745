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


def naive_instruction_attention(inp, scale=None, groups=None):
    """Loops over samples, heads, queries and keys in float64, straight from the definition:
    [Tv] (the mean over every head), or [Tv, groups] (the mean over each group of consecutive
    query heads)."""
    q, k = inp.q.double(), inp.k.double()
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu_q, cu_k, cu_v = (x.tolist() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.cu_seqlens_v))
    g = 1 if groups is None else groups
    out = torch.zeros(inp.visual_idx.shape[0], g, dtype=torch.float64)
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
                        out[v, h // (hq // g)] += math.exp(logits[j] - m) / z / (nq * hq // g)
    return out[:, 0] if groups is None else out


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


# ---------------------------------------------------------------------------------------------
# instruction_attention_heads: the same attention per group of query heads (mapper v2's input)

HEADS_BACKENDS = backend_params("instruction_attention_heads")


def attention_heads(backend_name: str, device: str, *args, **kwargs) -> torch.Tensor:
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
    with backend.use_backend(backend_name):
        got = tp.ops.instruction_attention_heads(*args, **kwargs)
    assert got.dtype == torch.float32 and got.dim() == 2 and got.shape[0] == args[4].shape[0]
    return got.cpu()


@pytest.mark.parametrize(("backend_name", "device"), HEADS_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize(
    ("heads", "groups"),
    [((4, 2), None), ((4, 2), 4), ((6, 3), 2), ((3, 3), 1), ((5, 1), 5)],
    ids=["gqa2-kv", "gqa2-q", "gqa2-pairs", "mha-mean", "mqa-q"],
)
def test_heads_match_naive(backend_name, device, layout, heads, groups, gen):
    """Every backend against the float64 definition, per group (None: one per KV head); the
    mean over the groups is instruction_attention's output."""
    inp = make_inputs(
        layout, heads_q=heads[0], heads_k=heads[1], head_dim=8, generator=gen, qk_std=2.0
    )
    got = attention_heads(backend_name, device, *inp.scoring(q_pos=True), head_groups=groups)
    want = naive_instruction_attention(inp, groups=heads[1] if groups is None else groups)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    mean = attention("ref", "cpu", *inp.scoring(q_pos=True))
    torch.testing.assert_close(got.mean(1), mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("backend_name", "device"), HEADS_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_heads_strided_inputs_and_scale(backend_name, device, index_dtype, gen):
    inp = make_inputs(
        LAYOUTS["ragged_multi_image"], heads_q=4, heads_k=2, index_dtype=index_dtype,
        generator=gen,
    )  # fmt: skip
    s = inp.strided().scoring(q_pos=True)._replace(softmax_scale=0.3)
    got = attention_heads(backend_name, device, *s, head_groups=4)
    want = naive_instruction_attention(inp, scale=0.3, groups=4)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("backend_name", "device"), HEADS_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_heads_low_precision_inputs(backend_name, device, dtype, tol, gen):
    inp = make_inputs(LAYOUTS["ragged_multi_image"], heads_q=4, heads_k=2, generator=gen)
    want = naive_instruction_attention(inp, groups=2)
    s = inp.scoring()
    got = attention_heads(backend_name, device, *s._replace(q=s.q.to(dtype), k=s.k.to(dtype)))
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < tol, rel


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [(3, ValueError, "head_groups must be an int >= 1 dividing"), (0, ValueError, "dividing")],
)  # fmt: skip
def test_heads_bad_groups(groups, error, match, gen):
    inp = make_inputs([simple_layout(5, 2)], heads_q=4, heads_k=2, generator=gen)
    with pytest.raises(error, match=match):
        tp.ops.instruction_attention_heads(*inp.scoring(), head_groups=groups)
