"""Stage e: the composites equal the stages chained by hand, on every backend of the op table
(Triton: select and gather/merge fused) and under ``auto``."""

from __future__ import annotations

import zlib

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend, reference
from tokenprune_kernels import validation as v
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import PruningInputs, backend_params, make_inputs, strided

LAYOUTS = [
    [("t", 3), ("v", 29), ("t", 2), ("v", 13), ("q", 4), ("t", 2)],
    [("t", 2), ("q", 3)],  # no visual tokens: passes through
    [("t", 1), ("v", 2), ("q", 1)],
    [("v", 97), ("q", 7)],
]
BACKENDS = [pytest.param("auto", "cpu", id="auto"), *backend_params("prune_and_merge")]


def same_inputs(*case) -> torch.Generator:
    """A generator seeded by the case alone, not the backend: every backend gets the same
    inputs (so a case whose reference scores are well separated is so for all of them)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _small_mapper(gen) -> TokenMapper:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return TokenMapper(MapperConfig(channels=(4, 8, 8, 16, 16), kernel_size=5)).eval()


def scores_tolerance(backend_name: str) -> dict[str, float]:
    """Triton computes the scores in its own summation order; the others run the reference's."""
    return {"rtol": 2e-4, "atol": 2e-5} if backend_name == "triton" else {}


def reference_scores(inp: PruningInputs, params, q_pos: bool) -> torch.Tensor:
    attn = reference.instruction_attention_ref(*inp.scoring(q_pos))
    if not params:
        return attn
    return reference.mapper_forward_ref(attn, inp.cu_seqlens_v, params, 5, 1e-4)


def assert_separated(scores: torch.Tensor, cu: torch.Tensor, **keep) -> None:
    """The reference's k-th and (k+1)-th scores differ by far more than a backend's rounding, so
    the kept set must match exactly (otherwise the test would be testing rounding)."""
    counts = reference.keep_counts_ref(cu, **keep)
    for b in range(cu.numel() - 1):
        s = scores[int(cu[b]) : int(cu[b + 1])].double().sort(descending=True).values
        k = int(counts[b])
        if 0 < k < s.numel():
            gap = float(s[k - 1] - s[k])
            assert gap > 1e-5 * max(1.0, float(s[k - 1].abs())), "near-tie: reseed the test"


def pruned(backend_name: str, device: str, inp: PruningInputs, params, **kw) -> tuple:
    """``prune_visual_tokens`` on ``backend_name`` with ``inp`` moved to ``device``; results on
    the CPU."""
    x = inp.to(device)
    with backend.use_backend(backend_name), torch.no_grad():
        out = tp.prune_visual_tokens(
            x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.visual_idx, x.cu_seqlens_v,
            x.visual_embeds, x.visual_position_ids, [p.to(device) for p in params], **kw,
        )  # fmt: skip
    return tuple(t.cpu() for t in out)


def merged(backend_name: str, device: str, inp: PruningInputs, params, **kw) -> tuple:
    """``prune_and_merge``, as :func:`pruned`."""
    x = inp.to(device)
    with backend.use_backend(backend_name), torch.no_grad():
        out = tp.prune_and_merge(
            x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.inputs_embeds, x.position_ids,
            x.cu_seqlens, x.visual_embeds, x.visual_idx, x.cu_seqlens_v,
            [p.to(device) for p in params], **kw,
        )  # fmt: skip
    return tuple(t.cpu() for t in out)


def assert_merged(out: tuple, inp: PruningInputs, kept: torch.Tensor) -> None:
    """``prune_and_merge``'s outputs ``out`` are the reference merge of ``kept``, and ``kept``."""
    want = reference.merge_kept_ref(
        inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
        inp.cu_seqlens_v, kept,
    )  # fmt: skip
    assert torch.equal(out[4], kept)
    for g, w in zip(out[:4], want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_visual_tokens_equals_chain(backend_name, device, use_mapper, dtype):
    """The parity test of ``prune_visual_tokens``: the reference's stages chained by hand."""
    gen = same_inputs("prune", use_mapper, dtype)
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen, qk_std=1.5)
    params = [p.detach() for p in _small_mapper(gen).op_params()] if use_mapper else []
    scores = reference_scores(inp, params, q_pos=use_mapper)
    assert_separated(scores, inp.cu_seqlens_v, keep_ratio=0.25)
    counts = reference.keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.25)
    kept, cu_kept = reference.select_topk_ref(scores, inp.cu_seqlens_v, counts)
    q_pos = {"q_pos": inp.q_pos} if use_mapper else {}
    out = pruned(backend_name, device, inp, params, keep_ratio=0.25, **q_pos)
    assert torch.equal(out[2], kept) and torch.equal(out[3], cu_kept)
    assert torch.equal(out[0], inp.visual_embeds[kept])
    assert torch.equal(out[1], inp.visual_position_ids[:, kept])
    torch.testing.assert_close(out[4], scores, **scores_tolerance(backend_name))


MERGE_CASES = [  # (keep, dtype, mapper)
    ({"keep_ratio": 0.5}, torch.float32, True),
    ({"keep_count": 2}, torch.float32, True),
    ({"keep_ratio": 1.0}, torch.float32, True),
    ({"keep_ratio": 0.5}, torch.float16, True),
    ({"keep_ratio": 0.5}, torch.float16, False),
    ({"keep_ratio": 0.5}, torch.float32, False),
]


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize(("keep", "dtype", "use_mapper"), MERGE_CASES)
def test_prune_and_merge_equals_chain(backend_name, device, keep, dtype, use_mapper):
    """The parity test of ``prune_and_merge``: the reference's stages chained by hand, and the
    kept tokens of ``prune_visual_tokens`` on the same backend."""
    gen = same_inputs(keep, dtype, use_mapper)
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen, qk_std=1.5)
    params = [p.detach() for p in _small_mapper(gen).op_params()] if use_mapper else []
    scores = reference_scores(inp, params, q_pos=True)
    assert_separated(scores, inp.cu_seqlens_v, **keep)
    kept, _ = reference.select_topk_ref(
        scores, inp.cu_seqlens_v, reference.keep_counts_ref(inp.cu_seqlens_v, **keep)
    )
    out = merged(backend_name, device, inp, params, q_pos=inp.q_pos, **keep)
    assert_merged(out, inp, kept)
    assert torch.equal(
        out[4], pruned(backend_name, device, inp, params, q_pos=inp.q_pos, **keep)[2]
    )
    torch.testing.assert_close(out[5], scores, **scores_tolerance(backend_name))
    if keep.get("keep_ratio") == 1.0:
        assert out[0].shape[0] == inp.inputs_embeds.shape[0]


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
def test_empty_batch(backend_name, device):
    """B = 0 (cu_seqlens = [0]) is an empty batch, not an error, on every op."""
    cu = torch.tensor([0], device=device)
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    q, k = torch.zeros(0, 2, 4, device=device), torch.zeros(0, 1, 4, device=device)
    with backend.use_backend(backend_name):
        attn = tp.instruction_attention(q, k, cu, cu, idx, cu)
        kept, cu_kept = tp.select_topk(attn, cu, keep_ratio=0.5)
        adaptive = tp.select_topk(attn, cu, keep_mass=0.5)
        counts = tp.mass_keep_counts(attn, cu, 0.5)
        out = tp.prune_and_merge(
            q, k, cu, cu, torch.zeros(0, 8, device=device),
            torch.zeros(3, 0, dtype=torch.int64, device=device), cu,
            torch.zeros(0, 8, device=device), idx, cu, keep_ratio=0.5,
        )  # fmt: skip
    assert attn.shape == (0,) and kept.shape == (0,) and cu_kept.tolist() == [0]
    assert adaptive[0].shape == (0,) and adaptive[1].tolist() == [0] and counts.shape == (0,)
    assert out[0].shape == (0, 8) and out[1].shape == (3, 0) and out[2].tolist() == [0]


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
def test_composites_strided_inputs(backend_name, device, use_mapper):
    """Every argument a non-contiguous view: both composites equal the reference's results."""
    gen = same_inputs(use_mapper, "strided")
    layouts = [[("t", 1), ("v", 2), ("q", 2)], [("v", 3), ("q", 1)], [("t", 2), ("q", 1)]]
    inp = make_inputs(layouts, generator=gen, qk_std=1.5)
    params = [p.detach() for p in _small_mapper(gen).op_params()] if use_mapper else []
    keep = {"keep_count": 1, "q_pos": inp.q_pos}
    want_prune = pruned("ref", "cpu", inp, params, **keep)
    want_merge = merged("ref", "cpu", inp, params, **keep)
    # cu_seqlens_v = [0, 2, 5, 5] as a view whose flat memory reads [0, 9, 2, 9].
    cu_v = torch.tensor([0, 9, 2, 9, 5, 9, 5])[::2]
    s = inp.strided()
    s.cu_seqlens_v = cu_v
    keep["q_pos"] = s.q_pos
    params = [strided(p) for p in params]
    for got, want in (
        (pruned(backend_name, device, s, params, **keep), want_prune),
        (merged(backend_name, device, s, params, **keep), want_merge),
    ):
        for g, w in zip(got[:-1], want[:-1], strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)
        torch.testing.assert_close(got[-1], want[-1], rtol=2e-4, atol=2e-5)


MASS_KEEP = {"keep_mass": 0.6, "min_keep_ratio": 0.05, "max_keep_ratio": 0.8}


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_composites_keep_mass(backend_name, device, use_mapper, dtype):
    """The adaptive rule in both composites: per-sample counts and indices those of the
    reference rule on the scores the backend ranked (the mapper's softmax, or the raw attention
    normalised per sample), and those scores the reference's."""
    gen = same_inputs("mass", use_mapper, dtype)
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen, qk_std=1.5)
    params = [p.detach() for p in _small_mapper(gen).op_params()] if use_mapper else []
    out = pruned(backend_name, device, inp, params, q_pos=inp.q_pos, **MASS_KEEP)
    torch.testing.assert_close(out[4], reference_scores(inp, params, q_pos=True),
                               **scores_tolerance(backend_name))  # fmt: skip
    relevance = "softmax" if use_mapper else "normalize"
    rule = v.KeepRule(**MASS_KEEP)
    counts = reference.keep_rule_counts_ref(out[4], inp.cu_seqlens_v, rule, relevance)
    kept, cu_kept = reference.select_topk_ref(out[4], inp.cu_seqlens_v, counts)
    assert torch.equal(out[2], kept) and torch.equal(out[3], cu_kept)
    assert torch.equal(out[0], inp.visual_embeds[kept])
    n = (inp.cu_seqlens_v[1:] - inp.cu_seqlens_v[:-1]).tolist()
    assert counts.tolist() != [max(1, round(0.8 * m)) if m else 0 for m in n]  # not all capped
    assert_merged(
        merged(backend_name, device, inp, params, q_pos=inp.q_pos, **MASS_KEEP), inp, kept
    )


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize("keep", [{"keep_ratio": 0.5}, MASS_KEEP], ids=["ratio", "mass"])
def test_composite_under_torch_compile(backend_name, device, keep):
    """``prune_and_merge`` inside a ``torch.compile(fullgraph=True)`` function gives what it gives
    eagerly, on every backend (Triton: the fused select and merge), for a fixed and for the
    adaptive keep rule (a data-dependent count)."""
    gen = same_inputs("compile")
    inp = make_inputs(LAYOUTS, generator=gen, qk_std=1.5).to(device)
    params = [p.detach().to(device) for p in _small_mapper(gen).op_params()]

    def fn(q, k, inputs_embeds, visual_embeds):
        out = tp.prune_and_merge(
            q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inputs_embeds, inp.position_ids,
            inp.cu_seqlens, visual_embeds * 1.0, inp.visual_idx, inp.cu_seqlens_v, params,
            **keep,
        )  # fmt: skip
        return out[0].sum(-1), out[1], out[4]

    args = (inp.q, inp.k, inp.inputs_embeds, inp.visual_embeds)
    torch._dynamo.reset()
    with torch.no_grad(), backend.use_backend(backend_name):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


V2_CASES = [(2, False), (4, True), (1, True)]  # mapper v2 inputs: (attention channels, grid)


@pytest.mark.parametrize(("backend_name", "device"), BACKENDS)
@pytest.mark.parametrize(("groups", "grid"), V2_CASES, ids=["kv", "heads+grid", "mean+grid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_composites_with_v2_mapper_equal_chain(backend_name, device, groups, grid, dtype):
    """A mapper on G attention channels (the first block's input channels, less the grid's):
    the composites feed it instruction_attention_heads(head_groups=G) and the grid, and keep the
    reference chain's tokens exactly; inputs strided for the second call."""
    gen = same_inputs("v2", groups, grid, dtype)
    inp = make_inputs(LAYOUTS, dtype=dtype, heads_q=4, heads_k=2, generator=gen, qk_std=1.5)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = MapperConfig(channels=(4, 8, 16), attention_channels=groups, grid=grid)
    params = [p.detach() for p in TokenMapper(config).eval().op_params()]
    pos = torch.rand(inp.visual_idx.shape[0], 2, generator=gen) if grid else None
    s = inp.scoring(q_pos=True)
    if groups == 1:
        attn = reference.instruction_attention_ref(*s)
    else:
        attn = reference.instruction_attention_heads_ref(*s, groups)
    scores = reference.mapper_forward_ref(attn, inp.cu_seqlens_v, params, 5, 1e-4, pos)
    assert_separated(scores, inp.cu_seqlens_v, keep_ratio=0.25)
    counts = reference.keep_counts_ref(inp.cu_seqlens_v, keep_ratio=0.25)
    kept, cu_kept = reference.select_topk_ref(scores, inp.cu_seqlens_v, counts)
    grid_arg = None if pos is None else pos.to(device)
    for x, g in ((inp, grid_arg), (inp.strided(), None if pos is None else strided(grid_arg))):
        kw = {"keep_ratio": 0.25, "q_pos": x.q_pos, "mapper_grid": g}
        out = pruned(backend_name, device, x, params, **kw)
        assert torch.equal(out[2], kept) and torch.equal(out[3], cu_kept)
        torch.testing.assert_close(out[4], scores, **scores_tolerance(backend_name))
        out = merged(backend_name, device, x, params, **kw)
        assert torch.equal(out[4], kept)
        torch.testing.assert_close(out[5], scores, **scores_tolerance(backend_name))


def test_v2_mapper_errors(gen):
    inp = make_inputs(LAYOUTS, heads_q=4, heads_k=2, generator=gen)
    v2 = MapperConfig(channels=(4,), attention_channels=3)
    params = [p.detach() for p in TokenMapper(v2).op_params()]
    with pytest.raises(ValueError, match=r"attention channels \(3.*must divide the query heads"):
        pruned("ref", "cpu", inp, params, keep_ratio=0.5)
    with pytest.raises(ValueError, match="mapper_grid needs mapper_params"):
        pruned("ref", "cpu", inp, [], keep_ratio=0.5, mapper_grid=torch.zeros(1, 2))
    params = [p.detach() for p in TokenMapper(MapperConfig(channels=(4,))).op_params()]
    bad = torch.zeros(inp.visual_idx.shape[0], 3)
    with pytest.raises(ValueError, match=r"mapper_grid must be \[total_v, 2\]"):
        pruned("ref", "cpu", inp, params, keep_ratio=0.5, mapper_grid=bad)
