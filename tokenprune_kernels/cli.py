"""The ``tokenprune`` command.

tokenprune env             versions, the extension's state, the backend of every op
tokenprune bench           time every op on every backend available here
tokenprune explain         relevance labels for a local model and a JSONL data file
tokenprune train-mapper    train a mapper on those labels
tokenprune eval            accuracy, FLOPs and paired tests of every pruning method (grounded VQA)
tokenprune demo            one grounded-VQA scene with and without pruning, and a PNG
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def _cmd_env(args: argparse.Namespace) -> int:
    from tokenprune_kernels import _extension, backend
    from tokenprune_kernels.bench import environment

    info = environment("cpu")
    print("tokenprune environment")
    for key in ("python", "torch", "triton", "tokenprune_kernels", "commit"):
        print(f"  {key:20s} {info[key]}")
    try:
        import transformers

        print(f"  {'transformers':20s} {transformers.__version__}")
    except ImportError:
        print(f"  {'transformers':20s} not installed")
    print(f"  {'torch CUDA build':20s} {torch.version.cuda or 'no (CPU build)'}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) or "none visible"
    print(f"  {'GPUs':20s} {names}")
    print()
    if _extension.available():
        print(f"compiled extension: loaded from {_extension.path()}")
        for op in backend.kernels():
            keys = [k for k in ("CPU", "CUDA") if _extension.has_kernel(op, k)]
            print(f"  {op:20s} kernels: {', '.join(keys) or 'none'}")
    else:
        print(f"compiled extension: NOT loaded ({_extension.load_error()})")
    print(f"{backend.ENV_VAR} = {backend.requested()}")
    print()
    for device_type in ("cpu", "cuda"):
        note = "" if device_type == "cpu" or gpus else "  (no GPU visible: what would run on one)"
        print(f"backend per op on {device_type}{note}:")
        for op, chosen in backend.describe(device_type).items():
            print(f"  {op:22s} {chosen}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from tokenprune_kernels.bench import environment, format_table, load_average, run_bench

    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {device} asked for, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    info = environment(device)
    command = "tokenprune " + " ".join(shlex.quote(a) for a in args.argv)
    print(f"# tokenprune bench on {info['device']}", flush=True)
    load_before = load_average()
    results = run_bench(
        device, quick=args.quick, progress=lambda line: print("  " + line, flush=True)
    )
    header = [f"- {k}: {v}" for k, v in info.items()]
    header.append(f"- command: `{command}`")
    header.append(f"- OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    header.append(
        f"- load average (1, 5, 15 min): {load_before} at the start, {load_average()} at the end"
    )
    header.append(
        "- shapes: Qwen2-VL-7B (28 query heads, 4 key heads, head dim 128, hidden 3584), bf16 "
        "q/k/embeddings, 32 instruction tokens, 14 system and 5 trailing tokens, batch 1; mapper "
        "with the default config; median over >= 5 runs (>= 0.3 s), 3 input sets rotated; the "
        "backends of one row group run interleaved, one call each per round"
    )
    if torch.device(device).type == "cpu":
        header.append(
            "- roofline (measured in the same rounds): one fp32 GEMM [1024, 256] @ [256, N] with "
            "the stage's FLOPs (one q.k per query, head and key; the mapper's pointwise and "
            "depthwise layers) and one copy moving its bytes (inputs read once, outputs written "
            "once); x roofline = median / the slower of the two"
        )
    table = format_table(results)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# tokenprune bench\n\n" + "\n".join(header) + "\n\n" + table + "\n")
        print(f"\nwrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, backends available and the backend each op uses")
    env.set_defaults(func=_cmd_env)
    bench = sub.add_parser("bench", help="time every op on every backend available here")
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    bench.add_argument("--quick", action="store_true", help="N_v = 1024 only, few repetitions")
    bench.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's)"
    )
    bench.add_argument(
        "--out", default=None, help="also write the table and environment to this .md"
    )
    bench.set_defaults(func=_cmd_bench)
    from tokenprune_kernels.explain.cli import add_explain_parser
    from tokenprune_kernels.grounded.demo import add_demo_parser
    from tokenprune_kernels.grounded.evaluate import add_eval_parser
    from tokenprune_kernels.training.cli import add_train_parser

    add_explain_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenprune`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args))


def run_subcommand(name: str, argv: Sequence[str] | None = None) -> int:
    """``tokenprune <name> ...``: what a subcommand's module runs as its own ``main``
    (``python -m tokenprune_kernels.grounded.evaluate ...``). ``argv``: the words after the
    subcommand's name (default ``sys.argv[1:]``)."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
