"""GPU parity of the compiled CUDA kernels with the reference (and the compiled CPU kernels):
instruction attention, the mapper, the selection (alone and fused with the gather / the merge),
gather and merge. Selections must be identical (same indices), copies identical bit for bit,
float results within per-dtype tolerances, and every kernel deterministic. Skipped without a CUDA
GPU (the `cuda` marker); the kernels' compilation is checked without one in test_build.py."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import (
    DTYPES,
    INDEX_DTYPES,
    MERGE_LAYOUTS,
    MERGE_MODES,
    SCORE_KINDS,
    SELECT_LAYOUTS,
    assert_same_bits,
    kept_for,
    make_counts,
    make_merge_inputs,
    make_scores,
    merge_case,
    offsets,
    ops,
)

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.mapper.functional import mapper_forward_ref
from tokenprune_kernels.reference import (
    gather_kept_ref,
    instruction_attention_heads_ref,
    instruction_attention_ref,
    keep_counts_ref,
    merge_kept_ref,
    select_topk_ref,
)
from tokenprune_kernels.testing import (
    ATTENTION_LAYOUTS,
    make_inputs,
    trained_like_mapper_params,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_ext")]

CUDA_OPS = (
    "_instruction_attention",
    "_instruction_attention_heads",
    "_mapper_forward",
    "_select_topk",
    "_gather_kept",
    "_merge_kept",
    "_select_gather_kept",
    "_select_merge_kept",
)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` on the GPU, the same dtype, shape and bits as `want` (on any device)."""
    assert got.device.type == "cuda"
    assert_same_bits(got.cpu(), want.cpu())


def to_cuda(args: dict) -> dict:
    return {k: v.cuda() for k, v in args.items()}


def test_cuda_kernels_registered():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in CUDA_OPS:
        assert has(f"tokenprune::{op}", "CUDA"), op
    for op in ("instruction_attention", "instruction_attention_heads", "mapper_forward",
               "select_topk", "gather_kept"):  # fmt: skip
        assert backend.choose(op, "cuda") == "cuda"


# --------------------------------------------------------------------------------------------
# _select_topk


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(SELECT_LAYOUTS))
def test_select_parity(layout, dtype, kind, gen):
    lengths = SELECT_LAYOUTS[layout]
    cu = offsets(lengths, INDEX_DTYPES[len(layout) % 2])
    scores = make_scores(sum(lengths), dtype, kind, gen)
    for mode in ("random", "edges"):
        counts = make_counts(lengths, mode, gen)
        want, want_cu = select_topk_ref(scores, cu, counts)
        for total in (int(counts.sum()), None):  # the host-known total, or read on the device
            kept, cu_kept = ops()._select_topk(scores.cuda(), cu.cuda(), counts.cuda(), total)
            assert_same(kept, want)
            assert_same(cu_kept, want_cu)


def test_select_strided_scores_and_many_samples(gen):
    lengths = torch.randint(0, 50, (997,), generator=gen).tolist()
    cu = offsets(lengths, torch.int32)
    wide = make_scores(2 * sum(lengths), torch.bfloat16, "ties", gen)
    scores = wide.cuda()[::2]
    counts = make_counts(lengths, "random", gen)
    kept, cu_kept = ops()._select_topk(scores, cu.cuda(), counts.cuda(), int(counts.sum()))
    want, want_cu = select_topk_ref(wide[::2].contiguous(), cu, counts)
    assert_same(kept, want)
    assert_same(cu_kept, want_cu)


def test_select_order_keys():
    """The contract's order on a hand-written case: NaN last, -0.0 == +0.0, ties to lower index."""
    x = [0.0, math.nan, -0.0, -math.inf, 1.0, math.inf, -1.0, -0.0, math.nan, 1.0]
    scores = torch.tensor(x, device="cuda")
    cu = torch.tensor([0, len(x)], device="cuda")
    expected_rank = [5, 4, 9, 0, 2, 7, 6, 3, 1, 8]  # best first
    for k in range(len(x) + 1):
        kept, _ = ops()._select_topk(scores, cu, torch.tensor([k], device="cuda"), k)
        assert kept.tolist() == sorted(expected_rank[:k]), k


# --------------------------------------------------------------------------------------------
# The selection fused with the gather and with the merge


@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(MERGE_LAYOUTS))
def test_select_merge_parity(layout, dtype, kind, gen):
    args = make_merge_inputs(
        MERGE_LAYOUTS[layout], dtype, 33, 3, INDEX_DTYPES[len(layout) % 2],
        INDEX_DTYPES[len(kind) % 2], gen,
    )  # fmt: skip
    lengths = [v for _, v in MERGE_LAYOUTS[layout]]
    scores = make_scores(sum(lengths), dtype, kind, gen)
    counts = make_counts(lengths, "random", gen)
    kept_want, _ = select_topk_ref(scores, args["cu_seqlens_v"], counts)
    want = merge_kept_ref(**args, kept_idx=kept_want)
    c = to_cuda(args)
    got = ops()._select_merge_kept(
        scores.cuda(), c["cu_seqlens_v"], counts.cuda(), int(counts.sum()), c["inputs_embeds"],
        c["position_ids"], c["cu_seqlens"], c["visual_embeds"], c["visual_idx"],
    )  # fmt: skip
    for g_t, w_t in zip(got, (*want, kept_want), strict=True):
        assert_same(g_t, w_t)


@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["n1", "n13", "ragged", "zeros", "large_ragged"])
def test_select_gather_parity(layout, dtype, kind, gen):
    lengths = SELECT_LAYOUTS[layout]
    tv = sum(lengths)
    cu = offsets(lengths, INDEX_DTYPES[len(kind) % 2])
    scores = make_scores(tv, dtype, kind, gen)
    counts = make_counts(lengths, "edges", gen)
    embeds = torch.randn(tv, 67, generator=gen).to(dtype)
    pos = torch.randint(-9, 10**6, (3, tv), generator=gen).to(INDEX_DTYPES[len(layout) % 2])
    kept_want, cu_want = select_topk_ref(scores, cu, counts)
    e_want, p_want = gather_kept_ref(embeds, pos, kept_want)
    got = ops()._select_gather_kept(
        scores.cuda(), cu.cuda(), counts.cuda(), int(counts.sum()), embeds.cuda(),
        pos.cuda().t().contiguous().t(),  # column-major position ids
    )  # fmt: skip
    for g_t, w_t in zip(got, (e_want, p_want, kept_want, cu_want), strict=True):
        assert_same(g_t, w_t)


# --------------------------------------------------------------------------------------------
# _gather_kept


@pytest.mark.parametrize("layout", ["contiguous", "misaligned", "column_major"])
@pytest.mark.parametrize("pos_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("tv", "hidden", "r"), [(1, 1, 1), (2, 3, 3), (13, 64, 1), (257, 0, 2), (4099, 129, 3)]
)
def test_gather_parity(tv, hidden, r, dtype, pos_dtype, layout, gen):
    embeds_cpu = torch.randn(tv, hidden, generator=gen).to(dtype)
    if layout == "misaligned":  # same values, base and row stride one element off 16 bytes
        padded = torch.zeros(tv, hidden + 1, dtype=dtype)
        padded[:, 1:] = embeds_cpu
        embeds = padded.cuda()[:, 1:]
    elif layout == "column_major":
        embeds = embeds_cpu.t().contiguous().cuda().t()
    else:
        embeds = embeds_cpu.cuda()
    pos_cpu = torch.randint(-1000, 10**6, (r, tv), generator=gen).to(pos_dtype)
    pos = pos_cpu.t().contiguous().cuda().t() if layout == "column_major" else pos_cpu.cuda()
    keep = torch.rand(tv, generator=gen) < 0.4
    for kept_cpu in (
        torch.nonzero(keep).flatten(),
        torch.arange(tv),
        torch.empty(0, dtype=torch.int64),
        torch.randint(0, tv, (2 * tv + 1,), generator=gen),  # any order, repeats
    ):
        got_e, got_p = ops()._gather_kept(embeds, pos, kept_cpu.cuda())
        want_e, want_p = gather_kept_ref(embeds_cpu, pos_cpu, kept_cpu)
        assert_same(got_e, want_e)
        assert_same(got_p, want_p)
        cpu_e, cpu_p = ops()._gather_kept(embeds_cpu, pos_cpu, kept_cpu)
        assert_same(got_e, cpu_e)
        assert_same(got_p, cpu_p)


def test_gather_many_rows_grid_stride(gen):
    """More output rows than the kernel's grid: the grid-stride loop covers the rest."""
    tv, hidden = 1000, 8
    embeds = torch.randn(tv, hidden, generator=gen).to(torch.bfloat16)
    pos = torch.randint(0, 10**6, (3, tv), generator=gen)
    kept = torch.randint(0, tv, (70001,), generator=gen)
    got_e, got_p = ops()._gather_kept(embeds.cuda(), pos.cuda(), kept.cuda())
    want_e, want_p = gather_kept_ref(embeds, pos, kept)
    assert_same(got_e, want_e)
    assert_same(got_p, want_p)


def test_gather_on_a_side_stream(gen):
    embeds = torch.randn(300, 96, generator=gen).cuda()
    pos = torch.arange(300).reshape(1, 300).cuda()
    kept = torch.arange(0, 300, 7).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got_e, got_p = ops()._gather_kept(embeds, pos, kept)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same(got_e, embeds[kept])
    assert_same(got_p, pos[:, kept])


# --------------------------------------------------------------------------------------------
# _merge_kept


def check_merge(args: dict, kept: torch.Tensor, cuda_args: dict | None = None) -> None:
    got = ops()._merge_kept(**(cuda_args or to_cuda(args)), kept_idx=kept.cuda())
    want = merge_kept_ref(**args, kept_idx=kept)
    on_cpu = ops()._merge_kept(**args, kept_idx=kept)
    for g_t, w_t, c_t in zip(got, want, on_cpu, strict=True):
        assert_same(g_t, w_t)
        assert_same(g_t, c_t)


@pytest.mark.parametrize("mode", MERGE_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(MERGE_LAYOUTS))
def test_merge_parity(layout, dtype, mode, gen):
    check_merge(*merge_case(layout, dtype, mode, gen))


@pytest.mark.parametrize(("hidden", "r"), [(0, 1), (1, 1), (8, 3), (7, 3), (2048, 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_hidden_sizes(hidden, r, dtype, gen):
    args = make_merge_inputs(
        MERGE_LAYOUTS["ragged"], dtype, hidden, r, torch.int64, torch.int32, gen
    )
    check_merge(args, kept_for(args, "random", gen))


def test_merge_misaligned_and_strided(gen):
    args = make_merge_inputs(
        MERGE_LAYOUTS["ragged"], torch.bfloat16, 64, 3, torch.int32, torch.int64, gen
    )
    cuda_args = to_cuda(args)
    padded = torch.zeros(args["inputs_embeds"].shape[0], 65, dtype=torch.bfloat16, device="cuda")
    padded[:, 1:] = cuda_args["inputs_embeds"]
    cuda_args["inputs_embeds"] = padded[:, 1:]  # 2-byte aligned rows
    cuda_args["visual_embeds"] = cuda_args["visual_embeds"].t().contiguous().t()
    cuda_args["position_ids"] = cuda_args["position_ids"].t().contiguous().t()
    check_merge(args, kept_for(args, "random", gen), cuda_args)


# --------------------------------------------------------------------------------------------
# Bad arguments: metadata raises before any kernel runs; index VALUES are the public ops'
# business (validated there, once per call), and the private ops' kernels stay in bounds
# whatever the values are (no synchronisation to check them).


def test_private_ops_reject_bad_metadata():
    e = torch.randn(6, 4, device="cuda")
    p = torch.arange(12, device="cuda").reshape(2, 6)
    with pytest.raises(ValueError, match="kept_idx"):
        ops()._gather_kept(e, p, torch.tensor([0]))  # on the CPU
    with pytest.raises(ValueError, match="position_ids"):
        ops()._gather_kept(e, p.cpu(), torch.tensor([0], device="cuda"))
    with pytest.raises(TypeError, match="kept_idx"):
        ops()._gather_kept(e, p, torch.tensor([0], device="cuda", dtype=torch.int32))
    s = torch.randn(6, device="cuda")
    cu = torch.tensor([0, 6], device="cuda")
    with pytest.raises(ValueError, match="total_kept"):
        ops()._select_topk(s, cu, torch.tensor([2], device="cuda"), 7)  # > Tv
    with pytest.raises(ValueError, match="keep_counts"):
        ops()._select_topk(s, cu, torch.tensor([2, 1], device="cuda"), 3)
    with pytest.raises(ValueError, match="scores must have Tv"):
        ops()._select_gather_kept(s[:5], cu, torch.tensor([2], device="cuda"), 2, e, p)
    q = torch.randn(3, 4, 16, device="cuda")
    k = torch.randn(9, 3, 16, device="cuda")
    with pytest.raises(ValueError, match="multiple of the key heads"):
        ops()._instruction_attention(q, k, cu.new_tensor([0, 3]), cu.new_tensor([0, 9]),
                                     cu.new_tensor([1, 2]), cu.new_tensor([0, 2]))  # fmt: skip
    heads_args = (q, k[:, :2], cu.new_tensor([0, 3]), cu.new_tensor([0, 9]), cu.new_tensor([1, 2]),
                  cu.new_tensor([0, 2]), None, None)  # fmt: skip
    for groups in (3, 0, -4, 8):
        with pytest.raises(ValueError, match="head_groups must be an int >= 1 dividing"):
            ops()._instruction_attention_heads(*heads_args, groups)


def test_bad_index_values_stay_in_bounds(gen):
    """Out-of-range values reach no memory outside the buffers: the calls return, the device
    reports no error, and a valid call afterwards is right."""
    e = torch.randn(6, 4, device="cuda")
    p = torch.arange(12, device="cuda").reshape(2, 6)
    got, pos = ops()._gather_kept(e, p, torch.tensor([5, 6, -1, 10**12, 0], device="cuda"))
    assert torch.equal(got[[0, 4]].cpu(), e.cpu()[[5, 0]])
    assert torch.equal(got[1:4].cpu(), torch.zeros(3, 4))  # out of range: zeros
    assert torch.equal(pos[:, 1:4].cpu(), torch.zeros(2, 3, dtype=torch.int64))

    args = to_cuda(make_merge_inputs([(10, 4), (6, 2)], torch.float32, 8, 1, torch.int64,
                                     torch.int64, gen))  # fmt: skip
    bad = dict(args)
    bad["visual_idx"] = torch.tensor([1, 2, 5, 10**9, -3, 3], device="cuda")
    bad["cu_seqlens"] = torch.tensor([0, 10**9, -5], device="cuda")
    ops()._merge_kept(**bad, kept_idx=torch.tensor([0, 7, -2], device="cuda"))
    counts = torch.tensor([10**6, -4], device="cuda")
    ops()._select_merge_kept(torch.randn(6, device="cuda"), args["cu_seqlens_v"], counts, 3,
                             args["inputs_embeds"], args["position_ids"], bad["cu_seqlens"],
                             args["visual_embeds"], bad["visual_idx"])  # fmt: skip
    q = torch.randn(3, 4, 16, device="cuda")
    k = torch.randn(9, 2, 16, device="cuda")
    cu = torch.tensor([0, 10**9], device="cuda")
    ops()._instruction_attention(q, k, cu, torch.tensor([0, -7], device="cuda"),
                                 torch.tensor([3, 10**9], device="cuda"), cu.new_tensor([0, 2]),
                                 torch.tensor([-5, 10**9, 4], device="cuda"))  # fmt: skip
    ops()._instruction_attention_heads(q, k, cu, torch.tensor([0, -7], device="cuda"),
                                       torch.tensor([3, 10**9], device="cuda"),
                                       cu.new_tensor([0, 2]), torch.tensor([-5, 10**9, 4],
                                       device="cuda"), None, 4)  # fmt: skip
    ops()._mapper_forward(torch.rand(5, device="cuda"), torch.tensor([0, -3, 10**9], device="cuda"),
                          _mapper((4, 8), 3, gen), 3, 1e-4)  # fmt: skip
    torch.cuda.synchronize()  # a fault would surface here
    kept = torch.tensor([0, 2, 5], device="cuda")
    out = ops()._merge_kept(**args, kept_idx=kept)
    want = merge_kept_ref(**{k: v.cpu() for k, v in args.items()}, kept_idx=kept.cpu())
    for g_t, w_t in zip(out, want, strict=True):
        assert_same(g_t, w_t)


def test_public_ops_reject_bad_values_on_cuda(gen):
    e = torch.randn(6, 4, device="cuda")
    p = torch.arange(12, device="cuda").reshape(2, 6)
    with backend.use_backend("cuda"):
        for bad in ([6], [-1], [0, 2, 100]):
            with pytest.raises(ValueError, match="kept_idx"):
                tp.gather_kept(e, p, torch.tensor(bad, device="cuda"))
        args = to_cuda(make_merge_inputs([(10, 4), (6, 2)], torch.float32, 8, 1, torch.int64,
                                         torch.int64, gen))  # fmt: skip
        kept = torch.tensor([0, 2, 5], device="cuda")
        with pytest.raises(ValueError, match="kept_idx"):
            tp.merge_kept(*args.values(), torch.tensor([2, 0], device="cuda"))
        with pytest.raises(ValueError, match="visual_idx"):
            tp.merge_kept(*{**args, "visual_idx": args["visual_idx"] + 100}.values(), kept)
        with pytest.raises(ValueError, match="cu_seqlens"):
            tp.merge_kept(*{**args, "cu_seqlens": torch.tensor([0, 10, 15], device="cuda")}
                          .values(), kept)  # fmt: skip


# --------------------------------------------------------------------------------------------
# _instruction_attention

ATTN_LAYOUTS = {
    # the shared ragged batch and a sample of 1 visual token; the shared interleaved one.
    "ragged": [*ATTENTION_LAYOUTS["ragged"], [("v", 1), ("q", 1)]],
    "interleaved": ATTENTION_LAYOUTS["interleaved"],
    # many keys: several key tiles of 64 and several splits, 67 visual tokens (2 column tiles),
    # 11 queries x G rows over several row tiles.
    "long": [[("t", 5), ("v", 331), ("t", 3), ("v", 67), ("q", 11)], [("v", 2), ("q", 1)]],
    # 1-key samples and one long one past 2 * 256 keys (more splits)
    "splits": [[("v", 1), ("q", 1)], [("t", 7), ("v", 1031), ("q", 37)]],
}
ATTN_TOL = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-4},
    torch.float16: {"atol": 2e-5, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-5, "rtol": 2e-3},
}
# (head dim, (Hq, Hk), layout, q_pos given, softmax_scale)
ATTN_CASES = [
    (128, (28, 4), "long", False, None),  # Qwen2-VL-7B heads
    (16, (3, 3), "ragged", False, None),
    (24, (4, 2), "interleaved", True, 0.3),
    (7, (8, 2), "ragged", True, None),  # not a multiple of 8: the element-wise loads
    (80, (6, 1), "long", True, 0.7),
    (64, (8, 8), "splits", False, None),
    (256, (4, 2), "ragged", False, None),
]


def attention_inputs(layout, head_dim, heads, dtype, gen, strided: bool):
    inp = make_inputs(
        ATTN_LAYOUTS[layout], heads_q=heads[0], heads_k=heads[1], head_dim=head_dim, dtype=dtype,
        index_dtype=torch.int32 if layout == "interleaved" else torch.int64, generator=gen,
        qk_std=1.7,
    )  # fmt: skip
    q, k = inp.q.cuda(), inp.k.cuda()
    if strided:  # q and k sliced out of wider tensors (a fused qkv projection), heads strided
        wide_q = torch.randn(q.shape[0], heads[0] + 3, head_dim, device="cuda").to(dtype)
        wide_k = torch.randn(k.shape[0], heads[1] + 2, head_dim, device="cuda").to(dtype)
        wide_q[:, 1 : 1 + heads[0]] = q
        wide_k[:, 2 : 2 + heads[1]] = k
        q, k = wide_q[:, 1 : 1 + heads[0]], wide_k[:, 2 : 2 + heads[1]]
    return inp, q, k


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("head_dim", "heads", "layout", "with_q_pos", "scale"),
    ATTN_CASES,
    ids=[
        f"D{c[0]}-Hq{c[1][0]}-Hk{c[1][1]}-{c[2]}-{'qpos' if c[3] else 'last'}" for c in ATTN_CASES
    ],
)
def test_attention_parity(head_dim, heads, layout, with_q_pos, scale, dtype, strided, gen):
    inp, q, k = attention_inputs(layout, head_dim, heads, dtype, gen, strided)
    rest = [x.cuda() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
                               inp.cu_seqlens_v)]  # fmt: skip
    q_pos = inp.q_pos.cuda() if with_q_pos else None
    got = ops()._instruction_attention(q, k, *rest, q_pos, scale)
    assert got.dtype == torch.float32 and got.shape == inp.visual_idx.shape
    want = instruction_attention_ref(
        inp.q.double(), inp.k.double(), inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
        inp.cu_seqlens_v, inp.q_pos if with_q_pos else None, scale,
    )  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, **ATTN_TOL[dtype])
    # Deterministic: no atomics, a fixed order of every sum.
    assert torch.equal(got, ops()._instruction_attention(q, k, *rest, q_pos, scale))


def test_attention_misaligned_rows_and_visual_after_queries(gen):
    """Rows one element off 16 bytes (no vector loads); queries placed before the second image
    get exactly 0 for it."""
    inp = make_inputs([[("t", 4), ("v", 6), ("q", 2), ("v", 9), ("q", 3)]], heads_q=4, heads_k=2,
                      head_dim=16, dtype=torch.bfloat16, generator=gen)  # fmt: skip
    pad_q = torch.zeros(inp.q.shape[0] * 4 * 16 + 1, dtype=torch.bfloat16, device="cuda")
    q = pad_q[1:].view(inp.q.shape)
    q.copy_(inp.q.cuda())
    q_pos = torch.tensor([10, 11, 5, 10, 11])
    args = (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v, q_pos)
    got = ops()._instruction_attention(q, inp.k.cuda(), *(x.cuda() for x in args))
    assert torch.equal(got[6:].cpu(), torch.zeros(9))
    assert (got[:6] > 0).all()
    want = instruction_attention_ref(inp.q.double(), inp.k.double(), *args)
    torch.testing.assert_close(got.cpu(), want, **ATTN_TOL[torch.bfloat16])


def test_attention_every_key_visual_sums_to_one(gen):
    layouts = [[("v", 300), ("q", 1)], [("v", 3), ("q", 3)], [("v", 70), ("q", 2)]]
    inp = make_inputs(layouts, heads_q=6, heads_k=3, head_dim=64, dtype=torch.float16,
                      generator=gen, qk_std=2.0)  # fmt: skip
    visual_idx = torch.cat([torch.arange(n) for n in inp.cu_seqlens_k.diff().tolist()])
    got = ops()._instruction_attention(
        inp.q.cuda(), inp.k.cuda(), inp.cu_seqlens_q.cuda(), inp.cu_seqlens_k.cuda(),
        visual_idx.cuda(), inp.cu_seqlens_k.cuda(),
    ).cpu()  # fmt: skip
    cu = inp.cu_seqlens_k.tolist()
    sums = torch.stack([got[cu[b] : cu[b + 1]].double().sum() for b in range(len(cu) - 1)])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_attention_no_visual_tokens():
    q = torch.randn(2, 4, 16, device="cuda")
    k = torch.randn(5, 2, 16, device="cuda")
    cu = torch.tensor([0, 2], device="cuda")
    got = ops()._instruction_attention(q, k, cu, cu.new_tensor([0, 5]),
                                       cu.new_empty(0), cu.new_tensor([0, 0]))  # fmt: skip
    assert got.shape == (0,) and got.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# _instruction_attention_heads: the same kernels, per group of query heads

# (head dim, (Hq, Hk), head_groups G, layout, q_pos given, softmax_scale)
HEADS_CASES = [
    (128, (28, 4), 4, "long", False, None),  # Qwen2-VL-7B heads, one channel per KV head
    (128, (28, 4), 28, "long", True, None),  # one channel per query head
    (128, (28, 4), 2, "ragged", False, None),  # a channel spans two KV heads
    (24, (12, 4), 6, "long", True, 0.3),  # channels of 2 heads straddle groups of 3
    (16, (6, 2), 3, "interleaved", True, None),  # the middle channel straddles the 2 KV heads
    (7, (8, 2), 4, "ragged", True, None),  # D not a multiple of 8; 2 channels per KV head
    (80, (6, 1), 6, "splits", False, 0.7),  # MQA, several key splits
    (64, (8, 8), 1, "splits", False, None),  # MHA, the mean over every head
    (256, (4, 2), 2, "ragged", False, None),
]


def heads_call(q, k, inp, with_q_pos: bool, scale, groups: int) -> torch.Tensor:
    rest = [x.cuda() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
                               inp.cu_seqlens_v)]  # fmt: skip
    q_pos = inp.q_pos.cuda() if with_q_pos else None
    return ops()._instruction_attention_heads(q, k, *rest, q_pos, scale, groups)


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("head_dim", "heads", "groups", "layout", "with_q_pos", "scale"),
    HEADS_CASES,
    ids=[
        f"D{c[0]}-Hq{c[1][0]}-Hk{c[1][1]}-G{c[2]}-{c[3]}-{'qpos' if c[4] else 'last'}"
        for c in HEADS_CASES
    ],
)
def test_attention_heads_parity(
    head_dim, heads, groups, layout, with_q_pos, scale, dtype, strided, gen
):
    inp, q, k = attention_inputs(layout, head_dim, heads, dtype, gen, strided)
    got = heads_call(q, k, inp, with_q_pos, scale, groups)
    assert got.dtype == torch.float32 and got.shape == (inp.visual_idx.shape[0], groups)
    assert got.is_contiguous()
    s = inp.scoring(q_pos=with_q_pos)._replace(
        q=inp.q.double(), k=inp.k.double(), softmax_scale=scale
    )
    want = instruction_attention_heads_ref(*s, groups)
    torch.testing.assert_close(got.cpu(), want, **ATTN_TOL[dtype])
    # Deterministic: no atomics, a fixed order of every sum.
    assert torch.equal(got, heads_call(q, k, inp, with_q_pos, scale, groups))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("head_dim", "heads", "layout"),
    [(128, (28, 4), "long"), (7, (8, 2), "ragged"), (64, (8, 8), "splits")],
)
def test_attention_heads_one_group_is_the_mean_op_bit_for_bit(head_dim, heads, layout, dtype, gen):
    """One body: G = 1 runs _instruction_attention's tiles and sums in the same order; and the
    mean over G channels is that op's result up to rounding."""
    inp, q, k = attention_inputs(layout, head_dim, heads, dtype, gen, strided=True)
    rest = [x.cuda() for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
                               inp.cu_seqlens_v, inp.q_pos)]  # fmt: skip
    mean = ops()._instruction_attention(q, k, *rest)
    one = ops()._instruction_attention_heads(q, k, *rest, None, 1)
    assert one.shape == (mean.shape[0], 1)
    assert_same(one[:, 0], mean)
    per_kv = ops()._instruction_attention_heads(q, k, *rest, None, heads[1])
    torch.testing.assert_close(per_kv.mean(1), mean, rtol=1e-5, atol=1e-7)


def test_attention_heads_visual_after_queries_and_every_key_visual(gen):
    """A query before an image gives exactly 0 for it in every channel; when every key is
    visual each channel sums to 1 over its sample."""
    inp = make_inputs([[("t", 4), ("v", 6), ("q", 2), ("v", 9), ("q", 3)]], heads_q=6, heads_k=2,
                      head_dim=16, dtype=torch.bfloat16, generator=gen)  # fmt: skip
    q_pos = torch.tensor([10, 11, 5, 10, 11])
    args = (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v, q_pos)
    got = ops()._instruction_attention_heads(inp.q.cuda(), inp.k.cuda(),
                                             *(x.cuda() for x in args), None, 3)  # fmt: skip
    assert torch.equal(got[6:].cpu(), torch.zeros(9, 3))
    assert (got[:6] > 0).all()

    layouts = [[("v", 300), ("q", 1)], [("v", 3), ("q", 3)], [("v", 70), ("q", 2)]]
    inp = make_inputs(layouts, heads_q=6, heads_k=3, head_dim=64, dtype=torch.float16,
                      generator=gen, qk_std=2.0)  # fmt: skip
    visual_idx = torch.cat([torch.arange(n) for n in inp.cu_seqlens_k.diff().tolist()])
    got = ops()._instruction_attention_heads(
        inp.q.cuda(), inp.k.cuda(), inp.cu_seqlens_q.cuda(), inp.cu_seqlens_k.cuda(),
        visual_idx.cuda(), inp.cu_seqlens_k.cuda(), None, None, 6,
    ).cpu()  # fmt: skip
    cu = inp.cu_seqlens_k.tolist()
    sums = torch.stack([got[cu[b] : cu[b + 1]].double().sum(0) for b in range(len(cu) - 1)])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_attention_heads_no_visual_tokens():
    q = torch.randn(2, 4, 16, device="cuda")
    k = torch.randn(5, 2, 16, device="cuda")
    cu = torch.tensor([0, 2], device="cuda")
    got = ops()._instruction_attention_heads(q, k, cu, cu.new_tensor([0, 5]), cu.new_empty(0),
                                             cu.new_tensor([0, 0]), None, None, 4)  # fmt: skip
    assert got.shape == (0, 4) and got.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# _mapper_forward


def _mapper(channels, kernel_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return trained_like_mapper_params(channels, kernel_size, gen, "cuda")


def _attn(lengths, gen, cu_dtype=torch.int64):
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(cu_dtype)
    attn = torch.rand(int(cu[-1]), generator=gen) ** 3 / max(1, int(cu[-1]))
    attn[torch.rand(attn.shape, generator=gen) < 0.1] = 0.0
    return attn, cu


MAPPER_TOL = {"rtol": 5e-4, "atol": 5e-4}  # 3xTF32 pointwise convolutions, ~fp32


@pytest.mark.parametrize(
    ("channels", "kernel_size", "lengths"),
    [
        ((32, 64, 128, 256, 512), 5, [1, 2, 0, 700, 3, 64, 65]),  # the method's mapper
        ((4, 8, 8), 3, [1, 2, 0, 41, 3]),
        ((3, 5, 7), 5, [5, 1, 0, 23, 2]),  # odd widths
        ((16,), 1, [9, 0, 1]),  # one block, no halo
        ((8, 8, 8, 8, 8, 8), 7, [300, 1, 17]),  # six blocks, halo 18
        ((2, 600), 3, [130]),  # a block wider than the default mapper's last one
    ],
)
@pytest.mark.parametrize("cu_dtype", INDEX_DTYPES, ids=str)
def test_mapper_parity(channels, kernel_size, lengths, cu_dtype, gen):
    params = _mapper(channels, kernel_size, gen)
    attn, cu = _attn(lengths, gen, cu_dtype)
    got = ops()._mapper_forward(attn.cuda(), cu.cuda(), params, kernel_size, 1e-4)
    want = mapper_forward_ref(attn, cu, [p.cpu() for p in params], kernel_size, 1e-4)
    torch.testing.assert_close(got.cpu(), want, **MAPPER_TOL)
    assert torch.equal(
        got, ops()._mapper_forward(attn.cuda(), cu.cuda(), params, kernel_size, 1e-4)
    )


def test_mapper_no_leak_across_samples_and_strided_attn(gen):
    """A sample's logits do not depend on its neighbours (NaN neighbours included)."""
    params = _mapper((8, 16), 5, gen)
    attn, cu = _attn([40, 3, 50], gen)
    alone = ops()._mapper_forward(attn[40:43].cuda(), torch.tensor([0, 3], device="cuda"),
                                  params, 5, 1e-4)  # fmt: skip
    noisy = attn.clone()
    noisy[:40] = math.nan
    noisy[43:] = math.nan
    wide = torch.zeros(2 * noisy.shape[0], device="cuda")
    wide[::2] = noisy.cuda()
    got = ops()._mapper_forward(wide[::2], cu.cuda(), params, 5, 1e-4)
    torch.testing.assert_close(got[40:43], alone, rtol=1e-6, atol=1e-6)  # NaN would fail


# --------------------------------------------------------------------------------------------
# The public composites on the CUDA backend: the chain of CUDA stages, the reference's selection


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("one_d", [False, True], ids=["mrope", "1d"])
def test_prune_and_merge_on_cuda(dtype, use_mapper, one_d, gen):
    inp = make_inputs(ATTN_LAYOUTS["ragged"] + ATTN_LAYOUTS["long"], heads_q=8, heads_k=2,
                      head_dim=64, dtype=dtype, generator=gen).to("cuda")  # fmt: skip
    params = _mapper((4, 8, 16), 5, gen) if use_mapper else []
    pos = inp.position_ids[0] if one_d else inp.position_ids
    vpos = inp.visual_position_ids[0] if one_d else inp.visual_position_ids
    with backend.use_backend("cuda"), torch.no_grad():
        embeds, pos_out, cu_out, src, kept, scores = tp.prune_and_merge(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds, pos,
            inp.cu_seqlens, inp.visual_embeds, inp.visual_idx, inp.cu_seqlens_v, params,
            keep_ratio=0.37, q_pos=inp.q_pos,
        )  # fmt: skip
        g_embeds, g_pos, g_kept, g_cu, g_scores = tp.prune_visual_tokens(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
            inp.visual_embeds, vpos, params, keep_ratio=0.37, q_pos=inp.q_pos,
        )  # fmt: skip
    cpu = inp.to("cpu")
    want_scores = instruction_attention_ref(cpu.q.double(), cpu.k.double(), cpu.cu_seqlens_q,
                                            cpu.cu_seqlens_k, cpu.visual_idx, cpu.cu_seqlens_v,
                                            cpu.q_pos)  # fmt: skip
    if use_mapper:
        want_scores = mapper_forward_ref(want_scores, cpu.cu_seqlens_v, [p.cpu() for p in params],
                                         5, 1e-4)  # fmt: skip
    # The mapper's log input magnifies the attention's rounding: looser than either stage alone.
    tol = {"rtol": 1e-2, "atol": 1e-3} if use_mapper else ATTN_TOL[dtype]
    torch.testing.assert_close(scores.cpu(), want_scores, **tol)
    assert torch.equal(scores, g_scores)
    # The selection of the scores the kernels computed is exactly the reference's.
    counts = keep_counts_ref(cpu.cu_seqlens_v, keep_ratio=0.37)
    want_kept, want_cu = select_topk_ref(scores.cpu(), cpu.cu_seqlens_v, counts)
    assert torch.equal(kept.cpu(), want_kept) and torch.equal(g_kept.cpu(), want_kept)
    assert torch.equal(g_cu.cpu(), want_cu)
    merged = merge_kept_ref(cpu.inputs_embeds, pos.cpu(), cpu.cu_seqlens, cpu.visual_embeds,
                            cpu.visual_idx, cpu.cu_seqlens_v, want_kept)  # fmt: skip
    for g_t, w_t in zip((embeds, pos_out, cu_out, src), merged, strict=True):
        assert_same(g_t, w_t)
    assert_same(g_embeds, cpu.visual_embeds[want_kept])
    assert_same(g_pos, vpos.cpu()[..., want_kept])
