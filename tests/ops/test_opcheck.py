"""Every op passes torch.library.opcheck and runs under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import backend_cases, make_inputs

LAYOUTS = [
    [("t", 3), ("v", 17), ("t", 2), ("v", 6), ("q", 4), ("t", 2)],
    [("t", 2), ("q", 3)],
    [("v", 11), ("q", 2)],
]


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    inp = make_inputs(LAYOUTS, dtype=dtype, generator=gen)
    params = TokenMapper(MapperConfig(channels=(4, 8, 8, 8, 16))).eval().op_params()
    params = [p.detach() for p in params]
    attn = tp.instruction_attention(
        inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v
    )
    kept, _ = tp.select_topk(attn, inp.cu_seqlens_v, keep_ratio=0.5)
    return inp, params, attn, kept


def _v2_inputs(inp):
    """Mapper v2's inputs: a mapper on 2 attention channels and the grid, its grid positions."""
    torch.manual_seed(1)
    config = MapperConfig(channels=(4, 8), attention_channels=2, grid=True)
    params = [p.detach() for p in TokenMapper(config).eval().op_params()]
    grid = torch.rand(inp.visual_idx.shape[0], 2, generator=torch.Generator().manual_seed(2))
    return params, grid


def _spread_coords(inp):
    """The spread rule's coordinates: each sample's visual tokens on a grid 4 tokens wide."""
    bounds = inp.cu_seqlens_v.tolist()
    local = torch.cat([torch.arange(bounds[b + 1] - bounds[b]) for b in range(len(bounds) - 1)])
    return torch.stack([torch.zeros_like(local), local // 4, local % 4], 1).to(torch.int32)


def _cases(dtype=torch.float32):
    inp, params, attn, kept = _inputs(dtype)
    v2_params, v2_grid = _v2_inputs(inp)
    coords = _spread_coords(inp)
    ops = torch.ops.tokenprune
    return {
        "instruction_attention": (ops.instruction_attention.default, tuple(inp.scoring(q_pos=True))),
        "instruction_attention_heads": (
            ops.instruction_attention_heads.default, (*inp.scoring(q_pos=True), 2)
        ),
        "mapper_forward": (ops.mapper_forward.default, (attn, inp.cu_seqlens_v, params, 5, 1e-4)),
        "mapper_forward[v2]": (
            ops.mapper_forward.default,
            (torch.stack([attn, attn * 0.5], 1), inp.cu_seqlens_v, v2_params, 5, 1e-4, v2_grid),
        ),
        "select_topk": (ops.select_topk.default, (attn.to(dtype), inp.cu_seqlens_v, 0.5, None)),
        "select_topk[mass]": (
            ops.select_topk.default,
            (attn.to(dtype), inp.cu_seqlens_v, None, None, 0.5, 0.1, 0.9, "normalize"),
        ),
        "select_topk[spread]": (
            ops.select_topk.default,
            (attn.to(dtype), inp.cu_seqlens_v, 0.5, None, None, 0.0, 1.0, "softmax", coords, 1),
        ),
        "select_topk[mass,spread]": (
            ops.select_topk.default,
            (attn.to(dtype), inp.cu_seqlens_v, None, None, 0.5, 0.1, 0.9, "normalize", coords, 2),
        ),
        "mass_keep_counts": (
            ops.mass_keep_counts.default, (attn.to(dtype) * 50, inp.cu_seqlens_v, 0.8, 0.0, 0.5)
        ),
        "gather_kept": (
            ops.gather_kept.default, (inp.visual_embeds, inp.visual_position_ids, kept)
        ),
        "merge_kept": (
            ops.merge_kept.default,
            (inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
             inp.visual_idx, inp.cu_seqlens_v, kept),
        ),
        "prune_visual_tokens": (
            ops.prune_visual_tokens.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
             inp.visual_embeds, inp.visual_position_ids, params, 5, 1e-4, 0.25, None, None, None),
        ),
        "prune_and_merge": (
            ops.prune_and_merge.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds,
             inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
             inp.cu_seqlens_v, [], 5, 1e-4, None, 3, inp.q_pos, 0.2),
        ),
        "prune_and_merge[v2]": (
            ops.prune_and_merge.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds,
             inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
             inp.cu_seqlens_v, v2_params, 5, 1e-4, 0.5, None, inp.q_pos, None, None, 0.0, 1.0,
             v2_grid),
        ),
        "prune_visual_tokens[spread]": (
            ops.prune_visual_tokens.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v,
             inp.visual_embeds, inp.visual_position_ids, params, 5, 1e-4, 0.25, None, None, None,
             None, 0.0, 1.0, None, coords, 1),
        ),
        "prune_and_merge[spread]": (
            ops.prune_and_merge.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds,
             inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
             inp.cu_seqlens_v, [], 5, 1e-4, None, 3, inp.q_pos, 0.2, None, 0.0, 1.0, None,
             coords.long(), 1),
        ),
        "prune_and_merge[mass]": (
            ops.prune_and_merge.default,
            (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds,
             inp.position_ids, inp.cu_seqlens, inp.visual_embeds, inp.visual_idx,
             inp.cu_seqlens_v, params, 5, 1e-4, None, None, inp.q_pos, None, 0.7, 0.1, 0.6),
        ),
    }  # fmt: skip


OPS = list(_cases().keys())


@pytest.mark.parametrize(
    "backend_name",
    [n for n, device, why in backend_cases("prune_and_merge") if device == "cpu" and not why],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, dtype, backend_name):
    op, args = _cases(dtype)[name]
    with backend.use_backend(backend_name):
        torch.library.opcheck(op, args)


def test_every_public_op_is_checked():
    from tokenprune_kernels.ops.schemas import PUBLIC_SCHEMAS

    assert {name.split("[")[0] for name in OPS} == set(PUBLIC_SCHEMAS)


@pytest.mark.parametrize("name", OPS)
def test_fullgraph_compile(name):
    op, args = _cases()[name]
    eager = op(*args)

    def fn(*a):
        return op(*a)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for e, c in zip(eager if isinstance(eager, tuple) else (eager,),
                    compiled if isinstance(compiled, tuple) else (compiled,), strict=True):  # fmt: skip
        assert torch.equal(e, c)


def test_fullgraph_inductor_pipeline():
    """The composite inside a compiled function with surrounding tensor work, Inductor backend."""
    inp, params, _, _ = _inputs()

    def fn(q, k, inputs_embeds, visual_embeds):
        embeds, pos, cu_out, src, kept, scores = tp.prune_and_merge(
            q * 1.0, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inputs_embeds, inp.position_ids,
            inp.cu_seqlens, visual_embeds * 2.0, inp.visual_idx, inp.cu_seqlens_v, params,
            keep_ratio=0.5,
        )  # fmt: skip
        return embeds.sum(dim=-1), pos + 1, cu_out, src, kept, torch.softmax(scores, 0)

    torch._dynamo.reset()
    args = (inp.q, inp.k, inp.inputs_embeds, inp.visual_embeds)
    with torch.no_grad():
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True)(*args)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w)


def _compiled_cases(dtype=torch.float32):
    """Each private op the table names, on its public op's case (gather and merge: the same
    arguments) or, for select, per-sample keep counts instead of the keep rule."""
    inp, _, attn, _ = _inputs(dtype)
    bounds = inp.cu_seqlens_v.tolist()  # spread: each sample on a grid 5 tokens wide
    local = torch.cat([torch.arange(bounds[b + 1] - bounds[b]) for b in range(len(bounds) - 1)])
    coords = torch.stack([torch.zeros_like(local), local // 5, local % 5], 1).to(torch.int32)
    own = {
        "_select_topk": (attn, inp.cu_seqlens_v, torch.tensor([3, 0, 4])),
        "_spread_select": (attn, inp.cu_seqlens_v, torch.tensor([3, 0, 4]), coords, 1),
        "_mass_keep_counts": (
            attn.to(dtype),
            inp.cu_seqlens_v,
            torch.tensor([[1, 0, 1], [9, 0, 3]]),
            0.6,
            "normalize",
        ),
    }
    public = _cases(dtype)
    return {
        name: (getattr(torch.ops.tokenprune, name).default, own.get(name) or public[name[1:]][1])
        for name in backend.kernels("cpp")
    } | {
        "_select_topk[total]": (
            torch.ops.tokenprune._select_topk.default,
            (*own["_select_topk"], 7),
        ),
        "_spread_select[total]": (
            torch.ops.tokenprune._spread_select.default,
            (*own["_spread_select"], 7),
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name", [*sorted(backend.kernels("cpp")), "_select_topk[total]", "_spread_select[total]"]
)
def test_compiled_ops_opcheck_and_compile(name, dtype):
    """The private compiled ops have fakes too: opcheck and fullgraph compile pass."""
    from tokenprune_kernels import _extension

    if not _extension.available():
        pytest.skip(f"compiled extension not built: {_extension.load_error()}")
    op, args = _compiled_cases(dtype)[name]
    torch.library.opcheck(op, args)
    torch._dynamo.reset()
    eager = op(*args)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args)
    if isinstance(eager, torch.Tensor):
        eager, compiled = (eager,), (compiled,)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


def _cuda_cases():
    inp, params, attn, _ = _inputs()
    inp, attn = inp.to("cuda"), attn.cuda()
    params = [p.cuda() for p in params]
    ops = torch.ops.tokenprune
    counts = torch.tensor([3, 0, 4], device="cuda")
    bounds = inp.cu_seqlens_v.tolist()  # spread: each sample on a grid 3 tokens wide
    rows = torch.cat([torch.arange(bounds[b + 1] - bounds[b]) for b in range(len(bounds) - 1)])
    rows = rows.cuda()
    zeros = torch.zeros_like(rows)
    return {
        "_instruction_attention": (ops._instruction_attention.default, tuple(inp.scoring(q_pos=True))),
        "_instruction_attention_heads": (
            ops._instruction_attention_heads.default, (*inp.scoring(q_pos=True), 4)
        ),
        "_mapper_forward": (ops._mapper_forward.default, (attn, inp.cu_seqlens_v, params, 5, 1e-4)),
        "_select_topk": (ops._select_topk.default, (attn, inp.cu_seqlens_v, counts, 7)),
        "_spread_select": (
            ops._spread_select.default,
            (attn, inp.cu_seqlens_v, counts, torch.stack([zeros, rows // 3, rows % 3], 1), 1, 7),
        ),
        "_mass_keep_counts": (
            ops._mass_keep_counts.default,
            (attn, inp.cu_seqlens_v, torch.tensor([[1, 0, 1], [9, 0, 3]], device="cuda"), 0.6,
             "normalize"),
        ),
        "_select_gather_kept": (
            ops._select_gather_kept.default,
            (attn, inp.cu_seqlens_v, counts, 7, inp.visual_embeds, inp.visual_position_ids),
        ),
        "_select_merge_kept": (
            ops._select_merge_kept.default,
            (attn, inp.cu_seqlens_v, counts, 7, inp.inputs_embeds, inp.position_ids,
             inp.cu_seqlens, inp.visual_embeds, inp.visual_idx),
        ),
    }  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["_instruction_attention", "_instruction_attention_heads",
                                  "_mapper_forward", "_select_topk", "_mass_keep_counts",
                                  "_spread_select", "_select_gather_kept",
                                  "_select_merge_kept"])  # fmt: skip
def test_cuda_compiled_ops_opcheck_and_compile(name):
    """The CUDA kernels of the private ops against their fakes: opcheck, fullgraph compile."""
    from tokenprune_kernels import _extension

    if not _extension.has_kernel("_select_gather_kept", "CUDA"):
        pytest.skip("the compiled extension has no CUDA kernels")
    op, args = _cuda_cases()[name]
    torch.library.opcheck(op, args)
    torch._dynamo.reset()
    eager = op(*args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)
