"""One warmed-up ``prune_and_merge`` call inside an NVTX range, for Nsight Compute / Systems.

    benchmarks/profile_ncu.sh 16384 0.5          # Nsight Compute, the kernels of one call
    nsys profile -t cuda,nvtx -o prune python benchmarks/profile_target.py --n-visual 16384

The profiled call is inside the NVTX range ``tokenprune.profile``; each stage inside it has its own
range (``tokenprune.instruction_attention``, ``tokenprune.mapper_forward``, ...).
"""

from __future__ import annotations

import argparse

import torch

import tokenprune_kernels as tp
from tokenprune_kernels import backend
from tokenprune_kernels._nvtx import stage_range
from tokenprune_kernels.bench import N_AFTER, N_INSTRUCTION, N_SYSTEM, QWEN2_VL_7B
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import make_inputs, simple_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-visual", type=int, default=16384)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--no-mapper", action="store_true", help="training-free mode")
    parser.add_argument("--backend", default="triton")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    layout = simple_layout(args.n_visual, N_INSTRUCTION, n_system=N_SYSTEM, n_after=N_AFTER)
    s = make_inputs([layout], dtype=torch.bfloat16, device="cuda", qk_std=1.5, **QWEN2_VL_7B)
    params = [] if args.no_mapper else TokenMapper(MapperConfig()).cuda().eval().op_params()
    params = [p.detach() for p in params]

    def call() -> object:
        return tp.prune_and_merge(
            s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.inputs_embeds, s.position_ids,
            s.cu_seqlens, s.visual_embeds, s.visual_idx, s.cu_seqlens_v, params,
            keep_ratio=args.keep,
        )  # fmt: skip

    with backend.use_backend(args.backend), torch.no_grad():
        for _ in range(3):  # JIT compilation and autotuning happen here, outside the range
            call()
        torch.cuda.synchronize()
        with stage_range("tokenprune.profile"):
            call()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
