"""The training loop of the grounded recipe: forward with the auxiliary losses, schedules,
validation and test by greedy ``generate``, the log.

AdamW, linear warm-up then cosine decay to 10%, gradient-norm clipping. Curriculum (the first
``curriculum`` share of the steps): scenes start with 1 - 2 objects ``start_scale`` times their
final size and grow to 3 - 6 objects of the evaluation size; small warm-up canvases give way
linearly to the training sizes over the first ``warm`` share. Every ``eval_every`` steps the
validation set is answered by ``model.generate`` and the best model by validation accuracy is
kept; at the end the test set (training sizes and the large ones) is answered the same way.

Everything is seeded: step ``i`` draws its data from ``sample_rng("train", i, seed)``, weights
from ``torch.manual_seed(seed)`` (the probes from ``seed + 1`` and ``seed + 2``); the same
arguments and thread count on the same torch and CPU vector ISA give the same weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.grounded.batches import FINE_CLASSES, training_batch
from benchmarks.grounded.losses import (
    LLMAux,
    answer_loss,
    answer_token_losses,
    shape_probe,
    shape_probe_loss,
)
from benchmarks.grounded.upscale import depth_upscaled
from tokenprune_kernels.bench import cpu_model, git_commit
from tokenprune_kernels.grounded.model import (
    build_config,
    build_model,
    build_processor,
    generate_answers,
    load_model_dir,
    save_model_dir,
)
from tokenprune_kernels.grounded.scenes import (
    MAX_OBJECTS,
    MIN_OBJECTS,
    QUESTION_TYPES,
    SHAPES,
    SPLIT_SIZES,
    make_sample,
    visual_tokens,
)

LOG_FILE = "train_log.json"


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _supports_encoder_outputs(model: Any) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def training_forward(
    model: Any,
    batch: dict[str, Any],
    probe: torch.nn.Module | None = None,
    llm_aux: LLMAux | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(logits [S, L, V], shape probe loss or None, language-model auxiliary losses)`` of the
    teacher-forced sequences of :func:`~benchmarks.grounded.batches.training_batch`. The tower
    runs once per image; its merged features feed both the model and the probe
    (:func:`~benchmarks.grounded.losses.shape_probe_loss`). The last is ``llm_aux(outputs,
    batch)`` (``{}`` without it)."""
    grid = batch["image_grid_thw"]
    common = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "mm_token_type_ids": batch["mm_token_type_ids"],
        "image_grid_thw": grid,
        "use_cache": False,
    }
    extra: dict[str, bool] = {}
    if llm_aux is not None and llm_aux.pos_weight > 0:
        extra = {"output_hidden_states": True}
    if _supports_encoder_outputs(model):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = model.model.get_image_features(batch["pixel_values"], grid).pooler_output
        enc = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        out = model(**common, **extra, mm_encoder_outputs=enc)
        aux = None if probe is None else shape_probe_loss(probe, torch.cat(feats), batch)
        return out.logits, aux, {} if llm_aux is None else llm_aux(out, batch)
    out = model(**common, **extra, pixel_values=batch["pixel_values"])
    llm = {} if llm_aux is None else llm_aux(out, batch)
    if probe is None:
        return out.logits, None, llm
    # older transformers: the tower runs once more for the probe's features
    feats = model.model.get_image_features(batch["pixel_values"], grid)
    feats = getattr(feats, "pooler_output", feats)
    return out.logits, shape_probe_loss(probe, torch.cat(tuple(feats)), batch), llm


def training_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Logits ``[S, L, V]`` of the teacher-forced sequences (:func:`training_forward` without
    auxiliary losses)."""
    return training_forward(model, batch)[0]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    processor: Any,
    split: str,
    n_per_size: int,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    qtypes: Sequence[str] = QUESTION_TYPES,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy ``model.generate`` on a fixed set of ``split``.

    ``n_per_size`` samples per size (default sizes: ``SPLIT_SIZES[split]``), sample indices
    ``k * n_per_size + j`` for size ``k`` (question types cycle with the index), generated in
    batches of one size. Returns ``{"n", "accuracy", "by_type", "by_size", "by_tokens"}``
    (``by_tokens``: ``"<=600"`` and ``">600"`` visual tokens) and ``"predictions"`` (index,
    size, type, answer, prediction per sample).
    """
    sizes = list(SPLIT_SIZES[split] if sizes is None else sizes)
    preds: list[dict[str, Any]] = []
    for k, size in enumerate(sizes):
        samples = [
            make_sample(split, k * n_per_size + j, seed, size, qtypes=qtypes)
            for j in range(n_per_size)
        ]
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            out = generate_answers(
                model, processor, [s.image for s in chunk], [s.question.text for s in chunk]
            )
            for s, p in zip(chunk, out, strict=True):
                preds.append(
                    {
                        "index": s.index,
                        "size": list(size),
                        "tokens": visual_tokens(size),
                        "type": s.question.qtype,
                        "question": s.question.text,
                        "answer": s.question.answer,
                        "prediction": p,
                    }
                )
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p in preds:
        ok = p["prediction"] == p["answer"]
        groups["by_type"][p["type"]].append(ok)
        groups["by_size"][f"{p['size'][0]}x{p['size'][1]} ({p['tokens']})"].append(ok)
        groups["by_tokens"]["<=600" if p["tokens"] <= 600 else ">600"].append(ok)
    result: dict[str, Any] = {
        "split": split,
        "n": len(preds),
        "accuracy": float(np.mean([p["prediction"] == p["answer"] for p in preds])),
    }
    for name, g in groups.items():
        result[name] = {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in g.items()}
    result["predictions"] = preds
    return result


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k != "predictions"}


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def curriculum_progress(step: int, steps: int, fraction: float) -> float:
    """``step / (fraction * steps)`` clipped to [0, 1] (1 when ``fraction`` is 0)."""
    end = fraction * steps
    return 1.0 if end <= 0 else min(1.0, step / end)


def curriculum_scale(step: int, steps: int, start: float, fraction: float) -> float:
    """Object-size factor at ``step``: ``start`` at step 0, linearly down to 1 at
    ``fraction * steps``, then 1. Large objects first make the attention to them quick to
    learn; the task then shrinks to the evaluation sizes."""
    return start + (1.0 - start) * curriculum_progress(step, steps, fraction)


def curriculum_objects(step: int, steps: int, fraction: float) -> tuple[int, int]:
    """Object-count range at ``step``: (1, 2) at step 0, growing linearly to
    ``(MIN_OBJECTS, MAX_OBJECTS)`` at ``fraction * steps``. One object first: its colour is
    learnt from the image at once, which teaches attention to objects; the tower's shape
    features then get gradients through that attention; more objects then need binding."""
    t = curriculum_progress(step, steps, fraction)
    lo = round(1 + (MIN_OBJECTS - 1) * t)
    hi = round(2 + (MAX_OBJECTS - 2) * t)
    return lo, max(lo, hi)


def warm_probability(step: int, steps: int, fraction: float) -> float:
    """Probability that step ``step`` uses a small warm-up canvas: 1 at step 0, linearly down
    to 0 at ``fraction * steps`` (0 when ``fraction`` is 0)."""
    if fraction <= 0:
        return 0.0
    return 1.0 - curriculum_progress(step, steps, fraction)


def lr_at(step: int, steps: int, lr: float, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``final * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def versions() -> dict[str, str]:
    """Versions of Python, torch, transformers, numpy, Pillow, tokenizers, the platform, the
    CPU with the vector ISA torch's kernels use (floating-point results, and so the trained
    weights, can differ between CPUs), and the checkout's commit
    (:func:`~tokenprune_kernels.bench.git_commit`)."""
    import PIL
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu": f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})",
        "commit": git_commit(),
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train, validate, keep the best model, test; write ``args.out`` (the options of
    :func:`benchmarks.grounded.train.parse_args`). Returns the log dict."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(
        vision_depth=args.vision_depth,
        vision_dim=args.vision_dim,
        vision_heads=args.vision_heads,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        rope_theta=args.rope_theta,
        initializer_range=args.init,
        mrope_section=args.mrope,
    )
    placement = None
    if getattr(args, "init_from", None):
        model, processor, placement = depth_upscaled(
            args.init_from, args.layers, args.seed, getattr(args, "init_placement", None)
        )
        config = model.config
    else:
        model = build_model(config, seed=args.seed)
        processor = build_processor()
    n_params = sum(p.numel() for p in model.parameters())
    probe = None
    if args.aux_weight > 0:
        torch.manual_seed(args.seed + 1)
        classes = FINE_CLASSES if getattr(args, "fine_probe", False) else 1 + len(SHAPES)
        probe = shape_probe(config.text_config.hidden_size, classes)
    llm_aux = None
    if args.aux_pos > 0 or args.aux_attn > 0:
        torch.manual_seed(args.seed + 2)
        llm_aux = LLMAux(
            config.text_config.hidden_size,
            pos_weight=args.aux_pos,
            pos_layer=args.aux_pos_layer,
            attn_weight=args.aux_attn,
            attn_layer=args.aux_attn_layer,
            attn_head=args.aux_attn_head,
            early_layer=args.aux_attn_early_layer if args.aux_attn_early_types else None,
            early_types=args.aux_attn_early_types,
            count_sink=getattr(args, "aux_attn_count_sink", False),
            count_head=getattr(args, "aux_attn_count_head", None),
            query_weight=getattr(args, "aux_query", 0.0),
        )
        if args.aux_attn > 0:
            llm_aux.attach(model)
    # the weight of each of LLMAux's losses, by the name it reports it under
    llm_weights = {
        "pos": args.aux_pos,
        "attn": args.aux_attn,
        "query": getattr(args, "aux_query", 0.0),
    }
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    if probe is not None:
        no_decay += list(probe.parameters())
    if llm_aux is not None:
        no_decay += list(llm_aux.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    log: dict[str, Any] = {
        "command": command,
        "args": vars(args),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "init_from": None
        if placement is None
        else {"model": str(args.init_from), "placement": placement},
        "config": config.to_dict(),
        "train_sizes": args.sizes,
        "steps": [],
        "val": [],
    }
    log_path = out / LOG_FILE

    def write_log() -> None:
        log_path.write_text(json.dumps(log, indent=1) + "\n")

    start = time.perf_counter()
    best = {"accuracy": -1.0, "step": 0}
    running: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    aux_running: list[float] = []
    llm_running: dict[str, list[float]] = defaultdict(list)
    seen = 0
    step = 0
    stopped_early = False
    val_s = 0.0
    for step in range(args.steps):
        model.train()
        batch, size, qtypes = training_batch(
            processor,
            step,
            args.seed,
            args.images,
            args.questions,
            sizes=[tuple(s) for s in args.sizes],
            scale=curriculum_scale(step, args.steps, args.start_scale, args.curriculum),
            aug_prob=args.aug_prob,
            aug_max=args.aug_max,
            object_range=curriculum_objects(step, args.steps, args.curriculum),
            warm_sizes=[tuple(w) for w in args.warm_sizes],
            warm_prob=warm_probability(step, args.steps, args.warm),
            qtypes=args.types,
            fine_labels=getattr(args, "fine_probe", False),
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits, aux, llm_losses = training_forward(model, batch, probe, llm_aux)
        loss = answer_loss(logits, batch["labels"])
        if aux is not None:
            aux_running.append(aux.item())
            loss = loss + args.aux_weight * aux
        # the logged answer loss (computed as the shipped log's was, to the bit)
        answer_only = loss.item() - (0.0 if aux is None else args.aux_weight * aux.item())
        for name, value in llm_losses.items():
            llm_running[name].append(value.item())
            loss = loss + llm_weights[name] * value
        with torch.no_grad():
            for qtype, ce in zip(qtypes, answer_token_losses(logits, batch["labels"]), strict=True):
                by_type[qtype].append(ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running.append(answer_only)
        seen += int(batch["input_ids"].shape[0])
        if (step + 1) % args.log_every == 0:
            entry = {
                "step": step + 1,
                "loss": float(np.mean(running)),
                "aux": round(float(np.mean(aux_running)), 4) if aux_running else None,
                **{f"aux_{k}": round(float(np.mean(v)), 4) for k, v in llm_running.items()},
                "answer_ce": {t: round(float(np.mean(v)), 3) for t, v in sorted(by_type.items())},
                "grad_norm": float(grad_norm),
                "lr": opt.param_groups[0]["lr"],
                "sequences": seen,
                "size": list(size),
                "objects": list(curriculum_objects(step, args.steps, args.curriculum)),
                "warm": round(warm_probability(step, args.steps, args.warm), 3),
                "scale": round(
                    curriculum_scale(step, args.steps, args.start_scale, args.curriculum), 3
                ),
                "wall_s": round(time.perf_counter() - start, 1),
            }
            log["steps"].append(entry)
            print(json.dumps(entry), flush=True)
            running = []
            by_type.clear()
            aux_running.clear()
            llm_running.clear()
        last = step + 1 == args.steps
        over = args.stop_after is not None and step + 1 >= args.stop_after
        if args.val_per_size and ((step + 1) % args.eval_every == 0 or last or over):
            model.eval()
            t0 = time.perf_counter()
            qt = args.types
            ev = evaluate(model, processor, "val", args.val_per_size, seed=args.seed, qtypes=qt)
            val_s += time.perf_counter() - t0
            rec = {"step": step + 1, "wall_s": round(time.perf_counter() - start, 1)}
            rec.update(_summary(ev))
            log["val"].append(rec)
            print(json.dumps({k: rec[k] for k in ("step", "wall_s", "accuracy")}), flush=True)
            print(json.dumps(rec["by_type"]), flush=True)
            if ev["accuracy"] > best["accuracy"]:
                best = {"accuracy": ev["accuracy"], "step": step + 1}
                save_model_dir(model, processor, out / "model")
            write_log()
        if over:
            stopped_early = True
            break
    if not args.val_per_size:  # no validation: the final model is the model
        model.eval()
        save_model_dir(model, processor, out / "model")
        best = {"accuracy": None, "step": step + 1}
    log["train_wall_s"] = round(time.perf_counter() - start, 1)
    log["val_wall_s"] = round(val_s, 1)
    log["steps_done"] = step + 1
    log["stopped_early"] = stopped_early
    log["best"] = best
    write_log()

    if not args.test_per_size:
        log["total_wall_s"] = round(time.perf_counter() - start, 1)
        write_log()
        return log
    model, processor = load_model_dir(out / "model")
    t0 = time.perf_counter()
    ev = evaluate(model, processor, "test", args.test_per_size, seed=args.seed, qtypes=args.types)
    log["test"] = _summary(ev)
    log["test"]["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "test_predictions.json").write_text(json.dumps(ev["predictions"], indent=0) + "\n")
    log["total_wall_s"] = round(time.perf_counter() - start, 1)
    write_log()
    print(json.dumps({k: log["test"][k] for k in ("accuracy", "by_type", "by_tokens")}), flush=True)
    return log
