"""Triton and CUDA kernels against the eager reference and torch.compile(reference), Qwen2-VL-7B
shapes.

    python benchmarks/bench_triton.py --out benchmarks/results/triton_h100.md
    python benchmarks/bench_triton.py --n-visual 16384 65536 --stages composite
    python benchmarks/bench_triton.py --smoke        # tiny shapes on any machine, nothing timed

Per stage (instruction attention, mapper, select, merge) and for the whole op (``prune_and_merge``
with the mapper, and without it: the training-free mode), for N_v in {1k, 4k, 16k, 64k} and keep
50% / 25%: the median time over several input sets (``triton.testing.do_bench``: warm-up, L2
flushed before every call, median), the achieved GB/s and TFLOP/s, and the ratio to the memory
floor: the bytes the stage MUST move (``bytes_floor``: each input read once, each output written
once) over the device's measured copy bandwidth. The per-design traffic (what the kernels really
move, e.g. keys read twice by the two attention passes) is in benchmarks/TRITON.md.

Implementations: ``triton`` and ``cuda`` (the public op with ``TOKENPRUNE_BACKEND=triton`` /
``cuda``, argument checks included, as users call it), ``eager`` (the reference functions called
directly, no checks) and ``compile`` (``torch.compile`` of the same reference functions).
``--launches`` also counts the GPU kernels one call launches (torch.profiler), for the
launch-count table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenprune_kernels import _extension, backend, reference
from tokenprune_kernels.bench import (
    QWEN2_VL_7B,
    bench_inputs,
    environment,
    stage_traffic,
)
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.ops import (
    instruction_attention,
    mapper_forward,
    merge_kept,
    prune_and_merge,
    select_topk,
)
from tokenprune_kernels.testing import PruningInputs

STAGES = ("attention", "mapper", "select", "merge", "composite", "composite_free")
IMPLS = ("triton", "cuda", "eager", "compile")
FAST_IMPLS = ("triton", "cuda")  # run through the public ops on that backend
N_VISUAL = (1024, 4096, 16384, 65536)
KEEP_RATIOS = (0.5, 0.25)
KEEP_FREE = ("attention", "mapper")  # stages whose cost does not depend on the keep ratio


@dataclass
class Shape:
    """One benchmark input: sizes of the packed prompt (batch 1 unless ``batch`` > 1)."""

    n_visual: int
    keep: float | None
    batch: int = 1


@dataclass
class Row:
    stage: str
    n_visual: int
    keep: float | None
    impl: str
    median_us: float
    bytes_floor: int
    flops: int
    floor_us: float
    launches: int | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None

    @property
    def gbps(self) -> float:
        return self.bytes_floor / (self.median_us * 1e-6) / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / (self.median_us * 1e-6) / 1e12


# ----------------------------------------------------------------------------- callables
def _args_merge(s: PruningInputs) -> tuple:
    return (s.inputs_embeds, s.position_ids, s.cu_seqlens, s.visual_embeds, s.visual_idx,
            s.cu_seqlens_v)  # fmt: skip


def stage_fns(
    stage: str, impl: str, sets_: list, attn: list, kept: list, params: list, keep: float | None
) -> list[Callable[[], object]]:
    """One zero-argument callable per input set."""
    ref = reference
    if impl == "compile":
        ref = _compiled_reference()
    fns: list[Callable[[], object]] = []
    for i, s in enumerate(sets_):
        a, kidx = attn[i], (kept[i] if kept else None)
        counts = None if keep is None else reference.keep_counts_ref(s.cu_seqlens_v, keep)
        if impl in FAST_IMPLS:
            fns.append(_op_fn(stage, s, a, kidx, params, keep))
            continue
        if stage == "attention":
            fns.append(lambda s=s, f=ref.instruction_attention_ref: f(*s.scoring()))
        elif stage == "mapper":
            fns.append(
                lambda s=s, a=a, f=ref.mapper_forward_ref: f(
                    a, s.cu_seqlens_v, params, 5, 1e-4, validate=False
                )
            )
        elif stage == "select":
            fns.append(lambda s=s, a=a, c=counts, f=ref.select_topk_ref: f(a, s.cu_seqlens_v, c))
        elif stage == "merge":
            fns.append(lambda s=s, k=kidx, f=ref.merge_kept_ref: f(*_args_merge(s), k))
        elif stage in ("composite", "composite_free"):
            p = params if stage == "composite" else []
            fns.append(
                lambda s=s, p=p, f=ref.prune_and_merge_ref: f(
                    s.scoring(),
                    *_args_merge(s)[:4],
                    reference.MapperArgs(p, 5, 1e-4),
                    reference.KeepRule(keep_ratio=keep),
                )
            )
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return fns


def _op_fn(stage, s, a, kidx, params, keep) -> Callable[[], object]:
    """The public op of ``stage`` (its backend is chosen by the caller's ``use_backend``)."""
    if stage == "attention":
        return lambda: instruction_attention(*s.scoring())
    if stage == "mapper":
        return lambda: mapper_forward(a, s.cu_seqlens_v, params)
    if stage == "select":
        return lambda: select_topk(a, s.cu_seqlens_v, keep_ratio=keep)
    if stage == "merge":
        return lambda: merge_kept(*_args_merge(s), kidx)
    p = params if stage == "composite" else []
    return lambda: prune_and_merge(
        s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, *_args_merge(s), p, keep_ratio=keep
    )


class _CompiledReference:
    """The reference functions, each wrapped once in ``torch.compile``."""

    def __init__(self) -> None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for name in ("instruction_attention_ref", "mapper_forward_ref", "select_topk_ref",
                     "merge_kept_ref", "prune_and_merge_ref"):  # fmt: skip
            setattr(self, name, torch.compile(getattr(reference, name), dynamic=False))


_COMPILED: _CompiledReference | None = None


def _compiled_reference() -> _CompiledReference:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _CompiledReference()
    return _COMPILED


# ----------------------------------------------------------------------------- timing
def time_us(fns: list[Callable[[], object]], smoke: bool) -> float:
    """Median over input sets of each set's do_bench median (microseconds)."""
    if smoke:  # one call per set; the number only proves the path runs
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    from triton.testing import do_bench

    return statistics.median(
        do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3 for f in fns
    )


def copy_bandwidth(device: str, smoke: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), 1 GiB buffer."""
    n = (1 << 20) if smoke else (1 << 29)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_us([lambda: dst.copy_(src)], smoke)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def count_launches(fn: Callable[[], object]) -> int:
    """GPU kernels one call of ``fn`` launches (memcpy/memset included), via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ----------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> tuple[list[Row], float]:
    device = "cpu" if args.smoke else args.device
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    dims = dict(heads_q=4, heads_k=2, head_dim=16, hidden=24) if args.smoke else QWEN2_VL_7B
    torch.manual_seed(0)
    cfg = MapperConfig(channels=(4, 8)) if args.smoke else MapperConfig()
    params = [p.detach().to(device) for p in TokenMapper(cfg).eval().op_params()]
    bandwidth = copy_bandwidth(device, args.smoke)
    rows: list[Row] = []
    for n in args.n_visual:
        sets_ = bench_inputs(n, args.sets, device, dtype, dims, seed=7919)
        with torch.no_grad():
            attn = [reference.instruction_attention_ref(*s.scoring()) for s in sets_]
        for stage in args.stages:
            for keep in (None,) if stage in KEEP_FREE else tuple(args.keep):
                kept = None
                n_kept = n
                if keep is not None:
                    counts = reference.keep_counts_ref(sets_[0].cu_seqlens_v, keep)
                    n_kept = int(counts.sum())
                    kept = [
                        reference.select_topk_ref(a, s.cu_seqlens_v, counts)[0]
                        for a, s in zip(attn, sets_, strict=True)
                    ]
                nbytes, flops = stage_traffic(stage, sets_[0], params, cfg.kernel_size, n_kept)
                for impl in args.impls:
                    if impl == "eager" and n > args.max_eager:
                        continue
                    fns = stage_fns(stage, impl, sets_, attn, kept, params, keep)
                    name = impl if impl in FAST_IMPLS else "ref"
                    with backend.use_backend(name), torch.no_grad():
                        us = time_us(fns, args.smoke)
                        launches = count_launches(fns[0]) if args.launches else None
                    row = Row(stage, n, keep, impl, us, nbytes, flops,
                              nbytes / bandwidth * 1e6, launches)  # fmt: skip
                    rows.append(row)
                    print(_line(row), file=sys.stderr, flush=True)
    base = {(r.stage, r.n_visual, r.keep, r.impl): r.median_us for r in rows}
    for r in rows:
        eager = base.get((r.stage, r.n_visual, r.keep, "eager"))
        comp = base.get((r.stage, r.n_visual, r.keep, "compile"))
        r.vs_eager = eager / r.median_us if eager else None
        r.vs_compile = comp / r.median_us if comp else None
    return rows, bandwidth


def _line(r: Row) -> str:
    keep = "-" if r.keep is None else f"{r.keep:g}"
    return f"{r.stage:15s} N_v={r.n_visual:6d} keep={keep:4s} {r.impl:8s} {r.median_us:11.1f} us"


def format_rows(rows: list[Row], bandwidth: float) -> str:
    head = (
        f"Copy bandwidth (measured, read + write): {bandwidth / 1e9:.0f} GB/s.\n\n"
        "| stage | N_v | keep | impl | median us | GB/s (floor bytes) | TFLOP/s | floor us "
        "| x floor | vs eager | vs compile | launches |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    out = [head]
    for r in rows:
        cells = [
            r.stage, str(r.n_visual), "-" if r.keep is None else f"{r.keep:g}", r.impl,
            f"{r.median_us:.1f}", f"{r.gbps:.0f}", f"{r.tflops:.2f}", f"{r.floor_us:.1f}",
            f"{r.median_us / r.floor_us:.2f}",
            "-" if r.vs_eager is None else f"{r.vs_eager:.1f}x",
            "-" if r.vs_compile is None else f"{r.vs_compile:.1f}x",
            "-" if r.launches is None else str(r.launches),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--n-visual", type=int, nargs="+", default=list(N_VISUAL))
    parser.add_argument("--keep", type=float, nargs="+", default=list(KEEP_RATIOS))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--sets", type=int, default=3, help="input sets per shape")
    parser.add_argument("--max-eager", type=int, default=1 << 30,
                        help="skip eager/compile above this N_v (memory)")  # fmt: skip
    parser.add_argument("--launches", action="store_true", help="count kernels per call (GPU)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (interpreter), one call each"
    )
    parser.add_argument("--out", type=Path, help="write a Markdown results file here")
    args = parser.parse_args(argv)
    if "cuda" in args.impls and not _extension.has_kernel("_select_topk", "CUDA"):
        print("bench_triton: no CUDA kernels in this build: --impls cuda skipped", file=sys.stderr)
        args.impls = [i for i in args.impls if i != "cuda"]
    if args.smoke:
        args.n_visual = [n for n in args.n_visual if n <= 64] or [23]
        args.sets = 1
        args.launches = False
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, bandwidth = run(args)
    table = format_rows(rows, bandwidth)
    command = "python benchmarks/bench_triton.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    env = environment("cpu" if args.smoke else args.device)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# Triton kernels vs reference\n\n{header}\n- command: `{command}`\n\n{table}\n"
    if args.smoke:
        text = text.replace("# Triton kernels", "# SMOKE RUN (interpreter, not a timing): Triton")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
