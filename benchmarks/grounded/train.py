"""Train the grounded-VQA Qwen2-VL from scratch on the CPU; evaluate it with greedy ``generate``.

    python3 -m benchmarks.grounded.train --out runs/grounded --threads 1

Run from the repository root (the recipe is not part of the installed package). The defaults
are the shipped model's recipe: ``tokenprune_kernels/grounded/assets/train_log.json`` holds its
command, versions, per-step losses and test accuracy, and ``docs/grounded_training.md`` what made
it learn and the runs that did not. ``bash scripts/grounded_pipeline.sh runs/grounded`` ships a
run's model and regenerates its mapper, evaluations and demo.

Outputs in ``--out``: the model directory (``save_pretrained`` safetensors + processor files),
``train_log.json`` (command, versions, arguments, config, per-step losses, validation accuracy
per evaluation, wall times, test accuracy per question type, per size and per token range) and
``test_predictions.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.grounded.batches import WARM_SIZES
from benchmarks.grounded.loop import train
from benchmarks.grounded.upscale import check_placement
from tokenprune_kernels.grounded.scenes import (
    ALL_QUESTION_TYPES,
    EXTRA_QUESTION_TYPES,
    QUESTION_TYPES,
    TRAIN_SIZES,
    parse_size,
)

PROG = "python3 -m benchmarks.grounded.train"
SHIPPED_EARLY_TYPES = ("colour_of_shape", "left_of", "extreme")
"""Default ``--aux-attn-early-types``: the question types whose answer attention is supervised
at ``--aux-attn-early-layer`` (1): the spatial ones and the one answered by a colour read from
single tokens."""
SHIPPED_MROPE: tuple[int, ...] = (1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 7, 0, 0)
"""The language model's M-RoPE sections at the default head dim (32): interleaved chunks
(t, h, w, t, h, w, ... of the 16 rotary frequencies, fastest first): rows and columns each get 4
of the 9 fastest, ``t`` the 7 slowest. Other head dims (tests' tiny models) get
:func:`~tokenprune_kernels.grounded.model.build_config`'s ``[t, h, w]`` split."""


OPTIONS_SINCE_SHIPPED: dict[str, object] = {
    "init_from": None,
    "init_placement": None,
    "fine_probe": False,
    "aux_attn_count_sink": False,
    "aux_attn_count_head": None,
    "aux_query": 0.0,
}
"""Options added after the shipped run (``tokenprune_kernels/grounded/assets/train_log.json``
does not log them), each at the default that keeps the shipped recipe: a from-scratch start,
the shape-only probe, the plain answer attention for counting questions, no query probe."""


def quarter_depth(layers: int) -> int:
    """The default layer of the early auxiliary losses for a language model of ``layers``
    decoder layers: a quarter of the depth, rounded half up, at least 1 (1 at the shipped 4
    layers, 3 at 12, 4 at 14). ``--aux-pos-layer`` takes it as is, ``--aux-attn-early-layer``
    at most ``layers - 1`` (a decoder layer index)."""
    return max(1, (layers + 2) // 4)


def _parse_sizes(p: argparse.ArgumentParser, flag: str, text: str) -> list[list[int]]:
    try:
        return [list(parse_size(s, flag)) for s in text.split(",") if s.strip()]
    except ValueError as err:
        p.error(f"{flag} must be HxW,HxW,... ({err})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main` (defaults: the shipped recipe)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train the grounded-VQA Qwen2-VL from scratch (CPU) and evaluate it.",
    )
    p.add_argument("--out", required=True, help="output directory (model + train_log.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3800, help="optimizer steps")
    p.add_argument("--images", type=int, default=8, help="scenes per step (one size per step)")
    p.add_argument("--questions", type=int, default=6, help="questions per scene (at most)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=2.0, help="gradient-norm clipping")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps")
    p.add_argument(
        "--val-per-size", type=int, default=6, help="validation scenes per size (0: none)"
    )
    p.add_argument("--test-per-size", type=int, default=20, help="test scenes per size (0: none)")
    p.add_argument(
        "--sizes",
        default=None,
        help="training sizes as HxW,HxW,... (default: TRAIN_SIZES)",
    )
    p.add_argument("--start-scale", type=float, default=2.5, help="object-size factor at step 0")
    p.add_argument(
        "--curriculum",
        type=float,
        default=0.5,
        help="share of the steps over which objects shrink to their evaluation size",
    )
    p.add_argument(
        "--aug-prob", type=float, default=0.25, help="share of scenes with larger objects"
    )
    p.add_argument("--aug-max", type=float, default=2.0, help="largest augmentation factor")
    p.add_argument(
        "--warm",
        type=float,
        default=1.0,
        help="share of the steps over which small warm-up canvases give way to --sizes",
    )
    p.add_argument(
        "--warm-sizes",
        default=",".join(f"{h}x{w}" for h, w in WARM_SIZES),
        help="warm-up canvas sizes as HxW,HxW,... ('' for none)",
    )
    p.add_argument(
        "--aux-weight",
        type=float,
        default=1.0,
        help="weight of the shape probe's loss on the merged visual features (0: off)",
    )
    p.add_argument(
        "--fine-probe",
        action="store_true",
        help="the shape probe also classifies the tokens of small objects (their shape, as "
        "classes of their own) and glyphs (their digit), each group with a loss mean of its own "
        "(benchmarks.grounded.batches.token_fine_labels); for the opt-in question types",
    )
    p.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule (a reproducibility check)",
    )
    p.add_argument(
        "--aux-pos",
        type=float,
        default=1.0,
        help="weight of the language model's visual-token position probe (LLMAux; 0: off)",
    )
    p.add_argument(
        "--aux-pos-layer",
        type=int,
        default=None,
        help="the position probe reads hidden_states[N] (after decoder layer N-1; default: a "
        "quarter of --layers, 1 at 4 layers)",
    )
    p.add_argument(
        "--aux-attn",
        type=float,
        default=0.5,
        help="weight of the answer-to-involved-objects attention loss (LLMAux; 0: off)",
    )
    p.add_argument("--aux-attn-layer", type=int, default=-1, help="decoder layer of --aux-attn")
    p.add_argument("--aux-attn-head", type=int, default=0, help="attention head of --aux-attn")
    p.add_argument(
        "--aux-attn-early-layer",
        type=int,
        default=None,
        help="--aux-attn: decoder layer of the --aux-attn-early-types questions' attention "
        "(default: a quarter of --layers, 1 at 4 layers)",
    )
    p.add_argument(
        "--aux-attn-early-types",
        default=",".join(SHIPPED_EARLY_TYPES),
        help="comma-separated question types of --aux-attn-early-layer ('': none, all at "
        "--aux-attn-layer)",
    )
    p.add_argument(
        "--aux-attn-count-sink",
        action="store_true",
        help="--aux-attn: counting questions (count_colour, count_small) are supervised to put "
        "1/(n+1) of the head's mass on each of the n counted objects and on the sequence's "
        "first token (KL divergence), so the head's output carries the count, also for n = 0 "
        "(benchmarks.grounded.batches.count_weights)",
    )
    p.add_argument(
        "--aux-attn-count-head",
        type=int,
        default=None,
        help="--aux-attn-count-sink: the attention head the counting questions supervise "
        "(default: --aux-attn-head)",
    )
    p.add_argument(
        "--aux-query",
        type=float,
        default=0.0,
        help="weight of the count query probe (LLMAux): the input of --aux-attn-layer at the "
        "answer token classifies the colour and shape a counting question asks for (0: off; "
        "needs --aux-attn > 0)",
    )
    p.add_argument(
        "--question-types",
        "--types",
        dest="types",
        default=",".join(QUESTION_TYPES),
        help="comma-separated question types to train and evaluate on (default: the five "
        f"default types; opt-in: {','.join(EXTRA_QUESTION_TYPES)})",
    )
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument(
        "--layers",
        type=int,
        default=4,
        help="language-model decoder layers (the early auxiliary layers follow it)",
    )
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=10000.0, help="language-model M-RoPE base")
    p.add_argument("--init", type=float, default=0.08, help="std of the initial weights")
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this trained model directory, deepened to --layers by depth "
        "up-scaling (benchmarks.grounded.upscale; the architecture options other than "
        "--layers are then the source's)",
    )
    p.add_argument(
        "--init-placement",
        default=None,
        help="--init-from: comma-separated new indices of the source's layers, strictly "
        "increasing (default: evenly spread, the first at 0 and the last at the top)",
    )
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "images", "questions", "warmup", "threads", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stop_after is not None and args.stop_after < 1:
        p.error("--stop-after must be >= 1")
    for name in ("val_per_size", "test_per_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0: skip)")
    if not 1.0 <= args.start_scale <= 4.0 or not 0.0 <= args.curriculum <= 1.0:
        p.error("--start-scale must be in [1, 4] and --curriculum in [0, 1]")
    if not 0.0 <= args.aug_prob <= 1.0 or not 1.0 <= args.aug_max <= 2.5:
        p.error("--aug-prob must be in [0, 1] and --aug-max in [1, 2.5]")
    head_dim = args.hidden_size // args.heads
    args.mrope = list(SHIPPED_MROPE) if head_dim == 2 * sum(SHIPPED_MROPE) else None
    if args.layers < 1:
        p.error("--layers must be >= 1")
    if args.init_from is not None:
        cfg = Path(args.init_from) / "config.json"
        if not cfg.is_file():
            p.error(f"--init-from must be a model directory with a config.json, got {cfg}")
        text = json.loads(cfg.read_text())["text_config"]
        if args.layers < text["num_hidden_layers"]:
            p.error(
                f"--layers ({args.layers}) must be >= the --init-from model's "
                f"{text['num_hidden_layers']} layers"
            )
        args.heads = text["num_attention_heads"]
        if args.init_placement is not None:
            try:
                args.init_placement = check_placement(
                    [int(x) for x in args.init_placement.split(",") if x.strip()],
                    text["num_hidden_layers"],
                    args.layers,
                )
            except ValueError as err:
                p.error(f"--init-placement: {err}")
    elif args.init_placement is not None:
        p.error("--init-placement needs --init-from")
    if args.aux_pos_layer is None:
        args.aux_pos_layer = quarter_depth(args.layers)
    if args.aux_attn_early_layer is None:
        args.aux_attn_early_layer = min(quarter_depth(args.layers), args.layers - 1)
    args.types = [t for t in args.types.split(",") if t]
    bad = [t for t in args.types if t not in ALL_QUESTION_TYPES]
    if bad or not args.types or len(set(args.types)) != len(args.types):
        p.error(
            f"--question-types must be distinct types of {','.join(ALL_QUESTION_TYPES)}, "
            f"got {','.join(args.types)}"
        )
    if args.aux_pos < 0 or args.aux_attn < 0:
        p.error("--aux-pos and --aux-attn must be >= 0 (0: off)")
    if not 1 <= args.aux_pos_layer <= args.layers:
        p.error(f"--aux-pos-layer must be in [1, --layers ({args.layers})]")
    n = args.layers
    if not -n <= args.aux_attn_layer < n:
        p.error(f"--aux-attn-layer must be a decoder layer index ({-n} .. {n - 1})")
    if not -n <= args.aux_attn_early_layer < n:
        p.error(f"--aux-attn-early-layer must be a decoder layer index ({-n} .. {n - 1})")
    args.aux_attn_early_types = [t for t in args.aux_attn_early_types.split(",") if t]
    unknown = [t for t in args.aux_attn_early_types if t not in ALL_QUESTION_TYPES]
    if unknown:
        p.error(
            f"--aux-attn-early-types must be of {','.join(ALL_QUESTION_TYPES)} "
            f"(or ''), got {','.join(unknown)}"
        )
    if not 0 <= args.aux_attn_head < args.heads:
        p.error(f"--aux-attn-head must be in [0, --heads ({args.heads}))")
    if args.aux_weight < 0:
        p.error(f"--aux-weight must be >= 0 (0: off), got {args.aux_weight}")
    if args.aux_attn_count_sink and args.aux_attn == 0:
        p.error("--aux-attn-count-sink needs the answer attention loss: --aux-attn > 0")
    if args.aux_query < 0:
        p.error(f"--aux-query must be >= 0 (0: off), got {args.aux_query}")
    if args.aux_query > 0 and args.aux_attn == 0:
        p.error("--aux-query needs the answer attention hooks: --aux-attn > 0")
    if args.aux_attn_count_head is not None:
        if not args.aux_attn_count_sink:
            p.error("--aux-attn-count-head needs --aux-attn-count-sink")
        if not 0 <= args.aux_attn_count_head < args.heads:
            p.error(f"--aux-attn-count-head must be in [0, --heads ({args.heads}))")
    if args.fine_probe and args.aux_weight == 0:
        p.error("--fine-probe needs the shape probe: --aux-weight > 0")
    if not 0.0 <= args.warm <= 1.0:
        p.error("--warm must be in [0, 1]")
    if args.sizes is None:
        args.sizes = [list(s) for s in TRAIN_SIZES]
    else:
        args.sizes = _parse_sizes(p, "--sizes", args.sizes)
        if not args.sizes:
            p.error("--sizes must name at least one size")
    args.warm_sizes = _parse_sizes(p, "--warm-sizes", args.warm_sizes)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python3 -m benchmarks.grounded.train``."""
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    train(args, f"{PROG} " + " ".join(shlex.quote(a) for a in given))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
