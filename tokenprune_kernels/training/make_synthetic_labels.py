"""``python -m tokenprune_kernels.training.make_synthetic_labels --out DIR``: SYNTHETIC labels.

Writes :func:`~tokenprune_kernels.training.synthetic.synthetic_records` as a label directory, so
``tokenprune train-mapper`` can be tried (and timed) without a model. The mapper it trains means
nothing for a real MLLM.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .synthetic import write_synthetic_labels

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``--out DIR [--num N --min-tokens A --max-tokens B --seed S]``), write."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenprune_kernels.training.make_synthetic_labels",
        description="Write SYNTHETIC label shards (no model involved) to try train-mapper.",
    )
    parser.add_argument("--out", required=True, help="label directory to write")
    parser.add_argument("--num", type=int, default=2000, help="samples (2000)")
    parser.add_argument("--min-tokens", type=int, default=200, help="shortest sample (200)")
    parser.add_argument("--max-tokens", type=int, default=1000, help="longest sample (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed (0)")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        write_synthetic_labels(args.out, args.num, args.min_tokens, args.max_tokens, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.num} synthetic samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
