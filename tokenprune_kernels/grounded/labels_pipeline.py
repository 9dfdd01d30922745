"""Explanation labels and the mapper for the grounded-VQA model.

    python -m tokenprune_kernels.grounded.labels_pipeline --n 400 --threads 1 \\
        --labels runs/grounded_labels --mapper tokenprune_kernels/grounded/assets/mapper.safetensors

This is ``tokenprune explain`` + ``tokenprune train-mapper`` run through their LIBRARY
functions on scenes generated in-process (no image or JSONL files), with the grounded model's
own processor (:func:`~tokenprune_kernels.grounded.model.load_grounded_model`). ``tokenprune
explain --model tokenprune_kernels/grounded/assets/model`` on the same scenes saved as files
gives the same labels (``tests/explain/test_explain_shipped_model.py``). Per sample (train
split, :func:`~tokenprune_kernels.grounded.scenes.make_sample` with ``seed`` - by default a
stream the model was not trained on):

1. prompt inputs with :func:`~tokenprune_kernels.grounded.model.build_inputs`;
2. greedy answer + the layer-0 instruction attention of the visual tokens with
   :func:`tokenprune_kernels.explain.pipeline.greedy_with_attention` (the inference path's
   scores, the mapper input);
3. samples answered correctly only: the gradient-weighted relevance of the visual tokens with
   :func:`tokenprune_kernels.explain.explain_relevance` (eager attention, the model's own greedy
   answer token teacher-forced, ``target="logit"``);
4. :func:`layer0_head_attention`: the same attention per query head and the tokens' grid
   positions (what a mapper with several attention channels and grid input trains on,
   ``tokenprune train-mapper --attention-channels G --grid``);
5. :class:`tokenprune_kernels.labels.ShardWriter` writes ``attn`` / ``label`` / ``heads`` /
   ``grid`` shards (resumable) and ``summary.json`` (seen, correct, rate).

Then :func:`tokenprune_kernels.training.train_mapper_from_labels` trains the mapper (Adam, KL to
the top-50% target, validation split, best by validation KL) and writes ``mapper.safetensors``,
its ``.json`` config and the ``.train.json`` log.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.explain import explain_relevance
from tokenprune_kernels.explain.pipeline import answers_match, greedy_with_attention, to_model
from tokenprune_kernels.grounded.model import TOKEN_ID, build_inputs
from tokenprune_kernels.grounded.scenes import (
    QUESTION_TYPES,
    Sample,
    check_question_types,
    make_sample,
)
from tokenprune_kernels.labels import LabelRecord, ShardWriter

LABEL_SEED = 7
"""Default scene seed of the label samples (train split; the model trained on seed 0)."""


def relevance_label(
    model: nn.Module, inputs: dict[str, torch.Tensor], answer: str | int
) -> torch.Tensor:
    """Gradient-weighted relevance of the visual tokens for ONE answer word.

    Args:
        model: the grounded Qwen2-VL with EAGER attention, not patched.
        inputs: processor inputs of one prompt (batch of one, no pads).
        answer: the answer word (one token of the vocabulary) or its token id.

    Returns:
        ``[n_v]`` float32 >= 0 (CPU).
    """
    tid = TOKEN_ID[answer] if isinstance(answer, str) else int(answer)
    rel = explain_relevance(model, to_model(inputs, model), torch.tensor([tid]))
    return rel.relevance.detach().float().cpu()


@torch.no_grad()
def layer0_head_attention(
    model: nn.Module, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head layer-0 instruction attention and grid positions of one prompt's visual
    tokens: what a mapper with several attention channels (and grid input) trains on.

    Args:
        model: the grounded Qwen2-VL (not patched).
        inputs: processor inputs of one prompt (batch of one, no pads), on the model's device.

    Returns:
        ``(heads [n_v, Hq] float32, grid [n_v, 2] float32)`` on the CPU: the op
        ``instruction_attention_heads(..., head_groups=Hq)`` on the model's own layer-0 queries
        and keys (the inference path's queries: the default instruction tokens), and
        :func:`~tokenprune_kernels.mapper.grid_positions` of the merged image grid.
    """
    from tokenprune_kernels.grounded.methods import _base, prepare
    from tokenprune_kernels.mapper import grid_positions
    from tokenprune_kernels.ops import instruction_attention_heads
    from tokenprune_kernels.transformers import default_instruction_mask_for
    from tokenprune_kernels.transformers.qwen import layer0_of

    base = _base(model)
    prep = prepare(model, inputs)
    ids = inputs["input_ids"].to(prep.embeds.device)
    instr = default_instruction_mask_for(base, ids, prep.visual_mask)[0]
    q_pos = instr.nonzero().flatten()
    vis = prep.visual_positions
    n_keys = int(torch.maximum(q_pos.max(), vis.max())) + 1
    layer0 = layer0_of(base)
    pos = prep.position_ids[:, 0]  # [3, L]
    q = layer0.queries(prep.embeds[0, q_pos], pos[:, None, q_pos])
    k = layer0.keys(prep.embeds[0, :n_keys], pos[:, None, :n_keys])
    cu = torch.tensor([0, 1], device=q.device)
    heads = instruction_attention_heads(
        q, k, cu * q_pos.numel(), cu * n_keys, vis, cu * vis.numel(), q_pos,
        layer0.scaling, layer0.num_heads,
    )  # fmt: skip
    t, h, w = prep.grid
    return heads.float().cpu(), grid_positions(h, w, t)


def label_grounded_sample(
    model: nn.Module, processor: Any, sample: Sample
) -> tuple[bool, str, LabelRecord | None]:
    """Greedy answer, correctness and (when correct) the label of one scene sample.

    Returns:
        ``(correct, greedy answer, LabelRecord or None)``; the record's ``attn`` / ``label`` are
        ``[n_v]`` float32.
    """
    inputs = to_model(build_inputs(processor, [sample.image], [sample.question.text]), model)
    answer_ids, attn, vis_pos = greedy_with_attention(model, inputs, max_new_tokens=2)
    greedy = processor.tokenizer.decode(answer_ids.tolist(), skip_special_tokens=True).strip()
    if answer_ids.numel() == 0 or not answers_match(greedy, sample.question.answer, "exact"):
        return False, greedy, None
    rel = explain_relevance(model, inputs, answer_ids.cpu())
    if not torch.equal(rel.visual_positions.cpu(), vis_pos.cpu()):
        raise RuntimeError("relevance and attention disagree on the visual positions")
    meta = {
        "model_type": model.config.model_type,
        "modality": "image",
        "n_visual": int(vis_pos.numel()),
        "prompt_length": int(inputs["input_ids"].shape[1]),
        "n_answer_tokens": int(answer_ids.numel()),
        "question": sample.question.text,
        "qtype": sample.question.qtype,
        "answer": sample.question.answer,
        "greedy_answer": greedy,
        "size": list(sample.scene.size),
        "split": sample.split,
        "index": sample.index,
        "target": "logit",
    }
    heads, grid = layer0_head_attention(model, inputs)
    record = LabelRecord(
        sample_id=f"{sample.split}-{sample.index}",
        attn=attn.detach().cpu().float(),
        label=rel.relevance.detach().cpu().float(),
        meta=meta,
        heads=heads,
        grid=grid,
    )
    return True, greedy, record


def make_labels(
    model: nn.Module,
    processor: Any,
    out_dir: str | Path,
    n: int,
    *,
    seed: int = LABEL_SEED,
    start: int = 0,
    shard_size: int = 256,
    metadata: dict[str, Any] | None = None,
    printer: Callable[[str], None] | None = None,
    qtypes: Sequence[str] = QUESTION_TYPES,
) -> dict[str, Any]:
    """Label train-split samples ``start .. start + n - 1`` (scene seed ``seed``, question types
    cycling through ``qtypes``) into ``out_dir`` (resumable: finished ids are skipped). Writes
    ``summary.json`` (``summary-<start>.json`` when ``start > 0``, so that a later range labelled
    into the same directory keeps its own); returns it. One process per directory at a time
    (:class:`~tokenprune_kernels.labels.ShardWriter` refuses a second): label ranges in parallel
    into separate directories."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    qtypes = check_question_types(qtypes)
    say = printer or (lambda line: None)
    out_dir = Path(out_dir)
    seen = correct = skipped = 0
    t0 = time.perf_counter()
    with ShardWriter(out_dir, shard_size=shard_size, metadata=metadata or {}) as writer:
        done = writer.done_ids()
        for i in range(start, start + n):
            if f"train-{i}" in done:
                skipped += 1
                continue
            ok, _, record = label_grounded_sample(
                model, processor, make_sample("train", i, seed, qtypes=qtypes)
            )
            seen += 1
            if ok and record is not None:
                correct += 1
                writer.add(record)
            if seen % 50 == 0:
                say(f"{seen} seen, {correct} correct, {time.perf_counter() - t0:.0f} s")
    summary = {
        "seen": seen,
        "correct": correct,
        "incorrect": seen - correct,
        "rate": correct / seen if seen else None,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    name = "summary.json" if start == 0 else f"summary-{start}.json"
    (out_dir / name).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _versions() -> dict[str, str]:
    import transformers

    import tokenprune_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenprune_kernels": tokenprune_kernels.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Labels for ``--n`` train samples, then the mapper (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="train samples to label")
    p.add_argument("--start", type=int, default=0, help="first train sample index")
    p.add_argument(
        "--question-types",
        default=",".join(QUESTION_TYPES),
        help="comma-separated question types the samples cycle through (default: the five "
        "default types; opt-in: count_small,read_glyph)",
    )
    p.add_argument("--seed", type=int, default=LABEL_SEED, help="scene seed of the samples")
    p.add_argument("--labels", type=Path, required=True, help="label directory")
    p.add_argument("--mapper", type=Path, help=".safetensors output (skip training if absent)")
    p.add_argument("--model-dir", type=Path, help="model directory (default: shipped)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.start < 0:
        p.error(f"--start must be >= 0, got {args.start}")
    qtypes = check_question_types(t for t in args.question_types.split(",") if t)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tokenprune_kernels.grounded.model import MODEL_DIR, load_model_dir

    model_dir = args.model_dir or MODEL_DIR
    model, processor = load_model_dir(model_dir)
    model.model.language_model.config._attn_implementation = "eager"  # vision tower stays sdpa
    command = shlex.join([sys.executable, "-m", "tokenprune_kernels.grounded.labels_pipeline"])
    command += " " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    meta = {
        "model": str(Path(model_dir).resolve()),
        "model_type": model.config.model_type,
        "split": "train",
        "scene_seed": args.seed,
        "question_types": qtypes,
        "versions": _versions(),
        "command": command,
        "threads": args.threads,
    }
    summary = make_labels(
        model,
        processor,
        args.labels,
        args.n,
        seed=args.seed,
        start=args.start,
        metadata=meta,
        printer=print,
        qtypes=qtypes,
    )
    print(json.dumps(summary), flush=True)
    if args.mapper is None:
        return 0
    from tokenprune_kernels.training import TrainConfig, train_mapper_from_labels

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0)
    result = train_mapper_from_labels(
        args.labels, args.mapper, config, printer=print, command=command
    )
    print(json.dumps(result.best), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "LABEL_SEED",
    "label_grounded_sample",
    "layer0_head_attention",
    "main",
    "make_labels",
    "relevance_label",
]
