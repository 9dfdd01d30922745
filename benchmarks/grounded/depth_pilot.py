"""Cost pilot of a deeper grounded model: seconds per training step of the shipped recipe at
several language-model depths, runs interleaved, and the projected wall time of a full run.

    nice -n 19 python3 -m benchmarks.grounded.depth_pilot --out runs/depth_pilot \\
        --layers 4,14 --steps 40 --reps 2

Each run is ``python3 -m benchmarks.grounded.train`` with the shipped defaults, ``--layers N``,
``--steps S --stop-after S`` (the whole schedule compressed into ``S`` steps, so warm-up
canvases, curriculum scales and training sizes are drawn in the proportions of a full run),
no validation or test, one thread. Every depth sees the same seed, hence the same batches. The
summary (``pilot.json`` in ``--out``) gives per run the mean seconds per step after the first
(from the log's per-step ``wall_s``), per depth the median over repetitions, its ratio to the
first depth's (``ratio``; ``paired_ratios``: per repetition, the runs next to each other),
and ``full_run_train_min``: seconds per step times the full run's steps
(``--full-steps``, the shipped 3800), without validation and test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.grounded.loop import LOG_FILE


def step_seconds(log: dict) -> float:
    """Mean seconds per training step after the first, from a train log logged every step.

    Raises:
        ValueError: fewer than two logged steps, or steps not logged one by one.
    """
    walls = [s["wall_s"] for s in log["steps"]]
    if len(walls) < 2 or [s["step"] for s in log["steps"]] != list(range(1, len(walls) + 1)):
        raise ValueError("the log must hold every step (--log-every 1) and at least two")
    return (walls[-1] - walls[0]) / (len(walls) - 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python3 -m benchmarks.grounded.depth_pilot``."""
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.grounded.depth_pilot")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="4,14", help="comma-separated depths; the first is the base")
    p.add_argument("--steps", type=int, default=40, help="steps per run (the compressed schedule)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--full-steps", type=int, default=3800, help="steps of the full run projected")
    args = p.parse_args(argv)
    depths = [int(v) for v in args.layers.split(",") if v]
    if not depths or min(depths) < 1 or args.steps < 2 or args.reps < 1 or args.full_steps < 1:
        p.error("--layers must be ints >= 1, --steps >= 2, --reps and --full-steps >= 1")
    out = Path(args.out)
    runs: list[dict] = []
    for rep in range(args.reps):
        for n in depths:
            run_dir = out / f"L{n}_r{rep}"
            cmd = [
                sys.executable, "-m", "benchmarks.grounded.train", "--out", str(run_dir),
                "--threads", "1", "--layers", str(n), "--steps", str(args.steps),
                "--stop-after", str(args.steps), "--log-every", "1",
                "--val-per-size", "0", "--test-per-size", "0",
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            log = json.loads((run_dir / LOG_FILE).read_text())
            runs.append(
                {
                    "layers": n,
                    "rep": rep,
                    "parameters": log["parameters"],
                    "s_per_step": round(step_seconds(log), 4),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    per_depth = {}
    for n in depths:
        sec = statistics.median(r["s_per_step"] for r in runs if r["layers"] == n)
        per_depth[n] = {
            "s_per_step": round(sec, 4),
            "full_run_train_min": round(sec * args.full_steps / 60, 1),
        }
    base = per_depth[depths[0]]["s_per_step"]
    sec = {(r["layers"], r["rep"]): r["s_per_step"] for r in runs}
    for n, v in per_depth.items():
        v["ratio"] = round(v["s_per_step"] / base, 3)
        v["paired_ratios"] = [round(sec[n, k] / sec[depths[0], k], 3) for k in range(args.reps)]
    summary = {"args": vars(args), "runs": runs, "per_depth": per_depth}
    (out / "pilot.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(per_depth), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
