"""Lower every Triton kernel for a GPU target without a GPU, and report its resources.

The cases are not written by hand: each kernel module the op table names (the modules of its
Triton entries, :func:`tokenprune_kernels.backend.triton_functions`) has SCENARIOS here - calls of
its host functions on representative inputs (the shipped model's shapes, every score / embedding
/ q-k dtype, int32 and int64 offsets, short and long visual sequences). The host functions run
under :func:`tokenprune_kernels.triton.launch.capture`, which records each launch instead of
running it, and :func:`tokenprune_kernels.triton.launch.specialisation` turns a launch into what
the JIT would compile: argument types, constexprs (declared, and integers equal to 1), the
``tt.divisibility`` hints of 16-byte-aligned pointers and of integers divisible by 16, and the
compile options. So a case is exactly a specialisation a real launch gets.

``python -m tokenprune_kernels.triton.lowering`` compiles every distinct specialisation for
Hopper (sm_90), runs ``ptxas -v`` on the PTX with the flags Triton's own compile uses, and prints
one line per case: registers per thread, spill bytes, shared memory, warps. It exits non-zero
when a case fails to compile or spills. It must run WITHOUT ``TRITON_INTERPRET=1`` (the
interpreter replaces ``triton.jit`` functions with Python ones).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune_kernels import backend
from tokenprune_kernels.triton.launch import (
    TARGET_SMS,
    Launch,
    Specialisation,
    capture,
    specialisation,
)

F32, F16, BF16, I32, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64
_SHORT = {F32: "fp32", F16: "fp16", BF16: "bf16", I32: "i32", I64: "i64"}


@dataclass(frozen=True)
class LoweringCase:
    """One kernel specialisation to lower.

    Attributes:
        name: ``"<module>.<kernel>[<scenario>]"``, the first scenario that launched it.
        spec: what the launch compiles (:class:`~tokenprune_kernels.triton.launch.Specialisation`).
    """

    name: str
    spec: Specialisation

    @property
    def kernel(self) -> Any:
        return self.spec.kernel


def _cu(counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=dtype)
    out[1:] = torch.tensor(counts).cumsum(0)
    return out


# ------------------------------------------------------------------------------- scenarios
# Each returns (label, thunk): the thunk calls host functions; inputs hold no meaningful values
# (nothing runs), only the dtypes, shapes, strides and alignment a launch sees.


def attention_scenarios() -> list[tuple[str, Callable[[], object]]]:
    """Qwen2-VL-7B heads (28 query, 4 KV, D=128) for each dtype: one long prompt (N_v 4096, the
    widest visual tile, 16 key splits), a batch of three short ones (narrowed tiles), q_pos
    given and not, int64 and int32 offsets; and an odd head dim (D=80, GQA group 4). Then the
    per-head-group column sums (``instruction_attention_heads``): one channel per KV head (G=4)
    at the widest tile for each dtype, one per query head (G=28)."""
    from tokenprune_kernels.triton.attention import (
        instruction_attention_heads_triton,
        instruction_attention_triton,
    )

    def call(dtype, n_v: list[int], idx, q_pos: bool, hq=28, hk=4, d=128, n_q=32, groups=None):
        def run():
            n_k = [v + n_q + 19 for v in n_v]
            q = torch.empty(n_q * len(n_v), hq, d, dtype=dtype)
            k = torch.empty(sum(n_k), hk, d, dtype=dtype)
            cu_q, cu_k, cu_v = _cu([n_q] * len(n_v), idx), _cu(n_k, idx), _cu(n_v, idx)
            vidx = torch.zeros(sum(n_v), dtype=idx)
            pos = torch.zeros(q.shape[0], dtype=idx) if q_pos else None
            if groups is not None:
                return instruction_attention_heads_triton(
                    q, k, cu_q, cu_k, vidx, cu_v, pos, None, groups
                )
            return instruction_attention_triton(q, k, cu_q, cu_k, vidx, cu_v, pos)

        label = f"{_SHORT[dtype]},D={d},B={len(n_v)},N_v={max(n_v)},q_pos={q_pos},{_SHORT[idx]}"
        return label + ("" if groups is None else f",G={groups}"), run

    out = []
    for dtype in (F16, BF16, F32):
        out += [
            call(dtype, [4096], I64, True),
            call(dtype, [200, 37, 311], I32, False),
            call(dtype, [50], I64, False),
        ]
    out.append(call(F16, [1000, 3], I64, False, hq=16, hk=4, d=80))
    out += [call(dtype, [4096], I64, True, groups=4) for dtype in (F16, BF16, F32)]
    out.append(call(BF16, [200, 37, 311], I32, False, groups=28))
    return out


def mapper_scenarios() -> list[tuple[str, Callable[[], object]]]:
    """The default mapper (5 blocks 32..512, K = 5) over int64 and int32 offsets, one and
    several samples; a small mapper (2 blocks, K = 3); mapper v2's input (the default widths on
    4 attention channels plus the grid)."""
    from tokenprune_kernels.mapper import MapperConfig, TokenMapper
    from tokenprune_kernels.triton.mapper import mapper_forward_triton

    def call(config: MapperConfig, counts: list[int], idx: torch.dtype):
        groups = config.attention_channels

        def run():
            params = TokenMapper(config).op_params()
            shape = (sum(counts),) if groups == 1 else (sum(counts), groups)
            attn = torch.empty(shape, dtype=torch.float32)
            grid = torch.empty(sum(counts), 2) if config.grid else None
            return mapper_forward_triton(
                attn, _cu(counts, idx), params, config.kernel_size, config.input_eps, grid
            )

        label = f"C={config.channels[-1]},K={config.kernel_size},B={len(counts)},{_SHORT[idx]}"
        v2 = groups > 1 or config.grid
        return label + (f",G={groups},grid={config.grid}" if v2 else ""), run

    default, small = MapperConfig(), MapperConfig(channels=(16, 24), kernel_size=3)
    v2 = MapperConfig(attention_channels=4, grid=True)
    return [
        call(default, [4096], I64),
        call(default, [300, 1000, 7], I32),
        call(small, [100, 5], I32),
        call(v2, [300, 1000, 7], I64),
    ]


def select_scenarios() -> list[tuple[str, Callable[[], object]]]:
    """The serial schedule (a batch) and the wide one (one 20k-token sample), for each score
    dtype and both offset dtypes."""
    from tokenprune_kernels.triton.select import select_topk_triton

    def call(dtype, counts: list[int], idx):
        def run():
            scores = torch.empty(sum(counts), dtype=dtype)
            keep = torch.tensor([max(1, n // 2) for n in counts])
            cu = _cu(counts, idx)
            return select_topk_triton(scores, cu, keep, total_kept=int(keep.sum()))

        return f"{_SHORT[dtype]},B={len(counts)},N_v={max(counts)},{_SHORT[idx]}", run

    out = []
    for dtype in (F32, F16, BF16):
        out += [call(dtype, [1000, 3000, 2], I32), call(dtype, [20000], I64)]
    return out


def gather_scenarios() -> list[tuple[str, Callable[[], object]]]:
    """The fused select + merge (M-RoPE position ids [3, T] int64) and select + gather ([T]
    int32) for each embedding dtype at hidden 3584, and the merge at an unaligned hidden size."""
    from tokenprune_kernels.triton.gather import select_gather_triton, select_merge_triton

    def call(dtype, hidden: int, merge: bool, pos_dtype, n_v=(1000, 577), extra=51):
        def run():
            counts = list(n_v)
            scores = torch.empty(sum(counts))
            keep = torch.tensor([max(1, n // 2) for n in counts])
            cu_v = _cu(counts, I64)
            vis = torch.empty(sum(counts), hidden, dtype=dtype)
            if not merge:
                pos = torch.empty(sum(counts), dtype=pos_dtype)
                return select_gather_triton(
                    scores, cu_v, keep, vis, pos, total_kept=int(keep.sum())
                )
            lengths = [n + extra for n in counts]
            text = torch.empty(sum(lengths), hidden, dtype=dtype)
            pos = torch.empty(3, sum(lengths), dtype=pos_dtype)
            vidx = torch.cat([torch.arange(n) + 14 for n in counts])
            return select_merge_triton(
                scores, cu_v, keep, text, pos, _cu(lengths, I64), vis, vidx,
                total_kept=int(keep.sum()),
            )  # fmt: skip

        kind = "merge" if merge else "gather"
        return f"{kind},{_SHORT[dtype]},H={hidden},pos={_SHORT[pos_dtype]}", run

    out = []
    for dtype in (BF16, F16, F32):
        out += [call(dtype, 3584, True, I64), call(dtype, 3584, False, I32)]
    out.append(call(BF16, 1000 + 3, True, I64))
    return out


#: Kernel module -> its scenarios.
SCENARIOS: dict[str, Callable[[], list[tuple[str, Callable[[], object]]]]] = {
    "attention": attention_scenarios,
    "mapper": mapper_scenarios,
    "select": select_scenarios,
    "gather": gather_scenarios,
}


def modules() -> list[str]:
    """The kernel modules of the op table's Triton entries, in table order."""
    return list(dict.fromkeys(backend.triton_functions().values()))


def launches(thunk: Callable[[], object], sms: int = TARGET_SMS) -> list[Launch]:
    """The launches ``thunk`` makes, recorded (nothing runs), planned for ``sms`` SMs."""
    with capture(sms) as recorded:
        thunk()
    return recorded


def module_cases(module: str, capability: int = 90) -> list[LoweringCase]:
    """The distinct specialisations of ``module``'s kernels that its scenarios launch, in launch
    order. A kernel launched several times in one scenario has the constexprs in which those
    launches differ in its name (``PASS=2``)."""
    cases: dict[str, LoweringCase] = {}
    for label, thunk in SCENARIOS[module]():
        records = [r for r in launches(thunk) if _module_of(r.kernel) == module]
        for record in records:
            spec = specialisation(record, capability)
            key = f"{spec.name}:{spec.key}"
            if key in cases:
                continue
            same = [r.kwargs for r in records if r.kernel is record.kernel]
            varying = [k for k, v in record.kwargs.items() if any(o.get(k) != v for o in same)]
            extra = "".join(f",{k}={record.kwargs[k]}" for k in varying)
            short = spec.name.removeprefix("_").removesuffix("_kernel")
            cases[key] = LoweringCase(f"{module}.{short}[{label}{extra}]", spec)
    return list(cases.values())


def _module_of(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return fn.__module__.rsplit(".", 1)[-1]


def all_cases(capability: int = 90) -> list[LoweringCase]:
    """Every case of every kernel module the op table names.

    Raises:
        KeyError: a module the table names has no scenarios here.
    """
    missing = [m for m in modules() if m not in SCENARIOS]
    if missing:
        raise KeyError(f"no lowering scenarios for the Triton module(s) {missing}: add them")
    return [c for m in modules() for c in module_cases(m, capability)]


# ---------------------------------------------------------------------------------- ptxas

_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_path(capability: int = 90) -> str:
    """The ptxas Triton itself runs for ``sm_<capability>`` (its bundled one unless
    ``TRITON_PTXAS_PATH`` says otherwise)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def ptxas_report(ptx: str, capability: int = 90, ptxas: str | None = None) -> dict[str, int]:
    """Registers per thread, stack frame and spill bytes of the one kernel in ``ptx``, from
    ``ptxas -v`` with the flags of Triton's own PTX -> cubin step.

    Raises:
        RuntimeError: ptxas fails, or its report has no register line.
    """
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = ptxas or ptxas_path(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", src + ".o"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    used, frame = _USED.search(text), _FRAME.search(text)
    if proc.returncode != 0 or used is None or frame is None:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {text[-2000:]}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"registers": int(used.group(1)), "stack": stack, "spill_stores": stores,
            "spill_loads": loads}  # fmt: skip


def lower(
    case: LoweringCase, capability: int = 90, warp_size: int = 32, ptxas: str | None = None
) -> dict[str, Any]:
    """Compile ``case`` to PTX for ``sm_<capability>`` and run ``ptxas -v`` on it.

    Returns:
        name, kernel, ptx_bytes, shared_bytes (Triton's shared memory per program), num_warps,
        registers, stack, spill_stores, spill_loads, seconds.

    Raises:
        RuntimeError: when run under ``TRITON_INTERPRET=1``, or ptxas fails.
    """
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        raise RuntimeError("lowering needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = case.spec
    src = ASTSource(
        fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs
    )
    start = time.perf_counter()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, warp_size), options=dict(spec.options)
    )
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    return {
        "name": case.name,
        "kernel": spec.name,
        "ptx_bytes": len(ptx),
        "shared_bytes": int(getattr(meta, "shared", 0)),
        "num_warps": int(getattr(meta, "num_warps", 0)),
        **ptxas_report(ptx, capability, ptxas),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability x10")
    parser.add_argument("--ptxas", help="ptxas to report with (default: Triton's own)")
    args = parser.parse_args(argv)
    failures = 0
    for c in all_cases(args.capability):
        try:
            info = lower(c, args.capability, ptxas=args.ptxas)
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {c.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        spills = info["spill_stores"] + info["spill_loads"]
        failures += spills > 0
        print(
            f"{'ok  ' if spills == 0 else 'SPILL'} {info['name']}: {info['registers']} registers, "
            f"spill {info['spill_stores']}/{info['spill_loads']} B, stack {info['stack']} B, "
            f"shared {info['shared_bytes']} B, {info['num_warps']} warps, "
            f"hints {','.join(c.spec.hinted()) or '-'}, {info['seconds']:.1f} s"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
