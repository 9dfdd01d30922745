"""CPU time of the spread rule's selection: the C++ kernel (``_spread_select``) against the
reference (``spread_select_ref``), one sample of a square grid, medians of interleaved rounds.

    PYTHONPATH=. python3 benchmarks/bench_spread.py --n 784 4096 16384 --radius 1 --keep 32

Prints a Markdown table (milliseconds per call). ``--keep D`` keeps ``n // D`` tokens (the pass
stops at the last accepted one it needs); ``--full`` adds a column keeping ``n // 2`` (with radius
1 fewer tokens are accepted than that, so the pass runs to the end and fills up with suppressed
ones).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from tokenprune_kernels import _extension
from tokenprune_kernels.reference import spread_select_ref


def grid(n: int) -> torch.Tensor:
    """[n, 3] int64 raster coords (segment 0) of the smallest square-ish grid holding n tokens."""
    width = math.isqrt(n - 1) + 1
    idx = torch.arange(n)
    return torch.stack([torch.zeros_like(idx), idx // width, idx % width], 1)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[784, 4096, 16384])
    parser.add_argument("--radius", type=int, default=1)
    parser.add_argument("--keep", type=int, default=32, help="keep n // KEEP tokens")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--full", action="store_true", help="also keep n // 2")
    args = parser.parse_args()
    if not _extension.available():
        raise SystemExit(f"the compiled extension did not load: {_extension.load_error()}")
    print(f"extension: {_extension.path()}")
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.tokenprune._spread_select
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, radius {args.radius}")
    print()
    cols = ["n", "k", "ref ms", "cpp ms", "ref / cpp"]
    if args.full:
        cols += ["k (full)", "ref ms", "cpp ms", "ref / cpp"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for n in args.n:
        coords = grid(n)
        scores = torch.randn(n, generator=gen)
        cu = torch.tensor([0, n])
        keeps = [max(1, n // args.keep)] + ([n // 2] if args.full else [])
        row = [str(n)]
        for k in keeps:
            counts = torch.tensor([k])
            want = spread_select_ref(scores, cu, counts, coords, args.radius)[0]
            got = op(scores, cu, counts, coords, args.radius, k)[0]
            assert torch.equal(got, want), "the kernel disagrees with the reference"
            ref, cpp = [], []
            for _ in range(args.rounds):  # interleaved: both see the same machine state
                ref.append(timed(spread_select_ref, scores, cu, counts, coords, args.radius))
                cpp.append(timed(op, scores, cu, counts, coords, args.radius, k))
            r, c = statistics.median(ref), statistics.median(cpp)
            row += [str(k), f"{r:.3f}", f"{c:.3f}", f"{r / c:.0f}x"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
