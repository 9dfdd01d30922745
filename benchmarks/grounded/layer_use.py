"""Does a depth-up-scaled model use its new layers? Test accuracy with and without them, and
each decoder layer's share of the residual stream.

    python3 -m benchmarks.grounded.layer_use --run runs/grounded14up \\
        --out benchmarks/results/grounded14_layer_use.json

``--run`` is the ``--out`` of ``python3 -m benchmarks.grounded.train --init-from ...``: its
``train_log.json`` names the placement of the source's layers and the question types. On the
test split (the run's own test set: ``--n-per-size`` scenes per size, the run's seed and types)
this writes

- ``accuracy``: the model as trained, and ``without_new_layers``: the same weights with every
  new layer's residual output projections (``upscale.ZEROED``) set to 0, i.e. the source's
  layers alone, fine-tuned; per question type, with an exact McNemar p of the difference;
- ``update_ratio``: per decoder layer, the mean over the test prompts' tokens of
  ``|h_out - h_in| / |h_in|`` (L2 over the hidden size), the size of what the layer adds to the
  residual stream relative to what it receives; ``new`` marks the new layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.grounded.loop import LOG_FILE, evaluate, versions
from benchmarks.grounded.upscale import ZEROED
from tokenprune_kernels.bench import cpu_model, environment
from tokenprune_kernels.grounded.model import build_inputs, load_model_dir
from tokenprune_kernels.grounded.scenes import SPLIT_SIZES, make_sample
from tokenprune_kernels.grounded.stats import discordant, mcnemar_exact

PROG = "python3 -m benchmarks.grounded.layer_use"


def without_layers(model: Any, layers: Sequence[int]) -> Any:
    """A copy of ``model`` whose decoder ``layers`` add nothing to the residual stream (their
    :data:`~benchmarks.grounded.upscale.ZEROED` projections set to 0)."""
    out = copy.deepcopy(model)
    stack = out.model.language_model.layers
    with torch.no_grad():
        for i in layers:
            for name in ZEROED:
                stack[i].get_submodule(name.rsplit(".", 1)[0]).weight.zero_()
    return out


def update_ratios(model: Any, inputs: dict[str, torch.Tensor]) -> list[float]:
    """Per decoder layer, the mean over non-padding tokens of ``|h_out - h_in| / |h_in|``
    (L2 over the hidden size) on one batch of prompts ``inputs`` (``build_inputs``)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        seen.append((h_in.detach(), h_out.detach()))

    for layer in model.model.language_model.layers:
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    mask = inputs["attention_mask"].bool()
    ratios = []
    for h_in, h_out in seen:
        r = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)
        ratios.append(float(r[mask].mean()))
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python3 -m benchmarks.grounded.layer_use``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the --out of an --init-from training run")
    p.add_argument("--out", required=True, help="output .json")
    p.add_argument("--n-per-size", type=int, default=20, help="test scenes per size")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n_per_size < 1 or args.threads < 1:
        p.error("--n-per-size and --threads must be >= 1")
    run = Path(args.run)
    if not (run / LOG_FILE).is_file():
        p.error(f"--run must be the --out of a training run (no {run / LOG_FILE})")
    log = json.loads((run / LOG_FILE).read_text())
    if not log.get("init_from"):
        p.error(f"{run / LOG_FILE} is not the log of an --init-from run (no init_from)")
    torch.set_num_threads(args.threads)
    placement = log["init_from"]["placement"]
    seed, types = log["args"]["seed"], log["args"]["types"]
    model, processor = load_model_dir(run / "model")
    layers = model.config.text_config.num_hidden_layers
    new = [i for i in range(layers) if i not in placement]
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"seed": seed, "qtypes": types}
    full = evaluate(model, processor, "test", args.n_per_size, **kw)
    ablated = evaluate(without_layers(model, new), processor, "test", args.n_per_size, **kw)
    a = np.array([q["prediction"] == q["answer"] for q in full["predictions"]])
    b = np.array([q["prediction"] == q["answer"] for q in ablated["predictions"]])
    by_type = {}
    for t in types:
        sel = np.array([q["type"] == t for q in full["predictions"]])
        by_type[t] = {
            "n": int(sel.sum()),
            "accuracy": float(a[sel].mean()),
            "without_new_layers": float(b[sel].mean()),
            "mcnemar_p": mcnemar_exact(*discordant(a[sel].tolist(), b[sel].tolist())),
        }
    size = SPLIT_SIZES["test"][0]
    samples = [make_sample("test", j, seed, size, qtypes=types) for j in range(8)]
    inputs = build_inputs(processor, [s.image for s in samples], [s.question.text for s in samples])
    ratios = update_ratios(model, inputs)
    result = {
        "command": f"{PROG} " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "versions": versions(),
        "cpu": cpu_model(),
        "commit": environment("cpu")["commit"],
        "run": str(run),
        "placement": placement,
        "n": int(a.size),
        "accuracy": float(a.mean()),
        "without_new_layers": float(b.mean()),
        "mcnemar_p": mcnemar_exact(*discordant(a.tolist(), b.tolist())),
        "by_type": by_type,
        "update_ratio": [
            {"layer": i, "new": i in new, "ratio": round(r, 4)} for i, r in enumerate(ratios)
        ],
        "update_ratio_prompts": f"8 test scenes at {size[0]}x{size[1]}",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("n", "accuracy", "without_new_layers", "mcnemar_p")}))
    print(json.dumps(result["update_ratio"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
