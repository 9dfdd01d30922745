"""Labelling throughput of ``tokenprune explain``: 1 process vs N processes (torchrun), on a CPU.

Builds a small random LLaVA in a temporary directory (Llama text model, hidden 256, 4 layers,
8 heads, 4 KV heads, MLP 512; CLIP tower, 32 px images, patch 4 -> 64 visual tokens per image),
``--samples`` records whose reference answers are the model's own greedy answers (so every sample
is labelled: greedy decoding plus the relevance backward), then runs

    torchrun --standalone --nproc_per_node K -m tokenprune_kernels explain --model M --data D \\
        --out O --device cpu --max-new-tokens 8 --no-progress

with ``OMP_NUM_THREADS=T``, for every ``KxT`` of ``--configs`` (default ``1x2,1x1,2x1``: one
process with two threads, one with one thread, two with one thread each), interleaved
``--repeats`` times so that a change of machine load hits every config alike. Reported per run:
the labelling rate of ``summary.json`` (samples / seconds of the slowest rank's labelling loop;
start-up and model loading excluded), the wall time of the whole command, and the 1-minute load
average before the run.

    python3 benchmarks/bench_explain_dist.py --samples 32 --repeats 3 \\
        --out benchmarks/results/explain_dist_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8


def _build(work: Path, samples: int) -> tuple[Path, Path]:
    """The model directory and a data file whose answers are the model's greedy answers."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from tokenprune_kernels.explain.cli import load_model_and_processor
    from tokenprune_kernels.testing_models.explain import (
        greedy_answers,
        save_image,
        save_llava_dir,
        write_jsonl,
    )
    from tokenprune_kernels.testing_models.llava import IMAGE_ID, _text_kwargs

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            **{
                **_text_kwargs(),  # the test models' vocabulary and init, larger shapes
                "hidden_size": 256,
                "intermediate_size": 512,
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
            }
        ),
        image_token_id=IMAGE_ID,
        attn_implementation="eager",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None
    model_dir = save_llava_dir(work / "model", model=model, image_size=32)
    gen = torch.Generator().manual_seed(1)
    records = []
    for i in range(samples):
        save_image(work / f"im{i}.png", gen, (32 + i % 7, 40 - i % 5))
        question = f"w5 w{9 + i % 60} w11 w{20 + i % 30}"
        records.append({"id": f"s{i}", "image": f"im{i}.png", "question": question, "answer": "?"})
    data = write_jsonl(work / "data.jsonl", records)
    loaded = load_model_and_processor(model_dir, torch.device("cpu"), torch.float32)
    greedy = greedy_answers(loaded, data, MAX_NEW)
    for r in records:
        r["answer"] = greedy[r["id"]][0]
    write_jsonl(data, records)
    return model_dir, data


def _load1() -> float:
    return os.getloadavg()[0]


def _run(model_dir: Path, data: Path, out: Path, procs: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", "-m", "tokenprune_kernels", "explain",
           "--model", str(model_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
           "--max-new-tokens", str(MAX_NEW), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    load = _load1()
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    if summary["correct"] != summary["records"]:
        raise RuntimeError(f"expected every sample labelled, got {summary}")
    return {
        "config": f"{procs}x{threads}",
        "rate": summary["samples_per_s"],
        "loop_s": summary["seconds"],
        "wall_s": wall,
        "load1": load,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--configs", default="1x2,1x1,2x1", help="comma-separated PROCESSESxTHREADS"
    )
    parser.add_argument("--out", default=None, help="also write the table to this .md")
    args = parser.parse_args()
    configs = [tuple(int(n) for n in c.split("x")) for c in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data = _build(work, args.samples)
        rows = []
        for repeat in range(args.repeats):
            for k, t in configs:
                row = _run(model_dir, data, work / f"out-{repeat}-{k}x{t}", k, t)
                rows.append(row)
                print(
                    f"{k} x {t} threads: {row['rate']:.2f} samples/s (loop {row['loop_s']:.1f} s, "
                    f"wall {row['wall_s']:.1f} s, load {row['load1']:.2f})",
                    flush=True,
                )
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        pass
    lines = [
        "# tokenprune explain: 1 vs N processes on a CPU",
        "",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; python {platform.python_version()}",
        f"- {args.samples} samples, every one labelled (64 visual tokens, {MAX_NEW} answer "
        "tokens); model: LLaVA, Llama text hidden 256 x 4 layers, CLIP 32 px / patch 4",
        f"- command: `python3 benchmarks/bench_explain_dist.py --samples {args.samples} "
        f"--repeats {args.repeats} --configs {args.configs}`",
        "- rate: samples / seconds of the slowest rank's labelling loop (start-up and model "
        "loading excluded); load: 1-minute load average before the run",
        "",
        "| processes x threads | samples/s (median) | runs: samples/s | wall s (median) | "
        "load before |",
        "|---|---|---|---|---|",
    ]
    for k, t in configs:
        mine = [r for r in rows if r["config"] == f"{k}x{t}"]
        lines.append(
            f"| {k} x {t} | {statistics.median(r['rate'] for r in mine):.2f} | "
            + ", ".join(f"{r['rate']:.2f}" for r in mine)
            + f" | {statistics.median(r['wall_s'] for r in mine):.1f} | "
            + ", ".join(f"{r['load1']:.1f}" for r in mine)
            + " |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
