"""Times gather_kept at N_v = 16384 (Qwen2-VL-7B hidden, bf16) for keep 50% and 25%.

    python benchmarks/alloc_effect.py
    MALLOC_MMAP_THRESHOLD_=268435456 python benchmarks/alloc_effect.py

Shows glibc's mmap threshold at work on CPU: outputs above it (at most 32 MiB by default) get
fresh pages from the OS on every call. See benchmarks/NOTES.md.
"""

from __future__ import annotations

import statistics
import time

import torch

import tokenprune_kernels as tp
from tokenprune_kernels.bench import bench_inputs


def main() -> None:
    s = bench_inputs(16384, 1, "cpu", torch.bfloat16)[0]
    gen = torch.Generator().manual_seed(0)
    for ratio in (0.5, 0.25):
        scores = torch.randn(16384, generator=gen)
        kept, _ = tp.select_topk(scores, s.cu_seqlens_v, keep_ratio=ratio)
        for _ in range(3):
            tp.gather_kept(s.visual_embeds, s.visual_position_ids, kept)
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            tp.gather_kept(s.visual_embeds, s.visual_position_ids, kept)
            times.append(time.perf_counter() - t0)
        mib = kept.numel() * s.visual_embeds.shape[1] * s.visual_embeds.element_size() / 2**20
        median_ms = statistics.median(times) * 1e3
        print(f"keep {ratio:g}: output {mib:.0f} MiB, median {median_ms:.2f} ms")


if __name__ == "__main__":
    main()
