"""Mapper width for a small language model: validation accuracy, label recall and FLOPs of
mapper files of different widths, chosen on the VALIDATION split (never the test split).

    python3 -m benchmarks.mapper_v2.width \\
        --model-dir benchmarks/grounded/models/grounded14up/model \\
        --mappers ref.safetensors narrow.safetensors --n 400 --out runs/width.json

Why: the method's mapper (channels 32 .. 512, kernel 5) costs about 354k FLOPs per visual token.
Next to a 7B language model (about 13 GFLOPs per token over its 28 layers) that is nothing;
next to the grounded benchmark's 14-layer, 128-wide language model (about 5.5 MFLOPs per token)
it is 6% of the unpruned prefill per visual token, so at harsh budgets the mapper's own cost
decides the equal-compute comparison with in-LLM pruning. A mapper scaled to its language model
keeps that ratio realistic - if it predicts the labels as well.

Per validation scene (``make_sample("val", i, seed)``, the scenes of ``selection.py``): the
explanation label (``label_grounded_sample`` on the model with eager attention; scenes the model
answers correctly), the raw head-mean layer-0 attention and each mapper's scores
(``grounded.methods.select_layer0``, the inference path), then at keep 12.5%, 6.25% and 3.125%
plain top-k (``top``) and the spread rule with radius 1 (``spread1``, mapper v2's selection) on
each score source, and the language model's answer token on the kept tokens
(``grounded.methods.pruned_logits``). Writes per rule: accuracy, exact McNemar p against the
first mapper's same rule and against the raw attention's, label recall (share of the label's
top-k kept, mean over labelled scenes), and the mean LLM prefill FLOPs (layer-0 rows, mapper,
pruned prefill) as a share of the unpruned prefill (``grounded.evaluate.selection_flops``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.mapper_v2.evaluate import kept_recall, mcnemar_p
from benchmarks.mapper_v2.selection import top
from tokenprune_kernels.bench import cpu_model, environment
from tokenprune_kernels.grounded.evaluate import _instruction_positions, selection_flops
from tokenprune_kernels.grounded.flops import LMShape, mapper_flops, prefill_flops
from tokenprune_kernels.grounded.labels_pipeline import label_grounded_sample
from tokenprune_kernels.grounded.methods import (
    _from_visual_index,
    keep_count,
    prepare,
    pruned_logits,
    select_layer0,
    spread_keep,
)
from tokenprune_kernels.grounded.model import TOKEN_ID, build_inputs, load_model_dir
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import TokenMapper, load_mapper

RATIOS = (0.125, 0.0625, 0.03125)
SEED = 11
"""Validation scene seed (``selection.py``'s)."""


def per_token_flops(mapper: TokenMapper) -> int:
    """The mapper's FLOPs per visual token (:func:`grounded.flops.mapper_flops` of one)."""
    cfg = mapper.config
    return mapper_flops(cfg.channels, cfg.kernel_size, 1, cfg.in_channels)


def scene_outcomes(
    model: torch.nn.Module,
    labeller: torch.nn.Module,
    processor: Any,
    mappers: dict[str, TokenMapper],
    index: int,
    seed: int = SEED,
) -> dict:
    """Every (score source, rule)'s outcome on validation scene ``index``.

    Args:
        model: the grounded model (sdpa), the one that answers.
        labeller: the same model with eager attention (the label's relevance needs it).
        processor: its processor.
        mappers: name -> mapper; the raw attention is the source ``att``.
        index, seed: the scene (``make_sample("val", index, seed)``).

    Returns:
        ``{"unpruned": bool, "labelled": bool, "correct": {rule: {ratio: bool}},
        "recall": {rule: {ratio: float}}, "flops": {rule: {ratio: float}}}`` with rules
        ``<source>_top`` and ``<source>_spread1``, ratios as ``str``, ``flops`` the prefill
        share of unpruned (selection included); ``recall`` empty without a label.
    """
    sample = make_sample("val", index, seed)
    _, _, record = label_grounded_sample(labeller, processor, sample)
    out: dict = {"labelled": record is not None, "correct": {}, "recall": {}, "flops": {}}
    with torch.no_grad():
        inputs = build_inputs(processor, [sample.image], [sample.question.text])
        prep = prepare(model, inputs)
        target = TOKEN_ID[sample.question.answer]
        out["unpruned"] = int(pruned_logits(model, prep).argmax()) == target
        shape = LMShape.from_config(model.config)
        n = int(prep.inputs["input_ids"].shape[1])
        full = prefill_flops(shape, n)
        rows = _instruction_positions(model, prep)
        sources: dict[str, tuple[torch.Tensor, int]] = {
            "att": (
                select_layer0(model, prep, 1, None)[1],
                selection_flops("attention", shape, n, prep.n_visual, rows),
            )
        }
        for name, m in mappers.items():
            sources[name] = (
                select_layer0(model, prep, 1, m)[1],
                selection_flops("mapper", shape, n, prep.n_visual, rows, m),
            )
        for r in RATIOS:
            k = keep_count(prep.n_visual, r)
            cost = prefill_flops(shape, n, prep.n_visual, k, 0)
            for src, (s, sel_flops) in sources.items():
                picks = {f"{src}_top": top(s, k), f"{src}_spread1": spread_keep(s, prep.grid, k, 1)}
                for rule, vis in picks.items():
                    pos = _from_visual_index(prep, vis)
                    ok = int(pruned_logits(model, prep, pos).argmax()) == target
                    out["correct"].setdefault(rule, {})[str(r)] = ok
                    out["flops"].setdefault(rule, {})[str(r)] = (cost + sel_flops) / full
                    if record is not None:
                        idx = torch.searchsorted(prep.visual_positions, pos)
                        rec = kept_recall(idx, record.label, r)
                        out["recall"].setdefault(rule, {})[str(r)] = rec
    return out


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument(
        "--mappers",
        type=Path,
        nargs="+",
        required=True,
        help="mapper files; the first is the reference of the McNemar tests",
    )
    p.add_argument("--n", type=int, default=300, help="validation scenes 0 .. n-1")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    names = [m.stem for m in args.mappers]
    if len(set(names)) != len(names) or "att" in names:
        p.error(f"--mappers need distinct file stems other than 'att', got {names}")
    torch.set_num_threads(args.threads)
    model, processor = load_model_dir(args.model_dir)
    model.eval()
    labeller, _ = load_model_dir(args.model_dir, attn_implementation="eager")
    labeller.eval()
    mappers = {name: load_mapper(path) for name, path in zip(names, args.mappers, strict=True)}
    hits: dict[str, dict[str, list[bool]]] = {}
    recalls: dict[str, dict[str, list[float]]] = {}
    flops: dict[str, dict[str, list[float]]] = {}
    unpruned: list[bool] = []
    labelled = 0
    t0 = time.perf_counter()
    for i in range(args.n):
        scene = scene_outcomes(model, labeller, processor, mappers, i, args.seed)
        unpruned.append(scene["unpruned"])
        labelled += scene["labelled"]
        for table, into in (("correct", hits), ("recall", recalls), ("flops", flops)):
            for rule, by_ratio in scene[table].items():
                for r, v in by_ratio.items():
                    into.setdefault(rule, {}).setdefault(r, []).append(v)
        if (i + 1) % 50 == 0:
            print(f"{i + 1} scenes, {time.perf_counter() - t0:.0f} s", flush=True)
    import transformers

    def ref_rule(rule: str, src: str) -> str:
        return f"{src}_{rule.rsplit('_', 1)[1]}"

    summary = {
        "command": shlex.join(["python3", "-m", "benchmarks.mapper_v2.width", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "commit": environment("cpu")["commit"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model_dir": str(args.model_dir),
        "split": "val",
        "seed": args.seed,
        "scenes": args.n,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t0, 1),
        "mappers": {
            name: {
                "path": str(path),
                "channels": list(m.config.channels),
                "kernel_size": m.config.kernel_size,
                "parameters": sum(t.numel() for t in m.parameters()),
                "flops_per_visual_token": per_token_flops(m),
            }
            for (name, m), path in zip(mappers.items(), args.mappers, strict=True)
        },
        "unpruned_accuracy": _mean(unpruned),
        "labelled": labelled,
        "accuracy": {m: {r: _mean(v) for r, v in h.items()} for m, h in hits.items()},
        "recall": {m: {r: _mean(v) for r, v in h.items()} for m, h in recalls.items()},
        "flops_share": {m: {r: _mean(v) for r, v in h.items()} for m, h in flops.items()},
        "mcnemar_p": {
            m: {
                ref: {r: mcnemar_p(hits[m][r], hits[ref][r]) for r in h}
                for ref in dict.fromkeys((ref_rule(m, names[0]), ref_rule(m, "att")))
                if ref != m
            }
            for m, h in hits.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"unpruned {100 * summary['unpruned_accuracy']:.1f}%; {labelled} labelled scenes")
    for m in summary["accuracy"]:
        row = [
            f"{r}: acc {100 * summary['accuracy'][m][r]:.1f} rec "
            f"{100 * summary['recall'].get(m, {}).get(r, float('nan')):.1f} "
            f"flops {100 * summary['flops_share'][m][r]:.1f}"
            for r in summary["accuracy"][m]
        ]
        print(m, " | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
