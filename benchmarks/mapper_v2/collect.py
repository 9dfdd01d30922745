"""Mapper v2 experiment, step 1: the candidate mapper inputs of grounded scenes.

    python3 -m benchmarks.mapper_v2.collect --split train --seed 7 --n 750 \
        --out runs/mapper_v2/train0.pt
    python3 -m benchmarks.mapper_v2.collect --split train --seed 7 --start 750 --n 750 \
        --out runs/mapper_v2/train1.pt
    python3 -m benchmarks.mapper_v2.collect --split val --seed 11 --n 400 \
        --out runs/mapper_v2/val.pt

Per scene (``make_sample(split, i, seed)``, the shipped grounded model): the label pipeline's
:func:`~tokenprune_kernels.grounded.labels_pipeline.label_grounded_sample` (greedy answer,
correctness, the head-mean layer-0 attention the inference path computes, and the
gradient-weighted label when correct), plus what layer 0 already computed per head: the
instruction rows of layer 0's attention probabilities (eager ``output_attentions``, an
independent path), averaged over the instruction queries per QUERY head -> ``[n_v, Hq]``; and
the merged token grid ``(h, w)`` of the image. The per-head mean over the heads is checked
against the inference path's head mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tokenprune_kernels.explain.pipeline import to_model
from tokenprune_kernels.grounded.labels_pipeline import label_grounded_sample
from tokenprune_kernels.grounded.methods import _base, prepare
from tokenprune_kernels.grounded.model import TOKEN_ID, build_inputs, load_grounded_model
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.transformers import default_instruction_mask_for


@torch.no_grad()
def per_head_attention(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, tuple]:
    """``([n_v, Hq] float32, (t, h, w) merged grid)`` of one prompt (batch of one)."""
    base = _base(model)
    prep = prepare(model, inputs)
    out = base.language_model(
        inputs_embeds=prep.embeds,
        position_ids=prep.position_ids,
        attention_mask=None,
        use_cache=False,
        output_attentions=True,
    )
    probs = out.attentions[0][0].float()  # [Hq, L, L]
    ids = inputs["input_ids"]
    instr = default_instruction_mask_for(base, ids, prep.visual_mask)[0]
    rows = probs[:, instr]  # [Hq, n_q, L]
    return rows[:, :, prep.visual_positions].mean(1).T.contiguous(), prep.grid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", required=True, choices=("train", "val"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--start", type=int, default=0, help="first scene index")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = load_grounded_model(attn_implementation="eager")
    model.eval()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(args.start, args.start + args.n):
        sample = make_sample(args.split, i, args.seed)
        ok, _, record = label_grounded_sample(model, processor, sample)
        inputs = to_model(build_inputs(processor, [sample.image], [sample.question.text]), model)
        heads, grid = per_head_attention(model, inputs)
        row = {
            "id": f"{args.split}-{i}",
            "correct": ok,
            "qtype": sample.question.qtype,
            "answer_id": TOKEN_ID[sample.question.answer],
            "heads": heads,
            "grid": grid,
        }
        if record is not None:
            err = (heads.mean(1) - record.attn).abs().max().item()
            if err > 1e-5 * max(1.0, record.attn.abs().max().item()):
                raise RuntimeError(f"{row['id']}: per-head mean differs from the op by {err}")
            row["attn"] = record.attn
            row["label"] = record.label
        rows.append(row)
        if len(rows) % 25 == 0 or len(rows) == args.n:  # saved as it goes: usable when stopped
            print(
                f"{len(rows)} seen, {sum(r['correct'] for r in rows)} correct, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            meta = {
                "split": args.split,
                "seed": args.seed,
                "start": args.start,
                "n": len(rows),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            tmp = args.out.with_suffix(".tmp")
            torch.save({"meta": meta, "rows": rows}, tmp)
            tmp.replace(args.out)
    print(meta, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
