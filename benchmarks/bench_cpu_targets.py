"""The CPU kernels of the scoring stages against the GEMMs they contain, interleaved in one run.

    python benchmarks/bench_cpu_targets.py --out benchmarks/results/cpu_targets.md
    python benchmarks/bench_cpu_targets.py --n-visual 4096 --rounds 9

Qwen2-VL-7B shapes (bench.py's), bf16 q/k, batch 1, 2 threads unless ``--threads``. Per N_v, one
round calls each of these once, in order, and the table gives each one's median and min over the
rounds and the ratios of medians (and of mins):

- ``attention``: ``instruction_attention`` on the automatic backend, bf16 and fp32 inputs;
- ``attention GEMM``: its logits as one fp32 GEMM, ``[Hq * Tq, D] @ [D, Tk]`` (the same FLOPs);
- ``mapper``: ``mapper_forward`` (default mapper) on the automatic backend;
- ``mapper GEMMs``: its pointwise layers as fp32 GEMMs, ``[N_v, C_in] @ [C_in, C_out]`` for each
  block and the head, bias included (``F.linear``);
- ``prune_and_merge``: with the mapper, keep 50%, automatic backend and ``TOKENPRUNE_BACKEND=ref``.

Interleaving makes the ratios hold on a machine other processes load (the load average at the
start and the end of the run is printed); the absolute times do not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenprune_kernels.bench import bench_inputs, environment, load_average, time_interleaved
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.ops import instruction_attention, mapper_forward, prune_and_merge

RATIOS = (
    ("attention bf16", "attention GEMM"),
    ("attention fp32", "attention GEMM"),
    ("mapper", "mapper GEMMs"),
    ("prune_and_merge ref", "prune_and_merge auto"),
)


def cases(n_visual: int) -> dict[str, tuple[str, object]]:
    """name -> (backend, fn of the round) for one N_v."""
    torch.manual_seed(0)
    params = [p.detach() for p in TokenMapper(MapperConfig()).eval().op_params()]
    s = bench_inputs(n_visual, 1, "cpu", torch.bfloat16)[0]
    s32 = bench_inputs(n_visual, 1, "cpu", torch.float32)[0]
    tq, hq, d = s.q.shape
    tk = s.k.shape[0]
    q_rows, keys = torch.randn(hq * tq, d), torch.randn(d, tk)
    scores = torch.empty(hq * tq, tk)
    attn = instruction_attention(
        s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, s.cu_seqlens_v
    )
    blocks = (len(params) - 2) // 6
    layers = [(params[6 * b + 2], params[6 * b + 3]) for b in range(blocks)]
    layers.append((params[-2], params[-1]))
    inputs = [torch.randn(n_visual, w.shape[1]) for w, _ in layers]

    def attention(inp):
        args = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx, inp.cu_seqlens_v)
        return lambda i: instruction_attention(*args)

    def mapper_gemms(i):
        for x, (w, b) in zip(inputs, layers, strict=True):
            F.linear(x, w, b)

    def composite(i):
        return prune_and_merge(
            s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.inputs_embeds, s.position_ids,
            s.cu_seqlens, s.visual_embeds, s.visual_idx, s.cu_seqlens_v, params, keep_ratio=0.5,
        )  # fmt: skip

    return {
        "attention bf16": ("auto", attention(s)),
        "attention fp32": ("auto", attention(s32)),
        "attention GEMM": ("auto", lambda i: torch.mm(q_rows, keys, out=scores)),
        "mapper": ("auto", lambda i: mapper_forward(attn, s.cu_seqlens_v, params)),
        "mapper GEMMs": ("auto", mapper_gemms),
        "prune_and_merge auto": ("auto", composite),
        "prune_and_merge ref": ("ref", composite),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-visual", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--rounds", type=int, default=7, help="calls of each case (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table to this .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = environment("cpu")
    lines = [f"- {k}: {v}" for k, v in info.items()]
    lines.append(f"- command: `python {shlex.join(sys.argv)}`")
    lines.append(f"- OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    lines.append(f"- load average (1, 5, 15 min) at the start: {load_average()}")
    table = ["| N_v | case | median ms | min ms |", "|---:|---|---:|---:|"]
    ratios = ["| N_v | ratio | of medians | of mins |", "|---:|---|---:|---:|"]
    for n in args.n_visual:
        times = time_interleaved(cases(n), "cpu", min_time_s=0.0, min_reps=args.rounds,
                                 max_reps=args.rounds)  # fmt: skip
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        for name in times:
            table.append(f"| {n} | {name} | {med[name]:.2f} | {low[name]:.2f} |")
        for a, b in RATIOS:
            ratios.append(f"| {n} | {a} / {b} | {med[a] / med[b]:.2f} | {low[a] / low[b]:.2f} |")
        print("\n".join(table[-len(times) :] + ratios[-len(RATIOS) :]), flush=True)
    lines.append(f"- load average at the end: {load_average()}")
    text = "\n".join(["# CPU kernels against their GEMMs", "", *lines, "", *table, "", *ratios])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
