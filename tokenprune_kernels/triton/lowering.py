"""Lower every Triton kernel for a GPU target without a GPU (a compile check, nothing runs).

Each kernel module lists ``LOWERING_CASES``: the kernels with a concrete signature and the
constexpr values the host code launches them with. ``python -m tokenprune_kernels.triton.lowering``
lowers all of them for Hopper (sm_90) and prints one line per case. It must run WITHOUT
``TRITON_INTERPRET=1`` (the interpreter replaces ``triton.jit`` functions with Python ones).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tokenprune_kernels import backend


@dataclass(frozen=True)
class LoweringCase:
    """One kernel specialisation to lower.

    Attributes:
        name: label for reports, e.g. ``"attention.row_stats[fp16,D=128]"``.
        kernel: the ``@triton.jit`` function.
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"``), for every argument in order.
        constexprs: values of the ``constexpr`` arguments.
        options: compile options (``num_warps``, ``num_stages``).
        attrs: specialisation hints as ``ASTSource`` takes them, e.g.
            ``{(0,): [["tt.divisibility", 16]]}`` for a 16-byte aligned first pointer (what a real
            launch infers from aligned tensors; it enables async copies and wider loads).
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    attrs: dict[Any, Any] | None = None


def all_cases() -> list[LoweringCase]:
    """Every module's ``LOWERING_CASES``, for the modules of the op table's Triton entries."""
    cases: list[LoweringCase] = []
    for name in dict.fromkeys(backend.triton_functions().values()):
        module = importlib.import_module(f"tokenprune_kernels.triton.{name}")
        cases.extend(module.LOWERING_CASES)
    return cases


def lower(case: LoweringCase, capability: int = 90, warp_size: int = 32) -> dict[str, Any]:
    """Compile ``case`` to PTX and cubin for ``sm_<capability>``; returns sizes and resources.

    Raises:
        RuntimeError: when run under ``TRITON_INTERPRET=1``.
    """
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        raise RuntimeError("lowering needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs
    )
    start = time.perf_counter()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, warp_size), options=dict(case.options)
    )
    meta = compiled.metadata
    return {
        "name": case.name,
        "ptx_bytes": len(compiled.asm["ptx"]),
        "shared_bytes": int(getattr(meta, "shared", 0)),
        "num_warps": int(getattr(meta, "num_warps", 0)),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability x10")
    args = parser.parse_args(argv)
    failures = 0
    for case in all_cases():
        try:
            info = lower(case, args.capability)
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {case.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(
            f"ok   {info['name']}: ptx {info['ptx_bytes']} B, shared {info['shared_bytes']} B, "
            f"{info['num_warps']} warps, {info['seconds']:.1f} s"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
