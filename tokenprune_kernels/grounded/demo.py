"""``tokenprune demo``: one grounded-VQA scene answered with and without visual-token pruning,
and a picture of which tokens were kept.

    tokenprune demo --out demo.png
    tokenprune demo --keep-ratio 0.125 --index 3 --size 384x384 --json demo.json
    python -m tokenprune_kernels.grounded.demo --no-mapper --question-type left_of

The scene is ``make_sample(split, index, seed, size, question_type)``
(:mod:`~tokenprune_kernels.grounded.scenes`). The model answers it twice with greedy
``model.generate``: unpatched, then through the REAL inference path,
``apply_tokenprune(model, keep_ratio, mapper=mapper)`` (``--no-mapper``: the training-free
layer-0 attention scores); the kept tokens are read back with ``last_pruned(model)`` and the
model is reverted with ``revert_tokenprune``. The relevance map of the picture is the score the
pruning ranks (the mapper's output, or the raw layer-0 instruction attention), computed by
:func:`~tokenprune_kernels.grounded.methods.select_layer0` - the code the patched model runs - and
its top-k is checked against the real path's kept tokens.

Printed (and with ``--json`` written): the question, the true answer, both answers (right /
wrong), visual tokens before / after, the LLM input length before / after, the prefill time (one
``model(**inputs)`` forward on the prompt, median of ``--repeats``) and the total ``generate``
time (median of ``--repeats``) of both runs, and the torch thread count.

The PNG (matplotlib, Agg): left the image with the dropped 16 x 16 token cells greyed and dimmed
and the kept ones at full colour (thin outline), right the relevance heatmap on the
``(H/16, W/16)`` token grid.

Defaults are the shipped assets (``assets/model`` and ``assets/mapper.safetensors``); without
them the command says how to make them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.grounded.evaluate import cli_error
from tokenprune_kernels.grounded.methods import keep_count, prepare, select_layer0
from tokenprune_kernels.grounded.model import ASSETS_DIR, MODEL_DIR, build_inputs
from tokenprune_kernels.grounded.scenes import (
    QUESTION_TYPES,
    SPLIT_CODES,
    TOKEN_PX,
    Sample,
    make_sample,
)
from tokenprune_kernels.grounded.scenes import parse_size as scene_size
from tokenprune_kernels.mapper import TokenMapper

DEFAULT_KEEP_RATIO = 0.25
DEFAULT_INDEX = 0
DEFAULT_SEED = 0
DEFAULT_SIZE: tuple[int, int] | None = (384, 384)
DEFAULT_QUESTION_TYPE: str | None = None
"""The default scene: ``make_sample("test", DEFAULT_INDEX, DEFAULT_SEED, DEFAULT_SIZE,
DEFAULT_QUESTION_TYPE)`` (576 visual tokens; tests/grounded/test_shipped.py checks that the
shipped model answers it right with and without pruning)."""
DEFAULT_REPEATS = 3
MAPPER_FILE = ASSETS_DIR / "mapper.safetensors"

HOW_TO_TRAIN = (
    "train it from a clone of the repository with `python3 -m benchmarks.grounded.train --out "
    f"runs/grounded --threads 1` (about 75 min) and copy runs/grounded/model to {MODEL_DIR}"
)
HOW_TO_MAPPER = (
    "make it with `python -m tokenprune_kernels.grounded.labels_pipeline --n 1500 --threads 1 "
    "--labels runs/grounded_labels`, then `tokenprune train-mapper --labels runs/grounded_labels "
    f"--out {MAPPER_FILE} --epochs 20 --bucket --threads 2`"
)


# --------------------------------------------------------------------------------------------
# Running the demo
# --------------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn()`` once to warm up, then ``repeats`` timed calls: (last output, median in ms)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, 1e3 * statistics.median(times)


def _answer(processor: Any, out: torch.Tensor, prompt_len: int) -> str:
    new = out[0, prompt_len:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@torch.no_grad()
def run_demo(
    model: nn.Module,
    processor: Any,
    sample: Sample,
    *,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    mapper: TokenMapper | None = None,
    repeats: int = DEFAULT_REPEATS,
    max_new_tokens: int = 2,
) -> dict[str, Any]:
    """Answer ``sample`` with the unpatched model and with ``apply_tokenprune`` (the real path).

    Args:
        model: the grounded ``Qwen2VLForConditionalGeneration`` (not patched; left unpatched).
        processor: its processor.
        sample: from :func:`~tokenprune_kernels.grounded.scenes.make_sample`.
        keep_ratio: in ``(0, 1]``.
        mapper: the trained mapper, or None (raw layer-0 attention scores).
        repeats: timed repetitions (median) of the prefill and of ``generate``, each run.
        max_new_tokens: greedy tokens generated.

    Returns:
        JSON-ready dict of every printed number (see :func:`format_demo`) plus
        ``kept_positions`` (``[k]`` sequence positions of the kept visual tokens, ascending),
        ``kept_visual_index`` (``[k]`` their row-major index on the token grid), ``grid``
        (``[H/16, W/16]``), ``scores`` (``[n_v]`` float relevance, row-major) and
        ``harness_match`` (the real path kept exactly the top-k of :func:`select_layer0`).
    """
    from tokenprune_kernels.transformers import apply_tokenprune, last_pruned, revert_tokenprune

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if mapper is not None and not isinstance(mapper, TokenMapper):
        raise TypeError(f"mapper must be None or a TokenMapper, got {type(mapper).__name__}")
    device = next(model.parameters()).device
    question, truth = sample.question.text, sample.question.answer
    inputs = build_inputs(processor, [sample.image], [question])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_len = int(inputs["input_ids"].shape[1])

    prep = prepare(model, inputs)
    n_v = prep.n_visual
    keep = keep_count(n_v, keep_ratio)  # validates keep_ratio
    t, gh, gw = prep.grid
    if t != 1 or gh * gw != n_v:
        raise ValueError(f"expected one image frame of {n_v} tokens, got grid {prep.grid}")
    harness_kept, scores = select_layer0(model, prep, keep, mapper)

    def prefill() -> Any:
        return model(**inputs, use_cache=False)

    def generate() -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    _, prefill_full = _median_ms(prefill, repeats)
    out_full, gen_full = _median_ms(generate, repeats)
    answer_full = _answer(processor, out_full, prompt_len)

    apply_tokenprune(model, keep_ratio=keep_ratio, mapper=mapper)
    try:
        _, prefill_pruned = _median_ms(prefill, repeats)
        out_pruned, gen_pruned = _median_ms(generate, repeats)
        pruned = last_pruned(model)
    finally:
        revert_tokenprune(model)
    if pruned is None:
        raise RuntimeError("apply_tokenprune recorded no pruned prefill (last_pruned is None)")
    answer_pruned = _answer(processor, out_pruned, prompt_len)
    kept = torch.sort(pruned.kept_visual[0].to(prep.visual_positions.device)).values
    kept_index = torch.searchsorted(prep.visual_positions, kept)
    llm_after = int(pruned.attention_mask[0].sum())
    return {
        "split": sample.split,
        "index": sample.index,
        "size": list(sample.scene.size),
        "question_type": sample.question.qtype,
        "question": question,
        "true_answer": truth,
        "answer_full": answer_full,
        "answer_pruned": answer_pruned,
        "correct_full": answer_full == truth,
        "correct_pruned": answer_pruned == truth,
        "method": "mapper" if mapper is not None else "attention",
        "keep_ratio": float(keep_ratio),
        "visual_tokens_before": n_v,
        "visual_tokens_after": int(kept.numel()),
        "llm_input_before": prompt_len,
        "llm_input_after": llm_after,
        "prefill_ms_full": prefill_full,
        "prefill_ms_pruned": prefill_pruned,
        "generate_ms_full": gen_full,
        "generate_ms_pruned": gen_pruned,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "harness_match": bool(torch.equal(kept, harness_kept.to(kept.device))),
        "grid": [gh, gw],
        "kept_positions": kept.tolist(),
        "kept_visual_index": kept_index.tolist(),
        "scores": scores.float().cpu().tolist(),
    }


def _mark(ok: bool) -> str:
    return "right" if ok else "wrong"


def format_demo(r: dict[str, Any]) -> str:
    """The printed report of :func:`run_demo`'s result ``r``."""
    pct = f"{100 * r['keep_ratio']:g}%"
    source = "mapper" if r["method"] == "mapper" else "layer-0 attention, no mapper"
    lines = [
        f"scene       {r['split']} #{r['index']}, {r['size'][0]}x{r['size'][1]} px, "
        f"{r['question_type']}",
        f"question    {r['question']}",
        f"true answer {r['true_answer']}",
        f"no pruning  {r['answer_full']!r} ({_mark(r['correct_full'])})",
        f"pruned {pct:<5s}{r['answer_pruned']!r} ({_mark(r['correct_pruned'])}) [{source}]",
        f"visual tokens    {r['visual_tokens_before']} -> {r['visual_tokens_after']}",
        f"LLM input length {r['llm_input_before']} -> {r['llm_input_after']}",
        f"prefill ms       {r['prefill_ms_full']:.1f} -> {r['prefill_ms_pruned']:.1f} "
        f"(one forward on the prompt, median of {r['repeats']})",
        f"generate ms      {r['generate_ms_full']:.1f} -> {r['generate_ms_pruned']:.1f} "
        f"(total, median of {r['repeats']})",
        f"threads          {r['threads']}",
    ]
    if not r["harness_match"]:
        lines.append("WARNING: the real path's kept tokens differ from methods.select_layer0")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------


def kept_mask(grid: Sequence[int], kept_visual_index: Sequence[int]) -> torch.Tensor:
    """``[H/16, W/16]`` bool, True at the kept tokens (row-major visual order)."""
    gh, gw = int(grid[0]), int(grid[1])
    mask = torch.zeros(gh * gw, dtype=torch.bool)
    mask[torch.as_tensor(list(kept_visual_index), dtype=torch.int64)] = True
    return mask.view(gh, gw)


def highlight_kept(image: Any, mask: torch.Tensor, dim: float = 0.35) -> Any:
    """The RGB image as a float ``[H, W, 3]`` numpy array in ``[0, 1]`` with the DROPPED
    ``16 x 16`` cells greyed and dimmed to ``dim`` of their luminance (``mask``: ``[H/16, W/16]``
    bool, True = kept, full colour)."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    gh, gw = mask.shape
    if arr.shape[0] != gh * TOKEN_PX or arr.shape[1] != gw * TOKEN_PX:
        raise ValueError(
            f"image of {arr.shape[0]}x{arr.shape[1]} px does not match the {gh}x{gw} token grid"
        )
    keep = np.kron(mask.numpy().astype(np.float32), np.ones((TOKEN_PX, TOKEN_PX), np.float32))
    grey = (arr @ np.array([0.299, 0.587, 0.114], np.float32))[..., None] * dim
    return keep[..., None] * arr + (1.0 - keep[..., None]) * np.repeat(grey, 3, axis=-1)


def plot_demo(result: dict[str, Any], image: Any, path: str | Path) -> bool:
    """Write the demo picture of :func:`run_demo`'s ``result`` for ``image`` (the sample's PIL
    image) to ``path`` (PNG). Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Rectangle
    except ImportError:
        return False
    import numpy as np

    gh, gw = result["grid"]
    mask = kept_mask(result["grid"], result["kept_visual_index"])
    heat = torch.tensor(result["scores"], dtype=torch.float32).view(gh, gw).numpy()
    height, width = gh * TOKEN_PX, gw * TOKEN_PX
    panel_w = 4.6
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * panel_w + 1.2, panel_w * height / width + 1.6), dpi=120
    )
    ax = axes[0]
    ax.imshow(highlight_kept(image, mask), interpolation="nearest", extent=(0, width, height, 0))
    cells = [
        Rectangle((j * TOKEN_PX, i * TOKEN_PX), TOKEN_PX, TOKEN_PX)
        for i, j in mask.nonzero().tolist()
    ]
    ax.add_collection(
        PatchCollection(cells, facecolor="none", edgecolor="white", linewidth=0.4, alpha=0.8),
        autolim=False,
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(
        f"kept {result['visual_tokens_after']}/{result['visual_tokens_before']} visual tokens "
        f"({100 * result['keep_ratio']:g}%)\nLLM input {result['llm_input_before']} -> "
        f"{result['llm_input_after']} tokens",
        fontsize=9,
    )
    ax = axes[1]
    # colour range: 1st - 99th percentile (a few extreme tokens would flatten the map)
    lo, hi = (float(v) for v in np.percentile(heat, [1.0, 99.0]))
    if hi <= lo:
        lo, hi = float(heat.min()), float(heat.max()) + 1e-12
    im = ax.imshow(heat, cmap="magma", interpolation="nearest", vmin=lo, vmax=hi)
    source = "mapper scores" if result["method"] == "mapper" else "layer-0 attention (no mapper)"
    ax.set_title(
        f"predicted relevance: {source}\n{gh}x{gw} token grid, colours clipped to the 1-99th "
        "percentile",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Q: {result['question']}   (true answer: {result['true_answer']})\n"
        f"no pruning: {result['answer_full']!r} ({_mark(result['correct_full'])})   "
        f"pruned to {100 * result['keep_ratio']:g}%: {result['answer_pruned']!r} "
        f"({_mark(result['correct_pruned'])})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``--size``: ``"HxW"`` (e.g. ``"256x320"``) to ``(H, W)``
    (:func:`~tokenprune_kernels.grounded.scenes.parse_size`); None or ``"auto"`` give None (the
    sample draws its size).

    Raises:
        ValueError: not ``HxW`` ints, or not multiples of 16 px and >= 64 (naming ``--size``).
    """
    if text is None or str(text).strip().lower() == "auto":
        return None
    return scene_size(text, "--size")


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--model", "--model-dir", dest="model", type=Path, default=None,
        help=f"model directory (default: the shipped model, {MODEL_DIR})",
    )  # fmt: skip
    p.add_argument(
        "--mapper", type=Path, default=None,
        help=f"mapper .safetensors (default: the shipped mapper, {MAPPER_FILE})",
    )  # fmt: skip
    p.add_argument(
        "--no-mapper", action="store_true",
        help="training-free: rank by the raw layer-0 instruction attention (no mapper)",
    )  # fmt: skip
    p.add_argument("--keep-ratio", type=float, default=DEFAULT_KEEP_RATIO, help="in (0, 1]")
    p.add_argument("--split", choices=sorted(SPLIT_CODES), default="test")
    p.add_argument("--index", type=int, default=DEFAULT_INDEX, help="sample index in the split")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="scene seed")
    default_size = None if DEFAULT_SIZE is None else "x".join(map(str, DEFAULT_SIZE))
    p.add_argument(
        "--size", default=default_size,
        help=f"HxW pixels (default: {default_size}; 'auto': drawn by the sample)",
    )  # fmt: skip
    p.add_argument("--question-type", choices=QUESTION_TYPES, default=DEFAULT_QUESTION_TYPE)
    p.add_argument("--threads", type=int, default=1, help="torch threads (timing)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs (median)")
    p.add_argument("--out", type=Path, default=Path("demo.png"), help="the PNG to write")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return p


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``tokenprune`` subcommands; its handler is :func:`cmd_demo`."""
    p = subparsers.add_parser(
        "demo",
        help="one grounded-VQA scene answered with and without pruning, and a PNG of the kept "
        "tokens",
        description=__doc__.split("\n\n")[0],
    )
    _configure(p)
    p.set_defaults(func=cmd_demo)
    return p


def _check_args(args: argparse.Namespace) -> tuple[Path, Path | None, tuple[int, int] | None]:
    """Validate ``args`` before anything is loaded: (model dir, mapper file or None, size)."""
    r = args.keep_ratio
    if not 0.0 < r <= 1.0:  # also rejects nan
        raise ValueError(f"--keep-ratio must be in (0, 1], got {r}")
    for name, v, lo in (
        ("--index", args.index, 0),
        ("--seed", args.seed, 0),
        ("--threads", args.threads, 1),
        ("--repeats", args.repeats, 1),
    ):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    size = parse_size(args.size)
    if args.model is not None:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--model '{model_dir}' holds no model (no config.json)")
    else:
        model_dir = MODEL_DIR
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"the shipped model is missing ({model_dir}): {HOW_TO_TRAIN}; or pass --model DIR"
            )
    if args.no_mapper:
        if args.mapper is not None:
            raise ValueError("--mapper and --no-mapper exclude each other")
        return model_dir, None, size
    if args.mapper is not None:
        mpath = Path(args.mapper)
        if mpath.suffix != ".safetensors":
            raise ValueError(f"--mapper must be a .safetensors file, got '{mpath}'")
        if not mpath.is_file():
            raise ValueError(f"--mapper '{mpath}' not found")
    else:
        mpath = MAPPER_FILE
        if not mpath.is_file():
            raise ValueError(
                f"the shipped mapper is missing ({mpath}): {HOW_TO_MAPPER}; or pass --mapper "
                "FILE, or --no-mapper for the training-free scores"
            )
    return model_dir, mpath, size


def cmd_demo(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the demo of ``args`` (see :func:`add_demo_parser`): print the report, write the PNG
    (and the JSON). Returns the exit status (2 on bad arguments)."""
    from tokenprune_kernels.grounded.model import load_model_dir
    from tokenprune_kernels.mapper import load_mapper

    try:
        model_dir, mpath, size = _check_args(args)
    except ValueError as err:
        return cli_error(str(err))
    torch.set_num_threads(args.threads)
    try:
        mapper = None if mpath is None else load_mapper(mpath)
    except (ValueError, OSError) as err:
        return cli_error(f"--mapper '{mpath}' could not be loaded: {err}")
    t0 = time.perf_counter()
    sample = make_sample(args.split, args.index, args.seed, size, args.question_type)
    model, processor = load_model_dir(model_dir)
    result = run_demo(
        model, processor, sample, keep_ratio=args.keep_ratio, mapper=mapper, repeats=args.repeats
    )
    if argv is None:  # tokenprune's main() keeps its argv on args
        argv = getattr(args, "argv", None) or sys.argv[1:]
    rest = list(argv)
    result["command"] = "tokenprune " + shlex.join(rest)
    result["model"] = str(model_dir)
    result["mapper"] = None if mpath is None else str(mpath)
    print(format_demo(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot_demo(result, sample.image, out):
        print(f"wrote {out}")
    else:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    if args.json is not None:
        jpath = Path(args.json)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {jpath}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenprune_kernels.grounded.demo ...`` (same options as ``tokenprune
    demo``)."""
    from tokenprune_kernels.cli import run_subcommand

    return run_subcommand("demo", argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "DEFAULT_INDEX",
    "DEFAULT_KEEP_RATIO",
    "DEFAULT_QUESTION_TYPE",
    "DEFAULT_SEED",
    "DEFAULT_SIZE",
    "MAPPER_FILE",
    "add_demo_parser",
    "cmd_demo",
    "format_demo",
    "highlight_kept",
    "kept_mask",
    "main",
    "parse_size",
    "plot_demo",
    "run_demo",
]
