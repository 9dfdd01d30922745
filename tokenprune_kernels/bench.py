"""Benchmark cases for every op on every backend available here, at Qwen2-VL-7B shapes.

Used by ``tokenprune bench`` (a table with the median time and the ratio to the reference) and by
``benchmarks/bench_ops.py`` (pytest-benchmark). Inputs are random, never zeros, and several input
sets are rotated so repeated runs do not just measure a warm cache.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenprune_kernels import backend
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.ops import (
    gather_kept,
    instruction_attention,
    mapper_forward,
    merge_kept,
    prune_and_merge,
    select_topk,
)
from tokenprune_kernels.testing import PruningInputs, make_inputs, simple_layout

#: Qwen2-VL-7B's language model: 28 query heads, 4 key heads, head dim 128, hidden 3584.
QWEN2_VL_7B = {"heads_q": 28, "heads_k": 4, "head_dim": 128, "hidden": 3584}
N_INSTRUCTION = 32
N_SYSTEM = 14  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
N_AFTER = 5  # "<|im_end|>\n<|im_start|>assistant\n"
N_VISUAL = (1024, 4096, 16384)
KEEP_RATIOS = (0.5, 0.25)
STAGE_KEEP_INDEPENDENT = ("instruction_attention", "mapper_forward")
BENCH_OPS = (*backend.STAGE_OPS, "prune_and_merge")


@dataclass
class Case:
    """One timed configuration: ``fn`` runs the op once on input set ``i``."""

    op: str
    n_visual: int
    keep_ratio: float | None
    backend: str
    fn: Callable[[int], object]


@dataclass
class Result:
    op: str
    n_visual: int
    keep_ratio: float | None
    backend: str
    median_ms: float
    reps: int
    vs_ref: float | None = None  # reference time / this time (> 1: faster than the reference)


def backends_for(op: str, device_type: str) -> list[str]:
    """Backends to time for ``op``: the reference plus every fast backend implemented here."""
    if op == "prune_and_merge":
        return ["ref", "auto"]
    # Triton on the CPU is the interpreter (a test tool, ~1000x slower): never timed here.
    candidates = ("cpp", "cuda", "triton") if device_type != "cpu" else ("cpp",)
    fast = [b for b in candidates if backend.implemented(op, b, device_type)]
    return ["ref", *fast]


def bench_inputs(
    n_visual: int,
    sets: int,
    device: str,
    dtype: torch.dtype,
    dims: dict[str, int] = QWEN2_VL_7B,
    seed: int = 1000,
) -> list[PruningInputs]:
    """``sets`` random input sets of one prompt with ``n_visual`` visual tokens, model ``dims``
    (Qwen2-VL-7B's by default); set ``s`` is seeded with ``seed * n_visual + s``."""
    layout = simple_layout(n_visual, N_INSTRUCTION, n_system=N_SYSTEM, n_after=N_AFTER)
    return [
        make_inputs(
            [layout],
            dtype=dtype,
            device=device,
            qk_std=1.5,
            generator=torch.Generator().manual_seed(seed * n_visual + s),
            **dims,
        )
        for s in range(sets)
    ]


def iter_cases(
    device: str = "cpu",
    n_visual: tuple[int, ...] = N_VISUAL,
    keep_ratios: tuple[float, ...] = KEEP_RATIOS,
    ops: tuple[str, ...] = BENCH_OPS,
    dtype: torch.dtype = torch.bfloat16,
    sets: int = 3,
) -> Iterator[Case]:
    """Every (op, N_v, keep, backend) case, inputs built lazily per N_v."""
    torch.manual_seed(0)
    mapper = TokenMapper(MapperConfig()).eval().to(device)
    params = [p.detach() for p in mapper.op_params()]
    device_type = torch.device(device).type
    for n in n_visual:
        sets_ = bench_inputs(n, sets, device, dtype)
        with torch.no_grad():
            attn = [
                instruction_attention(
                    s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, s.cu_seqlens_v
                )
                for s in sets_
            ]
        for op in ops:
            ratios: tuple[float | None, ...] = (
                (None,) if op in STAGE_KEEP_INDEPENDENT else keep_ratios
            )
            for ratio in ratios:
                kept = (
                    [
                        select_topk(a, s.cu_seqlens_v, keep_ratio=ratio)[0]
                        for a, s in zip(attn, sets_, strict=True)
                    ]
                    if ratio is not None
                    else None
                )
                for name in backends_for(op, device_type):
                    yield Case(op, n, ratio, name, _make_fn(op, sets_, attn, kept, params, ratio))


def _make_fn(op, sets_, attn, kept, params, ratio) -> Callable[[int], object]:
    def run(i: int) -> object:
        s = sets_[i % len(sets_)]
        if op == "instruction_attention":
            return instruction_attention(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, s.cu_seqlens_v
            )
        if op == "mapper_forward":
            return mapper_forward(attn[i % len(sets_)], s.cu_seqlens_v, params)
        if op == "select_topk":
            return select_topk(attn[i % len(sets_)].to(s.q.dtype), s.cu_seqlens_v, keep_ratio=ratio)
        if op == "gather_kept":
            return gather_kept(s.visual_embeds, s.visual_position_ids, kept[i % len(sets_)])
        if op == "merge_kept":
            return merge_kept(
                s.inputs_embeds, s.position_ids, s.cu_seqlens, s.visual_embeds, s.visual_idx,
                s.cu_seqlens_v, kept[i % len(sets_)],
            )  # fmt: skip
        if op == "prune_and_merge":
            return prune_and_merge(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.inputs_embeds, s.position_ids,
                s.cu_seqlens, s.visual_embeds, s.visual_idx, s.cu_seqlens_v, params,
                keep_ratio=ratio,
            )  # fmt: skip
        raise ValueError(f"unknown op {op!r}")

    return run


def time_case(
    case: Case, device: str, min_time_s: float = 0.3, min_reps: int = 5, warmup: int = 2
) -> Result:
    """Median wall time of ``case`` (CUDA: events around each call), warmed up, inputs rotated."""
    cuda = torch.device(device).type == "cuda"
    with backend.use_backend(case.backend), torch.no_grad():
        for i in range(warmup):
            case.fn(i)
        times: list[float] = []
        start_all = time.perf_counter()
        i = 0
        while len(times) < min_reps or time.perf_counter() - start_all < min_time_s:
            if cuda:
                begin, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                begin.record()
                case.fn(i)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                case.fn(i)
                times.append((time.perf_counter() - t0) * 1e3)
            i += 1
            if len(times) >= 200:
                break
    return Result(
        case.op, case.n_visual, case.keep_ratio, case.backend, statistics.median(times), len(times)
    )


def run_bench(
    device: str = "cpu", quick: bool = False, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Time every case; ``quick`` runs N_v = 1024 only with fewer repetitions (a smoke run)."""
    sizes = (N_VISUAL[0],) if quick else N_VISUAL
    results: list[Result] = []
    for case in iter_cases(device, n_visual=sizes):
        r = time_case(case, device, min_time_s=0.05 if quick else 0.3, min_reps=3 if quick else 5)
        results.append(r)
        if progress:
            keep = "-" if r.keep_ratio is None else f"{r.keep_ratio:g}"
            progress(
                f"{r.op:22s} N_v={r.n_visual:6d} keep={keep:4s} {r.backend:6s} "
                f"{r.median_ms:9.3f} ms"
            )
    ref = {(r.op, r.n_visual, r.keep_ratio): r.median_ms for r in results if r.backend == "ref"}
    for r in results:
        base = ref.get((r.op, r.n_visual, r.keep_ratio))
        r.vs_ref = base / r.median_ms if base and r.median_ms > 0 else None
    return results


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, str]:
    """Device, versions and commit, for the header of a results file."""
    import tokenprune_kernels
    from tokenprune_kernels import _extension

    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    info = {
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenprune_kernels": tokenprune_kernels.__version__,
        "extension": "loaded"
        if _extension.available()
        else f"not loaded ({_extension.load_error()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def format_table(results: list[Result]) -> str:
    """A Markdown table: op, N_v, keep, backend, median ms, speed-up over the reference."""
    lines = [
        "| op | N_v | keep | backend | median ms | reps | speed-up vs ref |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        keep = "-" if r.keep_ratio is None else f"{r.keep_ratio:g}"
        ratio = "-" if r.vs_ref is None else f"{r.vs_ref:.2f}x"
        cells = [r.op, str(r.n_visual), keep, r.backend, f"{r.median_ms:.3f}", str(r.reps), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
