"""Lower every Triton kernel for a GPU target without a GPU (a compile check, nothing runs).

All the cases are here: for each kernel module the op table names (the modules of its Triton
entries, :func:`tokenprune_kernels.backend.triton_functions`), the kernel specialisations its host
code launches, with the constexpr values it uses. A case's signature comes from the kernel's own
argument names (:func:`case`): the constexprs by value, the pointers and float scalars by the type
the case gives them, every other argument ``i32``. ``python -m tokenprune_kernels.triton.lowering``
lowers all of them for Hopper (sm_90) and prints one line per case. It must run WITHOUT
``TRITON_INTERPRET=1`` (the interpreter replaces ``triton.jit`` functions with Python ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune_kernels import backend

_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


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


F32, F16, BF16, I32, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64


def ptr(dtype: torch.dtype) -> str:
    """The Triton pointer type of a tensor of ``dtype`` (``"*fp16"``, ``"*i64"``, ...)."""
    return _PTR[dtype]


def case(
    name: str,
    kernel: Any,
    types: Mapping[str, str],
    constexprs: Mapping[str, Any],
    options: Mapping[str, Any],
    aligned: Iterable[str] | None = (),
) -> LoweringCase:
    """A case whose signature follows ``kernel``'s own arguments, in order.

    Args:
        types: the type of every pointer (``*_ptr``) argument and of each non-``i32`` scalar.
        constexprs: the value of every ``tl.constexpr`` argument.
        aligned: ``None`` for no hints; else, besides every pointer (16-byte aligned, as torch
            allocates), the integer arguments a launch sees divisible by 16.

    Raises:
        ValueError: a pointer without a type, a constexpr without a value, or a name that is not
            an argument of ``kernel``.
    """
    label = f"{name} ({getattr(kernel, '__name__', kernel)})"
    args = list(kernel.arg_names)
    unknown = (set(types) | set(constexprs)) - set(args)
    if unknown:
        raise ValueError(f"{label}: {sorted(unknown)} are not arguments of the kernel")
    params = getattr(kernel, "params", None)  # a JITFunction's (the interpreter's has none)
    untyped = [p.name for p in params or () if p.is_constexpr and p.name not in constexprs]
    if untyped:
        raise ValueError(f"{label}: give the value of constexpr argument(s) {untyped}")
    signature = {}
    for arg in args:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
        elif arg.endswith("_ptr"):
            raise ValueError(f"{label}: give the type of pointer argument {arg!r}")
        else:
            signature[arg] = "i32"
    attrs = None
    if aligned is not None:
        ints = set(aligned)
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, arg in enumerate(args)
            if signature[arg].startswith("*") or arg in ints
        }
    return LoweringCase(name, kernel, signature, dict(constexprs), dict(options), attrs)


def for_kernel(types: Mapping[str, str], kernel: Any) -> dict[str, str]:
    """The entries of ``types`` that name arguments of ``kernel`` (types shared by a module's
    kernels, handed to :func:`case` per kernel)."""
    return {n: t for n, t in types.items() if n in kernel.arg_names}


# ------------------------------------------------------------------------------- attention


def _attention_cases(
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    has_q_pos: bool,
    index: torch.dtype,
    splits: int,
    block_v: int | None = None,
) -> list[LoweringCase]:
    import triton

    from tokenprune_kernels.triton import attention as att

    cfg = att._launch_config(dtype, head_dim)
    block_v = block_v or int(cfg["BLOCK_V"])
    label = f"{ptr(dtype)[1:]},D={head_dim},G={group},q_pos={has_q_pos},{ptr(index)[1:]}"
    common = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": cfg["BLOCK_D"],
        "BLOCK_M": cfg["BLOCK_M"],
        "HAS_Q_POS": has_q_pos,
        "DOT_PRECISION": cfg["DOT_PRECISION"],
        "DOT_F32": False,  # the GPU path
    }
    types = {"q_ptr": ptr(dtype), "k_ptr": ptr(dtype), "qk_scale": "fp32"}
    types |= {n: ptr(index) for n in ("q_pos_ptr", "visual_idx_ptr", "cu_q_ptr", "cu_k_ptr")}
    types |= {"cu_v_ptr": ptr(index), "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*fp32"}

    rows_options = {"num_warps": cfg["num_warps"], "num_stages": cfg["stages_rows"]}
    cols_options = {"num_warps": cfg["num_warps"], "num_stages": cfg["stages_cols"]}
    cols_const = {**common, "BLOCK_V": block_v, "BLOCK_S": triton.next_power_of_2(splits)}
    return [
        case(
            f"attention.row_stats[{label}]",
            att._row_stats_kernel,
            for_kernel(types, att._row_stats_kernel),
            {**common, "BLOCK_N": cfg["BLOCK_N"]},
            rows_options,
            aligned=None,
        ),
        case(
            f"attention.visual_colsum[{label},S<={splits},BLOCK_V={block_v}]",
            att._visual_colsum_kernel,
            for_kernel(types, att._visual_colsum_kernel),
            cols_const,
            cols_options,
            aligned=None,
        ),
    ]


def attention_cases() -> list[LoweringCase]:
    """Every kernel at D=128 for each dtype (GQA group 7 as in Qwen2-VL-7B, q_pos given and not,
    int64 and int32 offsets, 16/5/1 key splits, the narrowed visual tiles of short sequences) and
    at an odd head dim (D=80, padded to 128)."""
    from tokenprune_kernels.triton.attention import MAX_SPLITS

    return [
        *_attention_cases(F16, 128, 7, True, I64, MAX_SPLITS),
        *_attention_cases(BF16, 128, 7, False, I32, 1),
        *_attention_cases(BF16, 128, 7, True, I64, 4, block_v=16),
        *_attention_cases(F32, 128, 7, True, I64, 5),
        *_attention_cases(F32, 128, 7, False, I32, 4),
        *_attention_cases(F16, 80, 4, False, I64, 3, block_v=32),
    ]


# ---------------------------------------------------------------------------------- mapper


def _mapper_case(label: str, cu: torch.dtype, kernel_size: int, blocks: tuple[int, int, int]):
    from tokenprune_kernels.triton import mapper as mp

    types = {"attn_ptr": "*fp32", "grid_ptr": "*fp32", "cu_ptr": ptr(cu), "params_ptr": "*fp32"}
    types |= {"meta_ptr": "*i32"}
    types |= {"scratch_ptr": "*fp32", "out_ptr": "*fp32", "input_eps": "fp32"}
    options = {"num_warps": mp.NUM_WARPS, "num_stages": mp.NUM_STAGES}
    kernel = mp._mapper_forward_kernel
    constexprs = mp._constexprs(kernel_size, *blocks)
    return case(f"mapper.forward[{label}]", kernel, types, constexprs, options, aligned=None)


def mapper_cases() -> list[LoweringCase]:
    """The specialisations the host launches: the default mapper (any widths share one compile
    per K and cu dtype) and a small-tile one."""
    from tokenprune_kernels.triton import mapper as mp

    default = (mp.BLOCK_M, mp.BLOCK_K, mp.BLOCK_N)
    return [
        _mapper_case("K=5,i64,default", torch.int64, 5, default),
        _mapper_case("K=5,i32,default", torch.int32, 5, default),
        _mapper_case("K=3,i32,small", torch.int32, 3, (32, 16, 16)),
    ]


# ---------------------------------------------------------------------------------- select


def select_cases() -> list[LoweringCase]:
    """The serial select, every radix pass and the wide compaction, over score and offset
    dtypes."""
    from tokenprune_kernels.triton import select as sel

    def types(score: torch.dtype, cu: torch.dtype) -> dict[str, str]:
        return {
            "scores_ptr": ptr(score),
            "cu_v_ptr": ptr(cu),
            "counts_ptr": "*i64",
            "hist_ptr": "*i32",
            "kept_ptr": "*i64",
            "cu_kept_ptr": ptr(cu),
        }

    def kernel_case(kernel: Any, label: str, score, cu, constexprs, aligned=()) -> LoweringCase:
        wanted = for_kernel(types(score, cu), kernel)
        name = (
            f"select.{label}[{ptr(score)[1:]},cu={ptr(cu)[1:]}"
            + "".join(f",{k}={v}" for k, v in constexprs.items() if k == "PASS")
            + "]"
        )
        return case(name, kernel, wanted, constexprs, {"num_warps": sel.SELECT_WARPS}, aligned)

    def serial(score, cu):
        return kernel_case(
            sel._select_kernel, "select", score, cu, {"BLOCK": sel.BLOCK_V, "BLOCK_B": sel.BLOCK_B}
        )

    def radix(score, cu, p):
        return kernel_case(
            sel._radix_pass_kernel,
            "radix_pass",
            score,
            cu,
            {"PASS": p, "BLOCK": sel.BLOCK_V, "S_MAX": sel.WIDE_SLICES},
            ("slice_len",),
        )

    def compact(score, cu):
        return kernel_case(
            sel._wide_compact_kernel,
            "wide_compact",
            score,
            cu,
            {"BLOCK": sel.BLOCK_V, "BLOCK_B": sel.BLOCK_B, "S_MAX": sel.WIDE_SLICES},
            ("slice_len",),
        )

    return [
        serial(F32, I32),
        serial(F16, I64),
        serial(BF16, I32),
        *(radix(F32, I64, p) for p in range(4)),
        radix(BF16, I32, 0),
        radix(F16, I32, 3),
        compact(F32, I32),
        compact(BF16, I64),
    ]


# ---------------------------------------------------------------------------------- gather


def gather_cases() -> list[LoweringCase]:
    """The merge maps over offset and index dtypes; the row copy for merge and gather, over
    embedding and position dtypes, at the widest hidden block and at an unaligned H."""
    from tokenprune_kernels.triton import gather as g

    def maps(cu: torch.dtype, vidx: torch.dtype) -> LoweringCase:
        types = {
            "cu_ptr": ptr(cu),
            "cu_v_ptr": ptr(cu),
            "vidx_ptr": ptr(vidx),
            "kept_ptr": "*i64",
            "src_ptr": "*i64",
            "row_src_ptr": "*i64",
            "cu_out_ptr": ptr(cu),
        }
        return case(
            f"gather.merge_maps[cu={ptr(cu)[1:]},visual_idx={ptr(vidx)[1:]}]",
            g._merge_maps_kernel,
            types,
            {"BLOCK": g.MAPS_BLOCK},
            {"num_warps": g.MAPS_WARPS},
        )

    def copy(emb, pos, has_text: bool, block_h: int, aligned_h: bool = True) -> LoweringCase:
        """``aligned_h``: H and the row strides divisible by 16 (H = 3584, say), as a launch
        sees them."""
        types = {
            "out_ptr": ptr(emb),
            "text_ptr": ptr(emb),
            "vis_ptr": ptr(emb),
            "row_src_ptr": "*i64",
            "pos_out_ptr": ptr(pos),
            "pos_in_ptr": ptr(pos),
            "pos_idx_ptr": "*i64",
        }
        kind = "merge" if has_text else "gather"
        name = (
            f"gather.copy_rows[{ptr(emb)[1:]},pos={ptr(pos)[1:]},{kind},BLOCK_H={block_h},"
            f"H%16={'0' if aligned_h else '?'}]"
        )
        ints = ("hidden", "stride_out", "stride_text", "stride_vis") if aligned_h else ()
        return case(
            name,
            g._copy_rows_kernel,
            types,
            {"BLOCK_R": g.COPY_ROWS, "BLOCK_H": block_h, "HAS_TEXT": has_text},
            {"num_warps": g.COPY_WARPS},
            ints,
        )

    return [
        maps(I32, I64),
        maps(I64, I32),
        copy(F16, I64, True, g.COPY_MAX_H),
        copy(BF16, I32, True, g.COPY_MAX_H),
        copy(F32, I64, True, g.COPY_MAX_H),
        copy(F32, I32, False, g.COPY_MAX_H),
        copy(BF16, I64, False, 128, aligned_h=False),
    ]


#: Kernel module -> its cases.
CASES: dict[str, Callable[[], list[LoweringCase]]] = {
    "attention": attention_cases,
    "mapper": mapper_cases,
    "select": select_cases,
    "gather": gather_cases,
}


def modules() -> list[str]:
    """The kernel modules of the op table's Triton entries, in table order."""
    return list(dict.fromkeys(backend.triton_functions().values()))


def all_cases() -> list[LoweringCase]:
    """Every case of every kernel module the op table names.

    Raises:
        KeyError: a module the table names has no cases here.
    """
    missing = [m for m in modules() if m not in CASES]
    if missing:
        raise KeyError(f"no lowering cases for the Triton module(s) {missing}: add them to CASES")
    return [c for m in modules() for c in CASES[m]()]


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
    for c in all_cases():
        try:
            info = lower(c, args.capability)
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {c.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(
            f"ok   {info['name']}: ptx {info['ptx_bytes']} B, shared {info['shared_bytes']} B, "
            f"{info['num_warps']} warps, {info['seconds']:.1f} s"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
