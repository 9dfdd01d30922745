"""Benchmark cases for every op on every backend available here, at Qwen2-VL-7B shapes.

Used by ``tokenprune bench`` (a table with the median time and the ratio to the reference) and by
``benchmarks/bench_ops.py`` (pytest-benchmark). Inputs are random, never zeros, and several input
sets are rotated so repeated runs do not just measure a warm cache.

The backends of one (op, N_v, keep) case are timed interleaved, one call each per round, so that
load from other processes hits them alike and their ratios hold on a busy machine. On the CPU two
roofline references join each round (:func:`roofline_fns`): one fp32 GEMM with the stage's FLOPs
and one copy moving the stage's compulsory bytes (:func:`stage_traffic`).
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenprune_kernels import backend
from tokenprune_kernels import ops as tp_ops
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.testing import PruningInputs, make_inputs, simple_layout

#: Qwen2-VL-7B's language model: 28 query heads, 4 key heads, head dim 128, hidden 3584.
QWEN2_VL_7B = {"heads_q": 28, "heads_k": 4, "head_dim": 128, "hidden": 3584}
N_INSTRUCTION = 32
N_SYSTEM = 14  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
N_AFTER = 5  # "<|im_end|>\n<|im_start|>assistant\n"
N_VISUAL = (1024, 4096, 16384)
KEEP_RATIOS = (0.5, 0.25)
STAGE_KEEP_INDEPENDENT = (
    "instruction_attention",
    "instruction_attention_heads",
    "mapper_forward",
    "mass_keep_counts",
)
#: The adaptive rule's threshold in the mass_keep_counts case (raw attention, normalised).
BENCH_KEEP_MASS = 0.9
BENCH_OPS = (*backend.STAGE_OPS, "prune_and_merge")
#: The spread rule's radius in the spread_select case (mapper v2's selection).
BENCH_SPREAD_RADIUS = 1


@dataclass
class Case:
    """One timed configuration: ``fn`` runs the op once on input set ``i``."""

    op: str
    n_visual: int
    keep_ratio: float | None
    backend: str
    fn: Callable[[int], object]
    nbytes: int = 0  # bytes the stage must move (stage_traffic)
    flops: int = 0  # FLOPs the stage's math needs (stage_traffic)


@dataclass
class Result:
    op: str
    n_visual: int
    keep_ratio: float | None
    backend: str
    median_ms: float
    reps: int
    vs_ref: float | None = None  # reference time / this time (> 1: faster than the reference)
    gemm_ms: float | None = None  # one fp32 GEMM with the stage's FLOPs (CPU; None: no FLOPs)
    copy_ms: float | None = None  # one copy moving the stage's bytes (CPU)

    @property
    def vs_roofline(self) -> float | None:
        """This time over the slower of the two roofline references (1.0: at the roofline)."""
        bound = max(self.gemm_ms or 0.0, self.copy_ms or 0.0)
        return self.median_ms / bound if bound > 0 else None


#: The traffic-model stage of each op (:func:`stage_traffic`).
OP_STAGE = {
    "instruction_attention": "attention",
    "instruction_attention_heads": "attention_heads",
    "mapper_forward": "mapper",
    "mass_keep_counts": "mass",
    "select_topk": "select",
    "spread_select": "spread",
    "gather_kept": "gather",
    "merge_kept": "merge",
    "prune_and_merge": "composite",
}


def mapper_widths(params: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(C_in, C_out) of each block's pointwise layer, then the head, from the op's params."""
    if not params:
        return []
    blocks = (len(params) - 2) // 6
    widths = [tuple(params[6 * b + 2].shape[::-1]) for b in range(blocks)]
    return [*widths, tuple(params[-2].shape[::-1])]


def stage_traffic(
    stage: str, s: PruningInputs, params: Sequence[torch.Tensor], kernel_size: int, kept: int
) -> tuple[int, int]:
    """(bytes that must move, FLOPs the math needs) of one call of ``stage`` on ``s`` keeping
    ``kept`` tokens. Stages: attention, attention_heads (one output column per KV head), mapper,
    mass, select, spread (select under the spread rule), gather, merge, composite
    (prune_and_merge with the mapper ``params``) and composite_free (without a mapper).

    The bytes count every input read once and every output written once; they ignore the
    intermediates a fused design avoids (the [N_v, 512] activations, the [Hq, Tq, Tk] logits; the
    mass stage's sort).
    The FLOPs count one q.k per (query, head, key) and the mapper's pointwise and depthwise
    layers per token; work a design adds (the Triton attention's second pass recomputes the
    visual columns: 2 * Hq * D * Tq * Tv more) is not counted.
    """
    es = s.q.element_size()
    tq, hq, d = s.q.shape
    tk, hk = s.k.shape[0], s.k.shape[1]
    tv, hidden = s.visual_embeds.shape
    tl = s.inputs_embeds.shape[0]
    rows = s.position_ids.shape[0]
    n_out = tl - tv + kept
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    att_bytes = (tq * hq * d + tk * hk * d) * es + tv * (8 + 4)
    att_flops = 2 * hq * d * tq * tk
    map_bytes = tv * 4 + param_bytes + tv * 4
    per_token = sum(2 * ci * co for ci, co in mapper_widths(params))
    per_token += sum(2 * kernel_size * ci for ci, _ in mapper_widths(params)[:-1])
    map_flops = per_token * tv
    sel_bytes = tv * 4 + kept * 8
    gather_bytes = 2 * kept * hidden * es + 2 * kept * rows * 8 + kept * 8
    merge_bytes = 2 * n_out * hidden * es + 2 * n_out * rows * 8 + n_out * 8 + tv * 8
    if stage == "attention":
        return att_bytes, att_flops
    if stage == "attention_heads":
        return att_bytes + tv * 4 * (hk - 1), att_flops
    if stage == "mapper":
        return map_bytes, map_flops
    if stage == "mass":
        return tv * 4, 0
    if stage == "select":
        return sel_bytes, 0
    if stage == "spread":  # the scores, the [Tv, 3] int64 coordinates, the kept indices
        return sel_bytes + tv * 3 * 8, 0
    if stage == "gather":
        return gather_bytes, 0
    if stage == "merge":
        return merge_bytes + kept * 8, 0
    if stage == "composite":
        return att_bytes + param_bytes + sel_bytes + merge_bytes, att_flops + map_flops
    if stage == "composite_free":
        return att_bytes + sel_bytes + merge_bytes, att_flops
    raise ValueError(f"unknown stage {stage!r}")


#: Shape of the roofline GEMM: [GEMM_M, GEMM_K] @ [GEMM_K, N], N from the FLOPs.
GEMM_M, GEMM_K = 1024, 256


def roofline_fns(flops: int, nbytes: int, device: str) -> dict[str, Callable[[], object]]:
    """The roofline references of a stage: ``gemm``, one fp32 GEMM
    ``[GEMM_M, GEMM_K] @ [GEMM_K, N]`` with ``N = round(flops / (2 * GEMM_M * GEMM_K))`` (absent
    when ``flops`` is 0), and ``copy``, one ``copy_`` of ``nbytes / 2`` bytes (it reads and
    writes them: ``nbytes`` move). Operands are allocated here, once."""
    fns: dict[str, Callable[[], object]] = {}
    if flops > 0:
        n = max(1, round(flops / (2 * GEMM_M * GEMM_K)))
        a = torch.randn(GEMM_M, GEMM_K, device=device)
        b = torch.randn(GEMM_K, n, device=device)
        c = torch.empty(GEMM_M, n, device=device)
        fns["gemm"] = lambda: torch.mm(a, b, out=c)
    src = torch.randint(0, 255, (max(1, nbytes // 2),), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    return fns


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
                tp_ops.instruction_attention(
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
                        tp_ops.select_topk(a, s.cu_seqlens_v, keep_ratio=ratio)[0]
                        for a, s in zip(attn, sets_, strict=True)
                    ]
                    if ratio is not None
                    else None
                )
                n_kept = n if kept is None else int(kept[0].numel())
                nbytes, flops = stage_traffic(OP_STAGE[op], sets_[0], params, 5, n_kept)
                for name in backends_for(op, device_type):
                    fn = _make_fn(op, sets_, attn, kept, params, ratio)
                    yield Case(op, n, ratio, name, fn, nbytes, flops)


@functools.cache
def raster_coords(n: int, device: torch.device) -> torch.Tensor:
    """[n, 3] int64 (segment 0, row, col) of ``n`` tokens in raster order on a grid
    ``isqrt(n)`` wide: one image, the spread rule's coordinates (made once per size)."""
    w = max(1, math.isqrt(n))
    i = torch.arange(n, device=device)
    return torch.stack([torch.zeros_like(i), i // w, i % w], 1)


def _make_fn(op, sets_, attn, kept, params, ratio) -> Callable[[int], object]:
    def run(i: int) -> object:
        s = sets_[i % len(sets_)]
        if op == "instruction_attention":
            return tp_ops.instruction_attention(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, s.cu_seqlens_v
            )
        if op == "instruction_attention_heads":
            return tp_ops.instruction_attention_heads(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.visual_idx, s.cu_seqlens_v
            )
        if op == "mapper_forward":
            return tp_ops.mapper_forward(attn[i % len(sets_)], s.cu_seqlens_v, params)
        if op == "mass_keep_counts":
            return tp_ops.mass_keep_counts(
                attn[i % len(sets_)], s.cu_seqlens_v, BENCH_KEEP_MASS, relevance="normalize"
            )
        if op == "select_topk":
            return tp_ops.select_topk(
                attn[i % len(sets_)].to(s.q.dtype), s.cu_seqlens_v, keep_ratio=ratio
            )
        if op == "spread_select":  # select_topk under the spread rule, one image's raster grid
            return tp_ops.select_topk(
                attn[i % len(sets_)].to(s.q.dtype), s.cu_seqlens_v, keep_ratio=ratio,
                spread_coords=raster_coords(s.visual_idx.shape[0], s.q.device),
                spread_radius=BENCH_SPREAD_RADIUS,
            )  # fmt: skip
        if op == "gather_kept":
            return tp_ops.gather_kept(s.visual_embeds, s.visual_position_ids, kept[i % len(sets_)])
        if op == "merge_kept":
            return tp_ops.merge_kept(
                s.inputs_embeds, s.position_ids, s.cu_seqlens, s.visual_embeds, s.visual_idx,
                s.cu_seqlens_v, kept[i % len(sets_)],
            )  # fmt: skip
        if op == "prune_and_merge":
            return tp_ops.prune_and_merge(
                s.q, s.k, s.cu_seqlens_q, s.cu_seqlens_k, s.inputs_embeds, s.position_ids,
                s.cu_seqlens, s.visual_embeds, s.visual_idx, s.cu_seqlens_v, params,
                keep_ratio=ratio,
            )  # fmt: skip
        raise ValueError(f"unknown op {op!r}")

    return run


def _timed(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one call of ``fn`` (CUDA: events around it)."""
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: dict[str, tuple[str, Callable[[int], object]]],
    device: str,
    min_time_s: float = 0.3,
    min_reps: int = 5,
    warmup: int = 2,
    max_reps: int = 200,
) -> dict[str, list[float]]:
    """Wall times (ms) of every entry of ``fns`` (name -> (backend, fn of the round)), run
    round-robin: one call of each per round, in order, under its backend, inputs rotated by the
    round. Rounds go on until every entry has ``min_reps`` calls and ``min_time_s`` of calls (or
    ``max_reps``)."""
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(warmup):
            for which, fn in fns.values():
                with backend.use_backend(which):
                    fn(i)
        i = 0
        while i < max_reps:
            for name, (which, fn) in fns.items():
                with backend.use_backend(which):
                    times[name].append(_timed(lambda fn=fn, i=i: fn(i), cuda))
            i += 1
            if i >= min_reps and all(sum(v) >= min_time_s * 1e3 for v in times.values()):
                break
    return times


def run_bench(
    device: str = "cpu", quick: bool = False, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Time every case; ``quick`` runs N_v = 1024 only with fewer repetitions (a smoke run).

    The backends of one (op, N_v, keep) and, on the CPU, its roofline references are timed
    interleaved (:func:`time_interleaved`)."""
    sizes = (N_VISUAL[0],) if quick else N_VISUAL
    cpu = torch.device(device).type == "cpu"
    results: list[Result] = []
    cases = list(iter_cases(device, n_visual=sizes))
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.op, case.n_visual, case.keep_ratio), []).append(case)
    for (op, n, ratio), group in groups.items():
        fns = {c.backend: (c.backend, c.fn) for c in group}
        if cpu:
            for name, fn in roofline_fns(group[0].flops, group[0].nbytes, device).items():
                fns[f"roofline_{name}"] = ("ref", lambda i, fn=fn: fn())
        times = time_interleaved(
            fns, device, min_time_s=0.05 if quick else 0.3, min_reps=3 if quick else 5
        )
        medians = {name: statistics.median(v) for name, v in times.items()}
        for c in group:
            r = Result(op, n, ratio, c.backend, medians[c.backend], len(times[c.backend]))
            r.gemm_ms = medians.get("roofline_gemm")
            r.copy_ms = medians.get("roofline_copy")
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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or "unknown"."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def git_commit() -> str:
    """The checkout's short commit, with " (with uncommitted changes)" where tracked files
    differ from it, or "unknown" (no git, not a checkout)."""
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
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    info["commit"] = git_commit()
    return info


def format_table(results: list[Result]) -> str:
    """A Markdown table: op, N_v, keep, backend, median ms, speed-up over the reference and, on
    the CPU, the roofline references measured in the same rounds (fp32 GEMM with the stage's
    FLOPs, copy of its bytes) and the time over the slower of the two."""
    lines = [
        "| op | N_v | keep | backend | median ms | reps | speed-up vs ref "
        "| fp32 GEMM ms (same FLOPs) | copy ms (same bytes) | x roofline |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in results:
        keep = "-" if r.keep_ratio is None else f"{r.keep_ratio:g}"
        ratio = "-" if r.vs_ref is None else f"{r.vs_ref:.2f}x"
        roof = "-" if r.vs_roofline is None else f"{r.vs_roofline:.2f}"
        cells = [r.op, str(r.n_visual), keep, r.backend, f"{r.median_ms:.3f}", str(r.reps), ratio,
                 ms(r.gemm_ms), ms(r.copy_ms), roof]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
