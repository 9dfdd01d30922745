"""The number of distinct compilations of each kernel over a sweep of visual-token counts is
bounded by a small constant.

A launch compiles a new binary whenever its specialisation key is new: argument types, constexprs
and the ``tt.divisibility`` hints (an integer divisible by 16, or equal to 1, is specialised
unless the kernel lists it in ``do_not_specialize``). The host functions run under
:func:`~tokenprune_kernels.triton.launch.capture` (nothing runs, so any N_v is cheap) and each
launch's key is computed as ``JITFunction.run`` computes it, for an sm_90 GPU.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.triton.attention import (
    instruction_attention_heads_triton,
    instruction_attention_triton,
)
from tokenprune_kernels.triton.gather import select_gather_triton, select_merge_triton
from tokenprune_kernels.triton.launch import capture, specialisation
from tokenprune_kernels.triton.mapper import mapper_forward_triton

#: Compilations allowed per kernel (and input dtype) over the sweep: one, except the attention's
#: visual tile, which narrows (64 -> 32 -> 16) for short visual sequences.
BOUND = {"_visual_colsum_kernel": 3}


def _sweep(seed: int) -> list[int]:
    rng = random.Random(seed)
    edges = [1, 2, 15, 16, 17, 31, 32, 33, 48, 255, 256, 257, 1024, 4095, 4096]
    return edges + rng.sample(range(1, 4097), 120)


def _cu(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts]).cumsum(0)


def _attention(dtype: torch.dtype, groups: int | None = None) -> Callable[[list[int]], object]:
    """Stage a; with ``groups``, its per-head-group form (``instruction_attention_heads``)."""

    def call(n_v: list[int]):
        n_q = 7
        n_k = [v + n_q + 9 for v in n_v]
        q = torch.empty(n_q * len(n_v), 4, 32, dtype=dtype)
        k = torch.empty(sum(n_k), 2, 32, dtype=dtype)
        vidx = torch.zeros(sum(n_v), dtype=torch.int64)
        args = (q, k, _cu([n_q] * len(n_v)), _cu(n_k), vidx, _cu(n_v))
        if groups is None:
            return instruction_attention_triton(*args)
        return instruction_attention_heads_triton(*args, None, None, groups)

    return call


def _mapper(n_v: list[int], groups: int = 1, grid: bool = False):
    config = MapperConfig(channels=(8, 16), kernel_size=3, attention_channels=groups, grid=grid)
    params = TokenMapper(config).op_params()
    attn = torch.empty(sum(n_v)) if groups == 1 else torch.empty(sum(n_v), groups)
    xy = torch.empty(sum(n_v), 2) if grid else None
    return mapper_forward_triton(attn, _cu(n_v), params, 3, 1e-4, xy)


def _select(dtype: torch.dtype, merge: bool) -> Callable[[list[int]], object]:
    def call(n_v: list[int]):
        keep = torch.tensor([max(1, (n + 1) // 3) for n in n_v])
        total = int(keep.sum())
        scores = torch.empty(sum(n_v), dtype=dtype)
        vis = torch.empty(sum(n_v), 48, dtype=dtype)
        if not merge:
            pos = torch.empty(sum(n_v), dtype=torch.int64)
            return select_gather_triton(scores, _cu(n_v), keep, vis, pos, total_kept=total)
        lengths = [n + 9 for n in n_v]
        text = torch.empty(sum(lengths), 48, dtype=dtype)
        pos = torch.empty(3, sum(lengths), dtype=torch.int64)
        vidx = torch.cat([torch.arange(n) + 4 for n in n_v])
        return select_merge_triton(
            scores, _cu(n_v), keep, text, pos, _cu(lengths), vis, vidx, total_kept=total
        )

    return call


OPS = {
    "attention[fp32]": _attention(torch.float32),
    "attention[bf16]": _attention(torch.bfloat16),
    "attention_heads[fp16,G=2]": _attention(torch.float16, groups=2),
    "mapper": _mapper,
    "mapper[G=2,grid]": lambda n_v: _mapper(n_v, groups=2, grid=True),
    "select_gather[fp16]": _select(torch.float16, merge=False),
    "select_merge[bf16]": _select(torch.bfloat16, merge=True),
}


def compilations(call: Callable[[list[int]], object], sizes: list[list[int]]) -> dict[str, int]:
    """Kernel name -> distinct specialisation keys its launches get over ``sizes``."""
    keys: dict[str, set[str]] = defaultdict(set)
    for n_v in sizes:
        with capture() as launches:
            call(n_v)
        for record in launches:
            spec = specialisation(record)
            keys[spec.name].add(spec.key)
    return {name: len(k) for name, k in keys.items()}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("batch", [1, 3])
def test_compilations_over_nv_are_bounded(op, batch):
    rng = random.Random(f"{op}{batch}")
    sizes = [[n] + [rng.randint(1, 64) for _ in range(batch - 1)] for n in _sweep(batch)]
    counts = compilations(OPS[op], sizes)
    assert counts, op
    for name, count in counts.items():
        assert count <= BOUND.get(name, 1), (op, counts)


def test_the_count_sees_a_specialised_token_count():
    """What the bound guards against: the same sweep, with the token counts specialised as
    Triton does by default, compiles the mapper once per (N_v % 16 == 0, N_v == 1, other)."""
    from tokenprune_kernels.triton import launch as launch_mod
    from tokenprune_kernels.triton import mapper as mapper_mod

    kernel = launch_mod._jit(mapper_mod._mapper_forward_kernel)
    from triton.runtime.jit import JITFunction

    specialising = JITFunction(kernel.fn)  # no do_not_specialize
    original = mapper_mod._mapper_forward_kernel
    mapper_mod._mapper_forward_kernel = specialising
    try:
        counts = compilations(_mapper, [[n] for n in _sweep(0)])
    finally:
        mapper_mod._mapper_forward_kernel = original
    assert counts["_mapper_forward_kernel"] >= 3, counts
