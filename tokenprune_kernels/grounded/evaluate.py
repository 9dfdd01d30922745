"""``tokenprune eval``: accuracy vs keep ratio of every pruning method on the grounded-VQA test
split, prefill time per method, a Markdown table and a matplotlib PNG.

    tokenprune eval --seeds 0 1 2 --n-per-size 20 --threads 1 --out benchmarks/results/grounded_eval
    tokenprune eval --sizes large --n-per-size 10 --out benchmarks/results/grounded_eval_large

For every seed ``s`` the evaluation subset is ``make_sample("test", i, seed=s, size)`` for the
``(i, size)`` of :func:`~tokenprune_kernels.grounded.scenes.eval_indices` restricted to the chosen
sizes (``train``: the training sizes, 196 - 576 visual tokens; ``large``: 1024 - 2304): every
seed draws a different set of scenes from the test stream, so the spread over seeds is the
sampling spread of the subset. Every sample is one prompt (batch of one).

Accuracy: exact match of the answer token - the argmax over the FULL vocabulary of the prefill
logits at the last prompt position (answers are one word = one token; this is the first token
``generate()`` emits, checked against ``generate()`` on the first samples of the run).
Methods: :mod:`tokenprune_kernels.grounded.methods` (``none``, ``oracle``, ``mapper``,
``attention``, ``fastv``, ``dart``, ``divprune``, ``random``, ``uniform``). At keep ratio 1
every method keeps every token, so that column is the unpruned run.

Prefill time: per method and keep ratio, the median over the samples of seed ``seeds[0]`` of one
prompt's wall time from processor inputs to the last position's logits: vision tower + merge +
M-RoPE ids (shared) + the method's selection + the language model on the kept tokens, with
``torch.set_num_threads(--threads)``. The oracle's label (a backward pass) is NOT counted: it is
an upper bound, not a method. For ours (``mapper``, ``attention``) the REAL path is also run and
timed: ``apply_tokenprune(model, keep_ratio, mapper=...)`` and one ``model(**inputs)`` prefill;
its kept tokens are compared with the harness's selection (mismatches are reported), on
the first seed's samples.

Outputs: ``<out>.json`` (every number; the per-sample predictions as a SHA-256 digest),
``<out>.md`` (tables, targets, commit, versions,
command), ``<out>.png`` (accuracy vs keep ratio, min-max over seeds as error bars).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.grounded.methods import (
    METHODS,
    answer_token,
    fastv_logits,
    keep_count,
    prepare,
    pruned_logits,
    select,
)
from tokenprune_kernels.grounded.model import TOKEN_ID, build_inputs
from tokenprune_kernels.grounded.scenes import (
    ANSWERS_BY_TYPE,
    LARGE_SIZES,
    QUESTION_TYPES,
    SPLIT_SIZES,
    TRAIN_SIZES,
    Sample,
    check_sizes,
    make_sample,
)
from tokenprune_kernels.mapper import TokenMapper

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
DEFAULT_METHODS: tuple[str, ...] = (
    "none",
    "oracle",
    "mapper",
    "attention",
    "fastv",
    "dart",
    "divprune",
    "random",
    "uniform",
)
SIZE_SETS: dict[str, tuple[tuple[int, int], ...]] = {"train": TRAIN_SIZES, "large": LARGE_SIZES}
OURS: tuple[str, ...] = ("mapper", "attention")
GENERATE_CHECKS = 4
"""Samples of the first seed whose answer token is checked against ``generate()``."""

METHOD_LABELS: dict[str, str] = {
    "none": "no pruning",
    "oracle": "oracle labels (upper bound)",
    "mapper": "mapper (ours)",
    "attention": "layer-0 attention (ours, training-free)",
    "fastv": "FastV-like (K=2, in-LLM)",
    "dart": "DART-like (duplication)",
    "divprune": "DivPrune-like (diversity)",
    "random": "random",
    "uniform": "uniform grid",
}


def eval_samples(seed: int, n_per_size: int, sizes: Sequence[tuple[int, int]]) -> list[Sample]:
    """The evaluation subset of ``seed``: ``make_sample("test", i, seed, size)`` for every size
    and ``n_per_size`` indices per size. A test-split size uses the indices
    :func:`~tokenprune_kernels.grounded.scenes.eval_indices` gives it (``k * n_per_size + j``
    for the ``k``-th size of the split); any other valid size (tests, tiny images) uses
    ``k = n_split_sizes + its place in sizes``."""
    if isinstance(n_per_size, bool) or not isinstance(n_per_size, int) or n_per_size < 1:
        raise ValueError(f"n_per_size must be an int >= 1, got {n_per_size!r}")
    sizes = check_sizes(sizes)
    if not sizes:
        raise ValueError("sizes must hold at least one (height, width)")
    split_sizes = list(SPLIT_SIZES["test"])
    out = []
    for place, size in enumerate(sizes):
        k = split_sizes.index(size) if size in split_sizes else len(split_sizes) + place
        out += [make_sample("test", k * n_per_size + j, seed, size) for j in range(n_per_size)]
    return out


def _check_args(methods: Sequence[str], ratios: Sequence[float], seeds: Sequence[int]) -> None:
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {METHODS}, got {list(methods)}")
    if "none" not in methods:
        raise ValueError("methods must include 'none' (the unpruned reference)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"ratios must be in (0, 1], got {r!r}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints >= 0, got {list(seeds)}")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_eval(
    model: nn.Module,
    processor: Any,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seeds: Sequence[int] = (0, 1, 2),
    n_per_size: int = 10,
    sizes: Sequence[tuple[int, int]] = TRAIN_SIZES,
    mapper: TokenMapper | None = None,
    label_model: nn.Module | None = None,
    real_path: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method at every keep ratio on the evaluation subsets of every seed.

    Args:
        model: the grounded Qwen2-VL (sdpa or eager), not patched.
        processor: its processor.
        methods: names of :data:`~tokenprune_kernels.grounded.methods.METHODS` (``none``
            required; ``mapper`` needs ``mapper``; ``oracle`` needs ``label_model``).
        ratios: keep ratios in ``(0, 1]``.
        seeds: scene seeds of the test subsets (the first one is timed).
        n_per_size: samples per image size per seed.
        sizes: image sizes (height, width) of the test split.
        mapper: the trained mapper.
        label_model: the same weights with eager attention (oracle relevance labels).
        real_path: also run and time ``apply_tokenprune`` for ours and compare its kept tokens
            (on the first seed's samples).
        progress: called with a line every 20 samples.

    Returns:
        JSON-ready dict: ``accuracy[method][ratio][seed]`` (fraction), ``n[seed]``,
        ``prefill_ms[method][ratio]`` (median), ``select_llm_ms`` (the same without the shared
        vision tower + merge, ``vision_merge_ms``), ``real_prefill_ms``, ``real_path_mismatches``,
        ``generate_agreement``, ``visual_tokens`` (min, max), per-seed ``relative`` accuracy,
        ``predictions[method][ratio][seed]`` (the answer token of every sample, in order).
    """
    _check_args(methods, ratios, seeds)
    if "mapper" in methods and mapper is None:
        raise ValueError("method 'mapper' needs mapper (a TokenMapper)")
    if "oracle" in methods and label_model is None:
        raise ValueError("method 'oracle' needs label_model (eager attention)")
    from tokenprune_kernels.transformers import apply_tokenprune, last_pruned, revert_tokenprune

    say = progress or (lambda line: None)
    ratios = [float(r) for r in ratios]
    correct: dict[str, dict[float, dict[int, int]]] = {
        m: {r: defaultdict(int) for r in ratios} for m in methods
    }
    n_seen: dict[int, int] = defaultdict(int)
    preds: dict[str, dict[float, dict[int, list[int]]]] = {
        m: {r: defaultdict(list) for r in ratios} for m in methods
    }
    times: dict[str, dict[float, list[float]]] = {m: {r: [] for r in ratios} for m in methods}
    llm_times: dict[str, dict[float, list[float]]] = {m: {r: [] for r in ratios} for m in methods}
    common_times: list[float] = []
    real_times: dict[str, dict[float, list[float]]] = {
        m: {r: [] for r in ratios} for m in ("none", *OURS) if m in methods
    }
    mismatches: dict[str, int] = {m: 0 for m in OURS if m in methods}
    gen_checks: list[bool] = []
    n_vis: list[int] = []
    t_start = time.perf_counter()
    for s_i, seed in enumerate(seeds):
        samples = eval_samples(seed, n_per_size, sizes)
        for j, sample in enumerate(samples):
            timed = s_i == 0
            inputs = build_inputs(processor, [sample.image], [sample.question.text])
            target = TOKEN_ID[sample.question.answer]
            prep, t_common = _timed(lambda inputs=inputs: prepare(model, inputs))
            n_vis.append(prep.n_visual)
            if timed:
                common_times.append(t_common)
            full, t_full = _timed(lambda prep=prep: pruned_logits(model, prep))
            ok_full = answer_token(full) == target
            n_seen[seed] += 1
            if timed and j < GENERATE_CHECKS:
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
                gen_checks.append(int(out[0, -1]) == answer_token(full))
            label = None
            if "oracle" in methods:
                from tokenprune_kernels.grounded.labels_pipeline import relevance_label

                label = relevance_label(label_model, inputs, sample.question.answer)
            for r in ratios:
                keep = keep_count(prep.n_visual, r)
                for m in methods:
                    if m == "none" or keep == prep.n_visual:
                        correct[m][r][seed] += ok_full
                        preds[m][r][seed].append(answer_token(full))
                        if timed:
                            times[m][r].append(t_common + t_full)
                            llm_times[m][r].append(t_full)
                        continue
                    if m == "fastv":
                        (logits, _), dt = _timed(
                            lambda prep=prep, keep=keep: fastv_logits(model, prep, keep)
                        )
                    else:
                        rs = seed * 1_000_003 + sample.index

                        def run(m=m, prep=prep, r=r, label=label, rs=rs) -> Any:
                            kept = select(m, model, prep, r, mapper=mapper, label=label, seed=rs)
                            return pruned_logits(model, prep, kept), kept

                        (logits, kept), dt = _timed(run)
                    correct[m][r][seed] += answer_token(logits) == target
                    preds[m][r][seed].append(answer_token(logits))
                    if timed:
                        times[m][r].append(t_common + dt)
                        llm_times[m][r].append(dt)
                    if real_path and timed and m in OURS:
                        use = mapper if m == "mapper" else None
                        apply_tokenprune(model, keep_ratio=r, mapper=use)
                        try:
                            with torch.no_grad():
                                _, dt_real = _timed(
                                    lambda inputs=inputs: model(**inputs, use_cache=False)
                                )
                            pruned = last_pruned(model)
                        finally:
                            revert_tokenprune(model)
                        real_kept = torch.sort(pruned.kept_visual[0]).values
                        if not torch.equal(real_kept, kept):
                            mismatches[m] += 1
                        if timed:
                            real_times[m][r].append(dt_real)
            if real_path and timed and "none" in real_times:
                with torch.no_grad():
                    _, dt_real = _timed(lambda inputs=inputs: model(**inputs, use_cache=False))
                for r in ratios:
                    real_times["none"][r].append(dt_real)
            if (j + 1) % 20 == 0:
                say(
                    f"seed {seed}: {j + 1}/{len(samples)} samples, "
                    f"{time.perf_counter() - t_start:.0f} s"
                )
    acc = {
        m: {str(r): {str(s): correct[m][r][s] / n_seen[s] for s in seeds} for r in ratios}
        for m in methods
    }
    rel = {
        m: {
            str(r): {
                str(s): (acc[m][str(r)][str(s)] / acc["none"][str(r)][str(s)])
                if acc["none"][str(r)][str(s)] > 0
                else None
                for s in seeds
            }
            for r in ratios
        }
        for m in methods
    }
    med = {
        m: {str(r): 1e3 * statistics.median(v) if v else None for r, v in d.items()}
        for m, d in times.items()
    }
    llm_med = {
        m: {str(r): 1e3 * statistics.median(v) if v else None for r, v in d.items()}
        for m, d in llm_times.items()
    }
    real_med = {
        m: {str(r): 1e3 * statistics.median(v) if v else None for r, v in d.items()}
        for m, d in real_times.items()
    }
    return {
        "methods": list(methods),
        "ratios": ratios,
        "seeds": list(seeds),
        "sizes": [list(s) for s in sizes],
        "n_per_size": n_per_size,
        "n": {str(s): n_seen[s] for s in seeds},
        "visual_tokens": [min(n_vis), max(n_vis)],
        "accuracy": acc,
        "relative": rel,
        "predictions": {
            m: {str(r): {str(s): list(preds[m][r][s]) for s in seeds} for r in ratios}
            for m in methods
        },
        "prefill_ms": med,
        "select_llm_ms": llm_med,
        "vision_merge_ms": 1e3 * statistics.median(common_times) if common_times else None,
        "real_prefill_ms": real_med,
        "real_path_mismatches": mismatches,
        "generate_agreement": [sum(gen_checks), len(gen_checks)],
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), min(vals), max(vals)


def _cell(values: Sequence[float | None]) -> str:
    st = _stats(values)
    if st is None:
        return "-"
    mean, lo, hi = st
    return f"{100 * mean:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets checked on ``results``: ours keeps >= 98% of the unpruned accuracy at
    50% and >= 93% at 25%, and beats FastV, random and uniform at 25% by more than the seed
    spread (difference of the means > the larger min-max range of the two methods)."""
    lines = []
    acc, rel = results["accuracy"], results["relative"]
    for ours in [m for m in OURS if m in acc]:
        for r, goal in (("0.5", 0.98), ("0.25", 0.93)):
            if r not in rel[ours]:
                continue
            st = _stats(list(rel[ours][r].values()))
            if st is None:
                continue
            verdict = "MET" if st[0] >= goal else "NOT MET"
            lines.append(
                f"- {ours} at {float(r):.0%} keeps {100 * st[0]:.1f}% of unpruned accuracy "
                f"(seeds {100 * st[1]:.1f}-{100 * st[2]:.1f}%); target >= {goal:.0%}: {verdict}"
            )
        r = "0.25"
        if r not in acc[ours]:
            continue
        mine = list(acc[ours][r].values())
        for other in ("fastv", "random", "uniform"):
            if other not in acc:
                continue
            theirs = list(acc[other][r].values())
            d = statistics.fmean(mine) - statistics.fmean(theirs)
            spread = max(max(mine) - min(mine), max(theirs) - min(theirs))
            paired = min(a - b for a, b in zip(mine, theirs, strict=True))
            verdict = "MET" if d > spread else "NOT MET"
            lines.append(
                f"- {ours} vs {other} at 25%: {100 * d:+.1f} points (mean), seed spread "
                f"{100 * spread:.1f}, smallest per-seed difference {100 * paired:+.1f}: {verdict}"
            )
    return lines


def chance_accuracy() -> float:
    """Accuracy of a uniform guess among each question type's answers, the types equally
    frequent (as in the evaluation subsets)."""
    return statistics.fmean(1.0 / len(ANSWERS_BY_TYPE[t]) for t in QUESTION_TYPES)


def format_report(results: dict[str, Any], header: dict[str, str], command: str) -> str:
    """The Markdown report of :func:`run_eval`'s results."""
    ratios = [str(r) for r in results["ratios"]]
    methods = results["methods"]
    n = results["n"]
    lines = [f"# Grounded-VQA pruning evaluation ({header.get('title', '')})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "title"]
    lines += [
        f"- command: `{command}`",
        f"- test split, sizes {results['sizes']} ({results['visual_tokens'][0]}-"
        f"{results['visual_tokens'][1]} visual tokens), {results['n_per_size']} samples per "
        f"size per seed; seeds {results['seeds']} (samples per seed: {n})",
        "- accuracy: exact match of the answer token (argmax over the full vocabulary of the "
        "prefill logits at the last position); agrees with generate()'s first token on "
        f"{results['generate_agreement'][0]}/{results['generate_agreement'][1]} checked samples",
        f"- chance level (a uniform guess among each question type's answers, types balanced): "
        f"{100 * chance_accuracy():.1f}%",
        f"- torch threads: {results['threads']}; wall time {results['wall_s']} s",
        "",
        "## Accuracy (%): mean over seeds (min-max)",
        "",
    ]

    def table(cell: Callable[[str, str], str]) -> list[str]:
        """A method x keep-ratio table, ``cell(method, ratio)`` in each cell."""
        rows = [
            f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cell(m, r) for r in ratios) + " |"
            for m in methods
        ]
        head = "| method | " + " | ".join(f"keep {float(r):.1%}" for r in ratios) + " |"
        return [head, "|---|" + "---|" * len(ratios), *rows]

    lines += table(lambda m, r: _cell(list(results["accuracy"][m][r].values())))
    lines += [
        "",
        "## Accuracy relative to no pruning (%): mean over seeds of the per-seed ratio (min-max)",
        "",
        *table(lambda m, r: _cell(list(results["relative"][m][r].values()))),
        "",
        "## Prefill time (ms, median over the first seed's samples, one prompt)",
        "",
        "Harness path: vision tower + merge + M-RoPE ids + selection + language model on the kept "
        "tokens (oracle: label computation not counted). Real path: `model(**inputs)` unpatched, "
        "or patched with `apply_tokenprune(model, keep_ratio, mapper=...)`.",
        "",
        *table(lambda m, r: _ms(results["prefill_ms"][m][r])),
    ]
    for m, d in results["real_prefill_ms"].items():
        cells = [_ms(d[r]) for r in ratios]
        lines.append(f"| real path: {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Selection + language model only (the shared vision tower + merge + M-RoPE ids take "
        f"{_ms(results['vision_merge_ms'])} ms, median):",
        "",
        *table(lambda m, r: _ms(results["select_llm_ms"][m][r])),
    ]
    mm = results["real_path_mismatches"]
    if mm:
        lines += [
            "",
            "Real path vs harness selection: samples whose kept tokens differ: "
            + ", ".join(f"{k} {v}" for k, v in mm.items()),
        ]
    t = targets(results)
    if t:
        lines += ["", "## Targets (issue 6)", "", *t]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str | Path, title: str = "") -> bool:
    """Accuracy vs keep ratio (log-2 x axis), min-max over seeds as error bars, to ``path``
    (PNG). Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = results["ratios"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in results["methods"]:
        stats = [_stats(list(results["accuracy"][m][str(r)].values())) for r in ratios]
        mean = [100 * s[0] for s in stats]
        err = [[100 * (s[0] - s[1]) for s in stats], [100 * (s[2] - s[0]) for s in stats]]
        style = "-" if m in OURS else ("--" if m in ("none", "oracle") else ":")
        ax.errorbar(
            [100 * r for r in ratios], mean, yerr=err, label=METHOD_LABELS.get(m, m),
            linestyle=style, marker="o", capsize=3, linewidth=2 if m in OURS else 1.2,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks([100 * r for r in ratios], [f"{100 * r:g}%" for r in ratios])
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "grounded VQA: accuracy vs keep ratio")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def set_text_eager(model: nn.Module) -> nn.Module:
    """Switch the LANGUAGE model of a Qwen2-VL to eager attention (what relevance labels need)
    and leave the vision tower on its own implementation (sdpa: ~4x faster at 2304 tokens
    here). Returns ``model``."""
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"
    return model


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model-dir", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--mapper", type=Path, help="mapper .safetensors (default: the shipped mapper)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-per-size", type=int, default=10, help="samples per image size per seed")
    p.add_argument("--sizes", choices=sorted(SIZE_SETS), default="train")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timing)")
    p.add_argument("--no-real-path", action="store_true", help="skip the apply_tokenprune runs")
    p.add_argument(
        "--out", type=Path, required=True, help="output prefix: writes .json, .md and .png"
    )
    return p


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``tokenprune`` subcommands; its handler is :func:`cmd_eval`."""
    p = subparsers.add_parser(
        "eval",
        help="accuracy vs keep ratio of every pruning method on the grounded-VQA test split",
        description=__doc__.split("\n\n")[0],
    )
    _configure(p)
    p.set_defaults(func=cmd_eval)
    return p


def cli_error(message: str) -> int:
    """Print ``error: message`` to stderr; return exit status 2 (the grounded commands'
    bad-argument exit)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def cmd_eval(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the evaluation of ``args`` (see :func:`add_eval_parser`) and write the outputs."""
    from tokenprune_kernels.bench import environment
    from tokenprune_kernels.grounded.model import ASSETS_DIR, MODEL_DIR, load_model_dir
    from tokenprune_kernels.mapper import load_mapper

    if args.threads < 1:
        return cli_error(f"--threads must be >= 1, got {args.threads}")
    if args.n_per_size < 1:
        return cli_error(f"--n-per-size must be >= 1, got {args.n_per_size}")
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or MODEL_DIR
    if not (Path(model_dir) / "config.json").is_file():
        return cli_error(f"--model-dir '{model_dir}' holds no model (config.json)")
    methods = list(dict.fromkeys(["none", *args.methods]))
    mapper = None
    if "mapper" in methods:
        mpath = args.mapper or ASSETS_DIR / "mapper.safetensors"
        if not Path(mpath).is_file():
            return cli_error(f"--mapper '{mpath}' not found (or leave 'mapper' out of --methods)")
        mapper = load_mapper(mpath)
    model, processor = load_model_dir(model_dir)
    label_model = None
    if "oracle" in methods:
        label_model, _ = load_model_dir(model_dir)
        set_text_eager(label_model)
    try:
        results = run_eval(
            model, processor, methods=methods, ratios=args.ratios, seeds=args.seeds,
            n_per_size=args.n_per_size, sizes=SIZE_SETS[args.sizes], mapper=mapper,
            label_model=label_model, real_path=not args.no_real_path,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ValueError as err:
        return cli_error(str(err))
    import transformers

    header = {"title": f"{args.sizes} sizes", **environment("cpu")}
    header["transformers"] = transformers.__version__
    header["model"] = str(Path(model_dir).resolve())
    header["model_sha256"] = _file_sha256(Path(model_dir) / "model.safetensors")
    if mapper is not None:
        mfile = Path(args.mapper or ASSETS_DIR / "mapper.safetensors")
        header["mapper"] = str(mfile)
        header["mapper_sha256"] = _file_sha256(mfile)
    # the words after the program name: from the caller, else cli.main's parsed argv, else sys
    rest = list(argv if argv is not None else getattr(args, "argv", None) or sys.argv[1:])
    command = "tokenprune " + shlex.join(rest)
    results["header"] = header
    results["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = dict(results)
    preds = saved.pop("predictions")
    saved["predictions_sha256"] = hashlib.sha256(
        json.dumps(preds, sort_keys=True).encode()
    ).hexdigest()
    out.with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n")
    report = format_report(results, header, command)
    out.with_suffix(".md").write_text(report)
    if not plot(results, out.with_suffix(".png"), f"grounded VQA, {args.sizes} sizes"):
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
    print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenprune_kernels.grounded.evaluate ...`` (same options as ``tokenprune
    eval``)."""
    from tokenprune_kernels.cli import run_subcommand

    return run_subcommand("eval", argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_RATIOS",
    "METHOD_LABELS",
    "SIZE_SETS",
    "add_eval_parser",
    "chance_accuracy",
    "cli_error",
    "cmd_eval",
    "eval_samples",
    "format_report",
    "main",
    "plot",
    "run_eval",
    "set_text_eager",
    "targets",
]
