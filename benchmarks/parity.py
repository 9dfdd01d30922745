"""Every backend of every stage against the reference, and the fast backends against each other.

    python3 benchmarks/parity.py --out results/parity.md            # GPU: ref, cuda, triton
    python3 benchmarks/parity.py --device cpu --smoke --out p.md    # CPU: ref, cpp, (triton)

For each stage (instruction attention, alone and per group of heads, mapper, select, merge, and
the whole ``prune_and_merge``) and each case (awkward sizes: 1, primes, ragged batches,
non-contiguous q / k, Qwen2-VL-7B heads; every dtype), the public op runs on each backend that
implements it here (forced with :func:`tokenprune_kernels.backend.use_backend`) and is compared
with the plain-PyTorch reference:

- float outputs (attention, mapper logits, the composite's scores): the largest absolute and
  relative error against the reference, within a per-dtype tolerance;
- selections: the kept indices must EQUAL the reference's selection of the same scores;
- copies (merge outputs): bit-equal.

The fast backends are also compared with each other (``cuda`` vs ``triton`` on a GPU). One
Markdown table (and a JSON file beside it) per run; the exit status is 1 if any row fails. On the
CPU (``--device cpu``) the backends are ``ref`` and ``cpp`` (and ``triton`` under
``TRITON_INTERPRET=1`` when triton is installed and ``--triton`` is given: slow).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Tolerance on the attention (vs a float32 reference of the same inputs) per dtype.
ATTN_TOL = {torch.float32: (1e-6, 1e-4), torch.float16: (2e-5, 2e-3), torch.bfloat16: (2e-5, 2e-3)}
MAPPER_TOL = (5e-4, 5e-4)  # (atol, rtol): tf32x3 / 3xTF32 pointwise convolutions
SCORE_TOL = (1e-3, 1e-2)  # the composite's mapper scores (attention rounding, magnified)


@dataclass
class Row:
    stage: str
    case: str
    dtype: str
    backend: str
    max_abs: float  # vs the reference (0 for exact comparisons that passed)
    max_rel: float
    vs_other: str  # the largest difference to the other fast backend, or "-"
    exact: str  # "yes" / "NO" / "-" for the exact parts (indices, copies)
    ok: bool
    seconds: float


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.numel() == 0:
        return 0.0, 0.0
    both_nan = torch.isnan(got) & torch.isnan(want)
    diff = (got - want).abs().masked_fill(both_nan, 0.0)
    rel = (diff / want.abs().clamp_min(1e-30)).masked_fill(both_nan, 0.0)
    return float(diff.max()), float(rel.max())


def _within(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> bool:
    atol, rtol = tol
    return torch.allclose(got.double().cpu(), want.double().cpu(), atol=atol, rtol=rtol,
                          equal_nan=True)  # fmt: skip


def _equal(got, want) -> bool:
    return all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want, strict=True))


def backends(device: str, with_triton: bool) -> list[str]:
    """The fast backends to compare on ``device`` (the reference always runs)."""
    from tokenprune_kernels import _extension

    found = []
    key = "CUDA" if device == "cuda" else "CPU"
    if _extension.has_kernel("_select_topk", key):
        found.append("cuda" if device == "cuda" else "cpp")
    if with_triton:
        import importlib.util

        if importlib.util.find_spec("triton") is not None:
            found.append("triton")
    return found


def _cases(smoke: bool):
    """(name, layout, heads_q, heads_k, head_dim) of the attention / composite cases."""
    from tokenprune_kernels.bench import N_INSTRUCTION, N_SYSTEM

    cases = [
        ("ragged", [[("t", 3), ("v", 7), ("t", 2), ("v", 5), ("q", 3), ("t", 1)],
                    [("t", 2), ("q", 2)], [("v", 19), ("q", 5)], [("v", 1), ("q", 1)]], 4, 2, 24),
        ("prime", [[("t", 2), ("v", 131), ("q", 7)], [("v", 1), ("q", 1)]], 6, 3, 7),
    ]  # fmt: skip
    if not smoke:
        cases += [
            ("interleaved", [[("t", 2), ("q", 2), ("v", 257), ("q", 3), ("v", 67), ("q", 4)]],
             8, 2, 64),
            ("qwen7b", [[("t", N_SYSTEM), ("v", 4099), ("q", N_INSTRUCTION)]], 28, 4, 128),
        ]  # fmt: skip
    return cases


def _run_one(rows, stage, case, dtype, name, fn, check) -> object:
    """Runs ``fn`` on backend ``name``, appends its row, returns its output (None on a crash)."""
    from tokenprune_kernels import backend

    start = time.perf_counter()
    try:
        with backend.use_backend(name), torch.no_grad():
            out = fn()
        max_abs, max_rel, exact, ok = check(out)
    except Exception as exc:  # a crash is a failed row, and the run goes on
        out, max_abs, max_rel, ok = None, math.nan, math.nan, False
        exact = f"error: {exc!r}"[:100]
    elapsed = time.perf_counter() - start
    rows.append(Row(stage, case, dtype, name, max_abs, max_rel, "-", exact, ok, elapsed))
    return out


def _stage(rows, fast, stage, case, dtype, fn, check, pick=None) -> None:
    """One stage on the reference and every fast backend; the fast ones against each other."""
    outs = {}
    for name in ["ref", *fast]:
        outs[name] = (_run_one(rows, stage, case, dtype, name, fn, check), rows[-1])
    got = [(n, outs[n]) for n in fast if outs[n][0] is not None]
    if pick is not None and len(got) == 2:
        (a_name, (a, a_row)), (b_name, (b, b_row)) = got
        diff = _errors(pick(a), pick(b))[0]
        a_row.vs_other = f"{diff:.2e} vs {b_name}"
        b_row.vs_other = f"{diff:.2e} vs {a_name}"


def _close(out, want, tol) -> tuple:
    return (*_errors(out, want), "-", _within(out, want, tol))


def _exact(out, want) -> tuple:
    same = _equal(out, want)
    return 0.0, 0.0, "yes" if same else "NO", same


def _composite(out, cpu, want_scores) -> tuple:
    """The composite's scores within tolerance; the selection and merge of ITS scores exact."""
    from tokenprune_kernels import reference

    embeds, pos, cu_out, src, kept_idx, scores = (t.cpu() for t in out)
    counts = reference.keep_counts_ref(cpu.cu_seqlens_v, keep_ratio=0.5)
    sel = reference.select_topk_ref(scores, cpu.cu_seqlens_v, counts)[0]
    merged = reference.merge_kept_ref(
        cpu.inputs_embeds, cpu.position_ids, cpu.cu_seqlens, cpu.visual_embeds, cpu.visual_idx,
        cpu.cu_seqlens_v, sel,
    )  # fmt: skip
    same = torch.equal(kept_idx, sel) and _equal((embeds, pos, cu_out, src), merged)
    within = _within(scores, want_scores, SCORE_TOL)
    return (*_errors(scores, want_scores), "yes" if same else "NO", same and within)


def run(args: argparse.Namespace) -> list[Row]:
    import tokenprune_kernels as tp
    from tokenprune_kernels import reference
    from tokenprune_kernels.mapper import MapperConfig, TokenMapper
    from tokenprune_kernels.mapper.functional import mapper_forward_ref
    from tokenprune_kernels.testing import make_inputs

    device = args.device
    fast = backends(device, args.triton)
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(20)
    torch.manual_seed(20)
    mapper = TokenMapper(MapperConfig(channels=(4, 8) if args.smoke else (32, 64, 128, 256, 512)))
    params = [p.detach().to(device) for p in mapper.eval().op_params()]
    cpu_params = [p.cpu() for p in params]

    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case, layout, hq, hk, d in _cases(args.smoke):
            inp = make_inputs(
                layout, heads_q=hq, heads_k=hk, head_dim=d, dtype=dtype, generator=gen, qk_std=1.5
            ).to(device)
            cpu = inp.to("cpu")
            q, k = inp.q, inp.k
            if case == "prime":  # non-contiguous heads: q and k sliced out of wider tensors
                q = torch.cat([q, q[:, :1]], dim=1)[:, :hq]
                k = torch.cat([k[:, :1], k], dim=1)[:, 1:]
            stage = functools.partial(_stage, rows, fast, case=case, dtype=dtype_name)

            want_attn = reference.instruction_attention_ref(
                cpu.q.double(), cpu.k.double(), cpu.cu_seqlens_q, cpu.cu_seqlens_k,
                cpu.visual_idx, cpu.cu_seqlens_v, cpu.q_pos,
            )  # fmt: skip
            att_args = (q, k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.visual_idx,
                        inp.cu_seqlens_v, inp.q_pos)  # fmt: skip
            stage(stage="attention", fn=functools.partial(tp.instruction_attention, *att_args),
                  check=functools.partial(_close, want=want_attn, tol=ATTN_TOL[dtype]),
                  pick=lambda o: o)  # fmt: skip

            # Per group of Hq / 2 query heads: one channel per KV head or a part of one, or (qwen7b:
            # 14 channels of 2 heads, groups of 7) channels straddling two KV heads.
            groups = hq // 2
            want_heads = reference.instruction_attention_heads_ref(
                cpu.q.double(), cpu.k.double(), cpu.cu_seqlens_q, cpu.cu_seqlens_k,
                cpu.visual_idx, cpu.cu_seqlens_v, cpu.q_pos, None, groups,
            )  # fmt: skip
            stage(stage="attention_heads",
                  fn=functools.partial(tp.instruction_attention_heads, *att_args,
                                       head_groups=groups),
                  check=functools.partial(_close, want=want_heads, tol=ATTN_TOL[dtype]),
                  pick=lambda o: o)  # fmt: skip

            attn = want_attn.float()
            want_map = mapper_forward_ref(attn, cpu.cu_seqlens_v, cpu_params, 5, 1e-4)
            if dtype == torch.float32:  # the mapper's input is float32 whatever the model's dtype
                stage(stage="mapper",
                      fn=functools.partial(tp.mapper_forward, attn.to(device), inp.cu_seqlens_v,
                                           params),
                      check=functools.partial(_close, want=want_map, tol=MAPPER_TOL),
                      pick=lambda o: o)  # fmt: skip

            # Selection: ties, NaN and -0.0 planted; the indices must be the reference's.
            scores = attn.clone()
            if scores.numel() > 4:
                scores[::3] = scores[1]
                scores[2] = math.nan
                scores[4] = -0.0
            scores = scores.to(dtype)
            counts = reference.keep_counts_ref(cpu.cu_seqlens_v, keep_ratio=0.37)
            want_sel = reference.select_topk_ref(scores, cpu.cu_seqlens_v, counts)
            stage(stage="select",
                  fn=functools.partial(tp.select_topk, scores.to(device), inp.cu_seqlens_v,
                                       keep_ratio=0.37),
                  check=functools.partial(_exact, want=want_sel))  # fmt: skip

            merge_args = (inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
                          inp.visual_idx, inp.cu_seqlens_v)  # fmt: skip
            want_merge = reference.merge_kept_ref(
                cpu.inputs_embeds, cpu.position_ids, cpu.cu_seqlens, cpu.visual_embeds,
                cpu.visual_idx, cpu.cu_seqlens_v, want_sel[0],
            )  # fmt: skip
            stage(stage="merge",
                  fn=functools.partial(tp.merge_kept, *merge_args, want_sel[0].to(device)),
                  check=functools.partial(_exact, want=want_merge))  # fmt: skip

            stage(stage="prune_and_merge",
                  fn=functools.partial(tp.prune_and_merge, q, k, inp.cu_seqlens_q,
                                       inp.cu_seqlens_k, *merge_args, params, keep_ratio=0.5,
                                       q_pos=inp.q_pos),
                  check=functools.partial(_composite, cpu=cpu, want_scores=want_map),
                  pick=lambda o: o[5])  # fmt: skip
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (
        "| stage | case | dtype | backend | max abs err | max rel err | fast vs fast | exact "
        "| ok | s |\n|---|---|---|---|---:|---:|---|---|---|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.stage} | {r.case} | {r.dtype} | {r.backend} | {r.max_abs:.2e} | "
            f"{r.max_rel:.2e} | {r.vs_other} | {r.exact} | {'ok' if r.ok else 'FAIL'} | "
            f"{r.seconds:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--smoke", action="store_true", help="small cases only")
    parser.add_argument(
        "--triton", action=argparse.BooleanOptionalAction, default=None,
        help="compare the Triton backend too (default: on a GPU only)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the Markdown table here (JSON beside)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu)")
    if args.triton is None:
        args.triton = args.device == "cuda"
    if args.triton and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tokenprune_kernels.bench import environment

    rows = run(args)
    env = environment(args.device)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    failed = [r for r in rows if not r.ok]
    text = (
        f"# Backend parity\n\n{header}\n- command: `python3 benchmarks/parity.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n- rows: {len(rows)}, "
        f"failed: {len(failed)}\n\n{format_rows(rows)}\n"
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps([asdict(r) for r in rows], indent=1, default=str)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
