"""GPU parity of the compiled CUDA kernels (_gather_kept, _merge_kept) with the reference and the
compiled CPU kernels: the outputs are copies, so they must match bit for bit. Skipped without a
CUDA GPU (the `cuda` marker); the kernels' compilation is checked without one in test_build.py."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DTYPES,
    INDEX_DTYPES,
    MERGE_LAYOUTS,
    MERGE_MODES,
    assert_same_bits,
    kept_for,
    make_merge_inputs,
    merge_case,
    ops,
)

from tokenprune_kernels.reference import gather_kept_ref, merge_kept_ref

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_ext")]


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` on the GPU, the same dtype, shape and bits as `want` (on any device)."""
    assert got.device.type == "cuda"
    assert_same_bits(got.cpu(), want.cpu())


def to_cuda(args: dict) -> dict:
    return {k: v.cuda() for k, v in args.items()}


def test_cuda_kernels_registered():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("tokenprune::_gather_kept", "CUDA")
    assert has("tokenprune::_merge_kept", "CUDA")
    assert not has("tokenprune::_select_topk", "CUDA")  # no CUDA select in this extension


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
# Bad arguments raise before any kernel touches memory, and the GPU stays usable.


def test_gather_rejects_bad_arguments():
    e = torch.randn(6, 4, device="cuda")
    p = torch.arange(12, device="cuda").reshape(2, 6)
    for bad in ([6], [-1], [0, 2, 100]):
        with pytest.raises(ValueError, match="kept_idx"):
            ops()._gather_kept(e, p, torch.tensor(bad, device="cuda"))
    with pytest.raises(ValueError, match="kept_idx"):
        ops()._gather_kept(e, p, torch.tensor([0]))  # on the CPU
    with pytest.raises(ValueError, match="position_ids"):
        ops()._gather_kept(e, p.cpu(), torch.tensor([0], device="cuda"))
    got, _ = ops()._gather_kept(e, p, torch.tensor([5, 0], device="cuda"))
    assert torch.equal(got.cpu(), e.cpu()[[5, 0]])


def test_merge_rejects_bad_arguments(gen):
    args = make_merge_inputs([(10, 4), (6, 2)], torch.float32, 8, 1, torch.int64, torch.int64, gen)
    args["visual_idx"] = torch.tensor([1, 2, 5, 9, 0, 3])
    args = to_cuda(args)
    kept = torch.tensor([0, 2, 5], device="cuda")

    def bad(match, kept_idx=kept, **changes):
        with pytest.raises(ValueError, match=match):
            ops()._merge_kept(**{**args, **changes}, kept_idx=kept_idx)

    cuda = {"device": "cuda"}
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 10, 0, 3], **cuda))
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 9, 0, 6], **cuda))
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 5, 9, -1, 3], **cuda))
    bad("visual_idx", visual_idx=torch.tensor([1, 2, 2, 9, 0, 3], **cuda))
    bad("kept_idx", kept_idx=torch.tensor([0, 6], **cuda))
    bad("kept_idx", kept_idx=torch.tensor([-1, 2], **cuda))
    bad("kept_idx", kept_idx=torch.tensor([2, 0], **cuda))
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 10, 15], **cuda))
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 17, 16], **cuda))
    bad("cu_seqlens", cu_seqlens=torch.tensor([1, 10, 16], **cuda))
    bad("cu_seqlens_v", cu_seqlens_v=torch.tensor([0, 4, 5], **cuda))
    bad("cu_seqlens_v", cu_seqlens_v=torch.tensor([0, 6], **cuda))
    bad("cu_seqlens_v", cu_seqlens_v=torch.tensor([0, 4, 6]))  # on the CPU
    out = ops()._merge_kept(**args, kept_idx=kept)  # still works
    assert out[2].tolist() == [0, 8, 5 + 8]
