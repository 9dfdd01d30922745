"""Mapper v2 experiment, part 2: a diversity term in the selection, chosen by validation accuracy.

    python3 -m benchmarks.mapper_v2.selection --n 400 \\
        --out benchmarks/results/mapper_v2_selection.json

On the VALIDATION split (scene seed 11, scenes ``0 .. n-1``, the scenes of ``evaluate.py``; never
the test split), the shipped model and mapper: per scene the mapper's scores and the raw
head-mean layer-0 attention (``grounded.methods.select_layer0``, the inference path), then every
candidate selection rule at keep 12.5%, 6.25% and 3.125%, and the answer token of the language
model on the kept tokens (``grounded.methods.pruned_logits``). Rules (``k`` = the op's keep count):

- ``top``: plain top-k (v1);
- ``pool<c>``: DivPrune-like max-min diversity (greedy farthest point on the cosine distance of the
  visual embeddings) inside the top ``ceil(c k)`` tokens by score, starting from the top token;
- ``wmm<b>``: greedy max-min over all tokens, each candidate's distance weighted by
  ``(1 - rank / n) ** b`` (rank by score);
- ``spread<r>``: the spread rule of ``docs/contract.md`` (``reference.spread_select_ref``: greedy
  suppression of accepted tokens' grid neighbours within Chebyshev radius ``r``, then fill);
- ``peak<r>``: the parallel relaxation - tokens whose score is >= every neighbour's within ``r``
  first, then the rest;
- ``divprune``: the DivPrune-like baseline over all tokens (``grounded.methods.select_divprune``).

Prefix ``att_``: the rule on the raw attention instead of the mapper's scores. Writes per-rule
accuracy and exact McNemar p-values against ``top``, ``att_top`` and ``divprune``, and per-rule
label recall: on the scenes with an explanation label (the label of ``collect.py``,
:func:`~tokenprune_kernels.grounded.labels_pipeline.label_grounded_sample` on the model with
eager attention: the scenes whose greedy answer is correct), the share of the label's top-k in
the rule's kept set (``evaluate.kept_recall``; for ``top`` the recall of ``evaluate.py``), mean
over those scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.mapper_v2.evaluate import kept_recall, mcnemar_p
from tokenprune_kernels.bench import cpu_model
from tokenprune_kernels.grounded.labels_pipeline import label_grounded_sample
from tokenprune_kernels.grounded.methods import (
    _from_visual_index,
    _unit,
    grid_coords,
    keep_count,
    prepare,
    pruned_logits,
    select_divprune,
    select_layer0,
)
from tokenprune_kernels.grounded.model import (
    ASSETS_DIR,
    TOKEN_ID,
    build_inputs,
    load_grounded_model,
)
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import TokenMapper, load_mapper
from tokenprune_kernels.reference import select_topk_ref, spread_select_ref

RATIOS = (0.125, 0.0625, 0.03125)
SEED = 11


def top(s: torch.Tensor, k: int) -> torch.Tensor:
    """The contract's top-k (ties: lower index) as visual indices."""
    return select_topk_ref(s, torch.tensor([0, s.numel()]), torch.tensor([k]))[0]


def pool_maxmin(s: torch.Tensor, u: torch.Tensor, k: int, c: float) -> torch.Tensor:
    """Max-min diversity inside the top ``ceil(c k)`` by score, from the top token."""
    m = min(s.numel(), max(k, math.ceil(c * k)))
    pool = torch.argsort(s, descending=True, stable=True)[:m]
    d = 1.0 - u[pool] @ u[pool].T
    chosen = torch.zeros(m, dtype=torch.bool)
    order = [0]
    chosen[0] = True
    mind = d[0].clone()
    for _ in range(k - 1):
        j = int(torch.argmax(torch.where(chosen, torch.full_like(mind, -1.0), mind)))
        order.append(j)
        chosen[j] = True
        mind = torch.minimum(mind, d[j])
    return pool[torch.tensor(order)]


def weighted_maxmin(s: torch.Tensor, u: torch.Tensor, k: int, b: float) -> torch.Tensor:
    """Greedy max-min, distances weighted by ``(1 - rank / n) ** b``, from the top token."""
    n = s.numel()
    rank = torch.empty(n)
    rank[torch.argsort(s, descending=True, stable=True)] = torch.arange(n, dtype=torch.float32)
    w = (1.0 - rank / n) ** b
    d = 1.0 - u @ u.T
    chosen = torch.zeros(n, dtype=torch.bool)
    first = int(torch.argmax(s))
    order = [first]
    chosen[first] = True
    mind = d[first].clone()
    for _ in range(k - 1):
        cand = torch.where(chosen, torch.full_like(mind, -1.0), mind.clamp_min(0) * w)
        j = int(torch.argmax(cand))
        order.append(j)
        chosen[j] = True
        mind = torch.minimum(mind, d[j])
    return torch.tensor(order)


def spread(s: torch.Tensor, grid: tuple[int, int, int], k: int, r: int) -> torch.Tensor:
    n = s.numel()
    return spread_select_ref(s, torch.tensor([0, n]), torch.tensor([k]), grid_coords(grid), r)[0]


def peak(s: torch.Tensor, grid: tuple[int, int, int], k: int, r: int) -> torch.Tensor:
    """Tokens >= every neighbour within ``r`` (same frame) first, then the rest; top-k."""
    t, h, w = grid
    x = s.float().reshape(t, 1, h, w)
    pad = torch.nn.functional.pad(x, (r, r, r, r), value=float("-inf"))
    ok = torch.ones_like(x, dtype=torch.bool)
    for dr in range(-r, r + 1):
        for dc in range(-r, r + 1):
            if dr or dc:
                ok &= x >= pad[:, :, r + dr : r + dr + h, r + dc : r + dc + w]
    tier = ok.reshape(-1)
    rank = torch.argsort(s, descending=True, stable=True)
    order = torch.cat([rank[tier[rank]], rank[~tier[rank]]])
    return order[:k]


def rules(s: torch.Tensor, u: torch.Tensor, grid, k: int, prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{prefix}top": top(s, k)}
    for r in (1, 2):
        out[f"{prefix}spread{r}"] = spread(s, grid, k, r)
        out[f"{prefix}peak{r}"] = peak(s, grid, k, r)
    if prefix:
        out[f"{prefix}pool2"] = pool_maxmin(s, u, k, 2)
        return out
    for c in (1.5, 2, 3, 4, 8):
        out[f"pool{c}"] = pool_maxmin(s, u, k, c)
    for b in (1, 2, 4, 8):
        out[f"wmm{b}"] = weighted_maxmin(s, u, k, b)
    return out


def scene_outcomes(
    model: torch.nn.Module,
    labeller: torch.nn.Module,
    processor: Any,
    mapper: TokenMapper,
    index: int,
) -> dict:
    """Every rule's outcome on validation scene ``index`` (seed :data:`SEED`).

    Args:
        model: the grounded model (sdpa), the one that answers.
        labeller: the same model with eager attention (the label's relevance needs it).
        processor: its processor.
        mapper: the mapper whose scores the unprefixed rules select on.

    Returns:
        ``{"unpruned": bool, "labelled": bool, "correct": {rule: {ratio: bool}},
        "recall": {rule: {ratio: float}}}`` (ratios as ``str``; ``recall`` empty when the
        scene has no label).
    """
    sample = make_sample("val", index, SEED)
    _, _, record = label_grounded_sample(labeller, processor, sample)
    out: dict = {"labelled": record is not None, "correct": {}, "recall": {}}
    with torch.no_grad():
        inputs = build_inputs(processor, [sample.image], [sample.question.text])
        prep = prepare(model, inputs)
        target = TOKEN_ID[sample.question.answer]
        out["unpruned"] = int(pruned_logits(model, prep).argmax()) == target
        ms = select_layer0(model, prep, 1, mapper)[1]
        at = select_layer0(model, prep, 1, None)[1]
        u = _unit(prep.visual_embeds)
        for r in RATIOS:
            k = keep_count(prep.n_visual, r)
            sel = {**rules(ms, u, prep.grid, k, ""), **rules(at, u, prep.grid, k, "att_")}
            kept = {name: _from_visual_index(prep, v) for name, v in sel.items()}
            kept["divprune"] = select_divprune(prep, k)
            for name, pos in kept.items():
                ok = int(pruned_logits(model, prep, pos).argmax()) == target
                out["correct"].setdefault(name, {})[str(r)] = ok
                if record is not None:
                    idx = torch.searchsorted(prep.visual_positions, pos)
                    rec = kept_recall(idx, record.label, r)
                    out["recall"].setdefault(name, {})[str(r)] = rec
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_grounded_model()
    model.eval()
    labeller, _ = load_grounded_model(attn_implementation="eager")
    labeller.eval()
    mapper = load_mapper(ASSETS_DIR / "mapper.safetensors")
    hits: dict[str, dict[str, list[bool]]] = {}
    recalls: dict[str, dict[str, list[float]]] = {}
    unpruned: list[bool] = []
    labelled: list[bool] = []
    t0 = time.perf_counter()
    for i in range(args.n):
        scene = scene_outcomes(model, labeller, processor, mapper, i)
        unpruned.append(scene["unpruned"])
        labelled.append(scene["labelled"])
        for name, by_ratio in scene["correct"].items():
            for r, ok in by_ratio.items():
                hits.setdefault(name, {}).setdefault(r, []).append(ok)
        for name, by_ratio in scene["recall"].items():
            for r, rec in by_ratio.items():
                recalls.setdefault(name, {}).setdefault(r, []).append(rec)
        if (i + 1) % 100 == 0:
            print(f"{i + 1} scenes, {time.perf_counter() - t0:.0f} s", flush=True)
    import transformers

    summary = {
        "command": shlex.join(["python3", "-m", "benchmarks.mapper_v2.selection", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "split": "val",
        "seed": SEED,
        "scenes": args.n,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t0, 1),
        "unpruned_accuracy": sum(unpruned) / len(unpruned),
        "accuracy": {m: {r: sum(v) / len(v) for r, v in h.items()} for m, h in hits.items()},
        "mcnemar_p": {
            m: {
                ref: {r: mcnemar_p(hits[m][r], hits[ref][r]) for r in h}
                for ref in ("top", "att_top", "divprune")
                if ref != m
            }
            for m, h in hits.items()
        },
        "labelled": sum(labelled),
        "labelled_unpruned_disagree": sum(a != b for a, b in zip(labelled, unpruned, strict=True)),
        "recall": {m: {r: sum(v) / len(v) for r, v in h.items()} for m, h in recalls.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for m, acc in summary["accuracy"].items():
        print(m, {r: round(100 * a, 1) for r, a in acc.items()})
    print(f"label recall (%), {summary['labelled']} labelled scenes:")
    for m, rec in summary["recall"].items():
        print(m, {r: round(100 * a, 1) for r, a in rec.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
