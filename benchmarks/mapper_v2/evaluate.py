"""Mapper v2 experiment: validation recall and grounded accuracy of the trained variants.

    python3 -m benchmarks.mapper_v2.evaluate --rows runs/mapper_v2/val.pt \\
        --mappers runs/mapper_v2 --out runs/mapper_v2/val_eval.json --threads 1

``--start`` / ``--stop`` score a slice of the scenes (parts run side by side) and write the
per-scene outcomes; ``--merge PART.json ...`` then writes the summary of all of them.

On the VALIDATION scenes ``collect.py`` stored (never the test split):

- recall: on the scenes the unpruned model answers correctly (they have labels), the share of
  the label's top-k among a method's top-k at each keep ratio (k = the op's keep count), mean
  over scenes;
- accuracy: on every scene, the answer token (argmax of the last prompt position's logits) of
  the language model run on the text plus the kept visual tokens with their original M-RoPE ids
  (:func:`tokenprune_kernels.grounded.methods.pruned_logits`), against the reference answer;
- for each variant against ``v1`` (the shipped mapper) and ``attention`` (raw head-mean layer-0
  attention): the exact two-sided McNemar p-value of the paired accuracies.

Methods: ``none`` (unpruned), ``attention``, ``v1`` (the shipped mapper file) and every
``<variant>.safetensors`` found under ``--mappers``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.mapper_v2.variants import VARIANTS, attention_input, grid_input
from tokenprune_kernels.grounded.methods import keep_count, prepare, pruned_logits, select_scores
from tokenprune_kernels.grounded.model import ASSETS_DIR, build_inputs, load_grounded_model
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.grounded.stats import discordant, mcnemar_exact
from tokenprune_kernels.mapper import TokenMapper, load_mapper
from tokenprune_kernels.training.data import topk_mask

RATIOS = (0.125, 0.0625, 0.03125)


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar p-value of paired outcomes ``a`` vs ``b`` (the package's
    :func:`~tokenprune_kernels.grounded.stats.mcnemar_exact` of their discordant counts)."""
    return mcnemar_exact(*discordant(a, b))


@torch.no_grad()
def scores_of(mapper: TokenMapper, row: dict) -> torch.Tensor:
    attn = attention_input(row, mapper.config.attention_channels)
    grid = grid_input(row) if mapper.config.grid else None
    cu = torch.tensor([0, attn.shape[0]])
    return mapper.forward_packed(attn, cu, grid)


def kept_recall(kept: torch.Tensor, label: torch.Tensor, ratio: float) -> float:
    """Share of the label's top-k among a kept set: ``|kept & topk(label, k)| / k``.

    Args:
        kept: ``[k]`` int64 distinct visual indices (any order), ``k = keep_count(n, ratio)``.
        label: ``[n]`` float, the explanation label of the ``n`` visual tokens.
        ratio: the keep ratio.

    The label's top-k breaks ties to the lower index (the op's tie-break).
    """
    if label.dim() != 1:
        raise ValueError(f"label must be [n], got shape {list(label.shape)}")
    n = label.numel()
    k = keep_count(n, ratio)
    if kept.dtype != torch.int64 or kept.dim() != 1 or kept.numel() != k:
        raise ValueError(
            f"kept must be [{k}] int64 (keep_count({n}, {ratio})), "
            f"got {list(kept.shape)} {kept.dtype}"
        )
    if kept.unique().numel() != k or int(kept.min()) < 0 or int(kept.max()) >= n:
        raise ValueError(f"kept must hold {k} distinct indices in [0, {n}), got {kept.tolist()}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    hit = mask & topk_mask(label[None], torch.tensor([n]), torch.tensor([k]))[0]
    return float(hit.sum()) / k


def recall(scores: torch.Tensor, label: torch.Tensor, ratio: float) -> float:
    """:func:`kept_recall` of the top-k of ``scores [n]`` (ties: lower index)."""
    n = label.numel()
    k = torch.tensor([keep_count(n, ratio)])
    kept = topk_mask(scores[None], torch.tensor([n]), k)[0].nonzero().flatten()
    return kept_recall(kept, label, ratio)


def write_summary(out: Path, head: dict, scenes: list[dict]) -> None:
    """Accuracy, recall and McNemar p-values of ``scenes`` (per-scene outcomes) to ``out``."""
    methods = head["methods"]

    def hits(m: str, r: float) -> list[bool]:
        return [s[f"correct/{m}/{r}"] for s in scenes]

    def mean(values: list) -> float:
        return sum(values) / len(values)

    labelled = [s for s in scenes if s["labelled"]]
    summary = {
        **head,
        "scenes": len(scenes),
        "labelled": len(labelled),
        "unpruned_accuracy": mean([s["unpruned"] for s in scenes]),
        "accuracy": {m: {str(r): mean(hits(m, r)) for r in RATIOS} for m in methods},
        "recall": {
            m: {str(r): mean([s[f"recall/{m}/{r}"] for s in labelled]) for r in RATIOS}
            for m in methods
        },
        "mcnemar_p": {
            m: {
                ref: {str(r): mcnemar_p(hits(m, r), hits(ref, r)) for r in RATIOS}
                for ref in ("v1", "attention", "mean")
                if ref in methods and ref != m
            }
            for m in methods
            if m not in ("v1", "attention")
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["accuracy"]), json.dumps(summary["recall"]), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--mappers", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--merge", type=Path, nargs="+", help="per-scene part files to summarise")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        write_summary(args.out, parts[0]["head"], [s for part in parts for s in part["scenes"]])
        return 0
    torch.set_num_threads(args.threads)
    data = torch.load(args.rows)
    rows = data["rows"][args.start : args.stop]
    meta = data["meta"]
    mappers: dict[str, TokenMapper] = {"v1": load_mapper(ASSETS_DIR / "mapper.safetensors")}
    for name in VARIANTS:
        path = args.mappers / f"{name}.safetensors"
        if path.exists():
            mappers[name] = load_mapper(path)
    methods = ["attention", *mappers]
    model, processor = load_grounded_model()
    model.eval()
    scenes: list[dict] = []
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        split, index = row["id"].split("-")
        sample = make_sample(split, int(index), meta["seed"])
        inputs = build_inputs(processor, [sample.image], [sample.question.text])
        prep = prepare(model, inputs)
        answer = row["answer_id"]
        scene = {"id": row["id"], "qtype": row["qtype"], "labelled": "label" in row}
        scene["unpruned"] = int(pruned_logits(model, prep).argmax()) == answer
        scores = {"attention": row["heads"].mean(1)}
        for name, mapper in mappers.items():
            scores[name] = scores_of(mapper, row)
        n = prep.n_visual
        for name, s in scores.items():
            for r in RATIOS:
                kept = select_scores(prep, s, keep_count(n, r))
                hit = int(pruned_logits(model, prep, kept).argmax()) == answer
                scene[f"correct/{name}/{r}"] = hit
                if "label" in row:
                    scene[f"recall/{name}/{r}"] = recall(s, row["label"], r)
        scenes.append(scene)
        if (i + 1) % 50 == 0:
            print(f"{i + 1} scenes, {time.perf_counter() - t0:.0f} s", flush=True)
    head = {"rows": str(args.rows), "collect": meta, "methods": methods, "threads": args.threads}
    head["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.start or args.stop is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"head": head, "scenes": scenes}) + "\n")
    else:
        write_summary(args.out, head, scenes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
