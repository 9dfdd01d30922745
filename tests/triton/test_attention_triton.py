"""Stage a in Triton (``instruction_attention_triton``) against the reference.

Runs on the GPU when there is one, else in the Triton interpreter (tiny shapes). The float64 truth
below mirrors ``instruction_attention_ref`` (which computes in float32); the kernel is also compared
with ``instruction_attention_ref`` itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenprune_kernels.reference import instruction_attention_ref
from tokenprune_kernels.testing import ATTENTION_LAYOUTS, make_inputs

pytest.importorskip("triton")

import triton

from tokenprune_kernels.triton import instruction_attention_triton

pytestmark = pytest.mark.interpret

LAYOUTS = {
    **ATTENTION_LAYOUTS,  # ragged (a sample without visual tokens passes through), interleaved
    # Longer keys (70 = 4.4 blocks of 16), so the online softmax rescales across blocks and splits.
    "long": [[("t", 5), ("v", 37), ("t", 3), ("v", 21), ("q", 4)], [("v", 2), ("q", 1)]],
}

SMALL = {"num_splits": 3, "block_m": 16, "block_n": 16, "block_v": 16}

# (dtype, head_dim, (Hq, Hk), layout, pass q_pos, softmax_scale, kernel options)
CASES = [
    (torch.float32, 16, (3, 3), "ragged", False, None, SMALL),
    (torch.float32, 24, (4, 2), "interleaved", True, 0.3, {}),
    (torch.float32, 64, (8, 2), "ragged", True, None, {**SMALL, "num_splits": 2}),
    (torch.float32, 24, (8, 2), "long", False, 0.7, SMALL),
    (torch.float16, 24, (8, 2), "interleaved", True, 0.5, {**SMALL, "num_splits": 4}),
    (torch.float16, 64, (4, 4), "ragged", False, None, {}),
    (torch.float16, 16, (4, 2), "long", True, None, {**SMALL, "num_splits": 5}),
    (torch.bfloat16, 64, (8, 2), "ragged", True, None, {}),
    (torch.bfloat16, 24, (4, 4), "interleaved", True, 0.2, SMALL),
]
TOL = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-4},
    torch.float16: {"atol": 2e-5, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-5, "rtol": 2e-3},
}


def attention64(inp, q_pos, scale):
    """The contract of stage a in float64 (the reference's computation, without its float32)."""
    q, k = inp.q.double(), inp.k.double()
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu_q, cu_k, cu_v = (x.tolist() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.cu_seqlens_v))
    out = torch.zeros(inp.visual_idx.shape[0], dtype=torch.float64, device=q.device)
    for b in range(len(cu_q) - 1):
        nq, nk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        if cu_v[b + 1] == cu_v[b]:
            continue
        qb = q[cu_q[b] : cu_q[b + 1]]
        kb = k[cu_k[b] : cu_k[b + 1]].repeat_interleave(group, dim=1)
        if q_pos is None:
            pos = torch.arange(nk - nq, nk, device=q.device)
        else:
            pos = q_pos[cu_q[b] : cu_q[b + 1]].to(torch.int64)
        logits = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        visible = torch.arange(nk, device=q.device)[None, :] <= pos[:, None]
        probs = torch.softmax(logits.masked_fill(~visible[None], float("-inf")), dim=-1)
        cols = inp.visual_idx[cu_v[b] : cu_v[b + 1]].to(torch.int64)
        out[cu_v[b] : cu_v[b + 1]] = probs[:, :, cols].mean(dim=(0, 1))
    return out


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: an element the kernels forget is visible."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "heads", "layout", "with_q_pos", "scale", "options"),
    CASES,
    ids=[
        f"{str(c[0])[6:]}-D{c[1]}-G{c[2][0] // c[2][1]}-{c[3]}-{'qpos' if c[4] else 'last'}"
        f"-{'scale' if c[5] else 'dflt'}-{'small' if c[6] else 'default'}"
        for c in CASES
    ],
)
def test_matches_reference(
    dtype, head_dim, heads, layout, with_q_pos, scale, options, device, gen, poisoned_empty
):
    inp = make_inputs(
        LAYOUTS[layout],
        heads_q=heads[0],
        heads_k=heads[1],
        head_dim=head_dim,
        dtype=dtype,
        index_dtype=torch.int32 if layout == "interleaved" else torch.int64,
        generator=gen,
        qk_std=1.7,
    ).to(device)
    if not with_q_pos:
        assert inp.queries_last
    q_pos = inp.q_pos if with_q_pos else None
    args = inp.scoring(with_q_pos)._replace(softmax_scale=scale)
    got = instruction_attention_triton(*args, **options)
    assert got.dtype == torch.float32 and got.shape == inp.visual_idx.shape
    assert got.device.type == torch.device(device).type
    want = attention64(inp, q_pos, scale)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    ref = instruction_attention_ref(*args)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    # Deterministic: no atomics, a fixed order of every sum.
    assert torch.equal(got, instruction_attention_triton(*args, **options))


@pytest.mark.parametrize("options", [{}, SMALL], ids=["default", "small"])
def test_all_keys_visual_sums_to_one(options, device, gen):
    # Every key is a visual token: each (query, head) softmax row sums to 1 over the visual
    # columns, so each sample's outputs sum to 1 (mean over its n_q * Hq rows).
    layouts = [[("v", 30), ("q", 1)], [("v", 3), ("q", 3)], [("v", 50), ("q", 2)]]
    inp = make_inputs(layouts, heads_q=6, heads_k=3, head_dim=24, generator=gen, qk_std=2.0)
    inp = inp.to(device)
    visual_idx = torch.cat(
        [torch.arange(n, device=device) for n in inp.cu_seqlens_k.diff().tolist()]
    )
    got = instruction_attention_triton(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, visual_idx, inp.cu_seqlens_k, **options
    )
    cu = inp.cu_seqlens_k.tolist()
    sums = torch.stack([got[cu[b] : cu[b + 1]].double().sum() for b in range(len(cu) - 1)])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert (got > 0).all()


def test_visual_after_every_query_is_exactly_zero(device, gen):
    # Queries placed (through q_pos) before the second image: its tokens get exactly 0, and the
    # first image's scores are those of the reference.
    layouts = [[("t", 4), ("v", 6), ("q", 2), ("v", 9), ("q", 3)]]
    inp = make_inputs(layouts, heads_q=4, heads_k=2, head_dim=16, generator=gen).to(device)
    q_pos = torch.tensor([10, 11, 5, 10, 11], dtype=torch.int64, device=device)
    args = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    got = instruction_attention_triton(*args, q_pos, **SMALL)
    assert torch.equal(got[6:], torch.zeros(9, device=device))
    assert (got[:6] > 0).all()
    torch.testing.assert_close(got, instruction_attention_ref(*args, q_pos), atol=1e-6, rtol=1e-4)


def test_no_visual_tokens_gives_empty(device, gen):
    inp = make_inputs([[("t", 3), ("q", 2)], [("q", 1)]], generator=gen).to(device)
    got = instruction_attention_triton(*inp.scoring())
    assert got.shape == (0,) and got.dtype == torch.float32


def test_non_contiguous_heads(device, gen):
    # q and k sliced out of wider tensors (a fused qkv projection): strided token and head axes.
    inp = make_inputs(LAYOUTS["ragged"], heads_q=4, heads_k=2, head_dim=16, generator=gen)
    inp = inp.to(device)
    wide_q = torch.randn(inp.q.shape[0], 7, 16, generator=gen).to(device)
    wide_k = torch.randn(inp.k.shape[0], 5, 16, generator=gen).to(device)
    wide_q[:, 1:5] = inp.q
    wide_k[:, 3:5] = inp.k
    q, k = wide_q[:, 1:5], wide_k[:, 3:5]
    assert not q.is_contiguous() and not k.is_contiguous()
    rest = (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    got = instruction_attention_triton(q, k, *rest, **SMALL)
    torch.testing.assert_close(got, instruction_attention_ref(inp.q, inp.k, *rest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_statistics_are_merged_once(dtype, device, gen):
    """With key splits the rows' statistics are merged by one launch between the passes, and the
    column pass takes merged rows only (no split count); strided q/k over a ragged batch still
    match the reference. One split: no merge launch."""
    from tokenprune_kernels.triton import attention as att
    from tokenprune_kernels.triton.launch import capture

    inp = make_inputs(
        LAYOUTS["long"], heads_q=6, heads_k=2, head_dim=24, dtype=dtype, generator=gen, qk_std=1.5
    )
    wide_k = torch.randn(inp.k.shape[0], 3, 24, generator=gen).to(dtype)
    wide_k[:, 1:] = inp.k
    inp, k = inp.to(device), wide_k.to(device)[:, 1:]
    args = (inp.q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    for splits, kernels in ((5, 3), (1, 2)):
        options = {**SMALL, "num_splits": splits}
        with capture() as launches:
            instruction_attention_triton(*args, **options)
        names = [r.kernel.fn.__name__ for r in launches]
        assert len(names) == kernels and names[-1] == "_visual_colsum_kernel", names
        assert (names[1] == "_merge_stats_kernel") == (splits > 1), names
        got = instruction_attention_triton(*args, **options)
        want = instruction_attention_ref(inp.q, inp.k, *args[2:])
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert "num_splits" not in att._visual_colsum_kernel.arg_names


def test_merge_stats_kernel_matches_a_direct_merge(device, gen):
    """The merge on its own: rows (a prime count) whose splits saw no key (-inf, 0) included."""
    from tokenprune_kernels.triton import attention as att

    splits, rows = 5, 37
    m = torch.randn(splits, rows, generator=gen) * 4
    l_ = torch.rand(splits, rows, generator=gen) * 9 + 0.5
    empty = torch.rand(splits, rows, generator=gen) < 0.3
    empty[0] = False  # every row sees key 0, in split 0
    m[empty], l_[empty] = float("-inf"), 0.0
    want_m = m.max(0).values
    want_l = (l_ * torch.exp2(m - want_m)).sum(0)
    m_dev, l_dev = m.flatten().to(device), l_.flatten().to(device)
    att._merge_stats_kernel[(triton.cdiv(rows, 16),)](m_dev, l_dev, rows, splits, BLOCK=16)
    assert torch.equal(m_dev[:rows].cpu(), want_m)
    torch.testing.assert_close(l_dev[:rows].cpu(), want_l, atol=0, rtol=1e-6)
    assert torch.equal(m_dev[rows:].cpu(), m[1:].flatten())  # the other splits untouched


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_head_group_colsums_read_the_merged_statistics(groups, device, gen):
    """``instruction_attention_heads_triton`` on main's launch structure: with key splits the
    per-group column pass reads the once-merged row statistics (same three launches as the mean,
    the column pass with ``num_channels = G``); groups that straddle two KV heads (G = 3 of
    Hq = 6, Hk = 2) and one per query head (G = 6) match the reference on strided, ragged
    inputs, one split or five."""
    from tokenprune_kernels.reference import instruction_attention_heads_ref
    from tokenprune_kernels.triton import instruction_attention_heads_triton
    from tokenprune_kernels.triton.launch import capture

    inp = make_inputs(LAYOUTS["long"], heads_q=6, heads_k=2, head_dim=24, generator=gen, qk_std=1.5)
    wide_k = torch.randn(inp.k.shape[0], 3, 24, generator=gen)
    wide_k[:, 1:] = inp.k
    inp, k = inp.to(device), wide_k.to(device)[:, 1:]
    args = (inp.q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
    want = instruction_attention_heads_ref(inp.q, inp.k, *args[2:], None, None, groups)
    for splits in (5, 1):
        options = {**SMALL, "num_splits": splits}
        with capture() as launches:
            instruction_attention_heads_triton(*args, None, None, groups, **options)
        names = [r.kernel.fn.__name__ for r in launches]
        assert names[-1] == "_visual_colsum_kernel" and len(names) == (3 if splits > 1 else 2)
        got = instruction_attention_heads_triton(*args, None, None, groups, **options)
        assert got.shape == (inp.visual_idx.shape[0], groups)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    mean = instruction_attention_triton(*args, **SMALL)
    torch.testing.assert_close(got.mean(1), mean, **TOL[torch.float32])
