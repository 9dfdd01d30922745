"""Mapper v2 experiment: train one variant with the shipped mapper's recipe.

    python3 -m benchmarks.mapper_v2.train --variant kv \\
        --rows runs/mapper_v2/train0.pt runs/mapper_v2/train1.pt \\
        --out runs/mapper_v2/kv.safetensors --threads 1

The recipe of ``tokenprune_kernels/grounded/assets/mapper.train.json``: 20 epochs, batch 128,
Adam lr 1e-3, length buckets, 10% of the labels held out to pick the best epoch by KL, seed 0,
the method's channels (32 .. 512) and kernel 5; only the input differs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.mapper_v2.variants import VARIANTS, load_rows, packed
from tokenprune_kernels.mapper import MapperConfig
from tokenprune_kernels.training import TrainConfig, train_mapper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", required=True, choices=tuple(VARIANTS))
    p.add_argument("--rows", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    samples = packed(load_rows(*args.rows), args.variant)
    groups = 1 if samples.attn.dim() == 1 else samples.attn.shape[1]
    mapper = MapperConfig(attention_channels=groups, grid=samples.grid is not None)
    config = TrainConfig(
        epochs=args.epochs, batch_size=128, lr=1e-3, seed=0, bucket=True, mapper=mapper
    )
    t0 = time.perf_counter()
    result = train_mapper(
        samples, config, out=args.out, printer=print, log_path=args.out.with_suffix(".train.json")
    )
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "variant": args.variant,
                "samples": len(samples),
                "wall_s": round(wall, 1),
                "best_epoch": result.best_epoch,
                "best": result.best,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
