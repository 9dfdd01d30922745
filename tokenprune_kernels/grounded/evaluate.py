"""``tokenprune eval``: accuracy, LLM prefill FLOPs and paired statistics of every pruning method
on ONE fixed grounded-VQA test set, a Markdown report and a matplotlib PNG.

    tokenprune eval --threads 1 --out benchmarks/results/grounded_eval
    tokenprune eval --quick --out /tmp/g                      # CI-sized: 2 scenes per size
    tokenprune eval --shard 0/2 --out /tmp/s0 & tokenprune eval --shard 1/2 --out /tmp/s1
    tokenprune eval --merge /tmp/s0.json /tmp/s1.json --out benchmarks/results/grounded_eval

Test set: ``make_sample("test", i, seed, size)`` for the ``(i, size)`` of
:func:`~tokenprune_kernels.grounded.scenes.eval_indices` restricted to the chosen sizes
(``train``: 196 - 576 visual tokens; ``large``: 1024 - 2304), ``--n-per-size`` scenes per size
(default 167: 1503 scenes on the 9 training sizes) from ONE seed (default 0); scene ``i`` asks a
question of type ``i mod T`` of ``--question-types`` (default the five default types; the opt-in
``count_small`` / ``read_glyph`` need a model whose tokenizer knows their words). Every method
scores the SAME questions, so methods are compared pairwise per question: exact McNemar test on the
discordant pairs and a paired bootstrap 95% interval of the accuracy difference
(:mod:`~tokenprune_kernels.grounded.stats`). Accuracy carries a Wilson 95% interval; accuracy
relative to unpruned a paired bootstrap interval.

Accuracy: exact match of the answer token - the argmax over the FULL vocabulary of the prefill
logits at the last prompt position (the first token ``generate()`` emits, checked against
``generate()`` on the first samples). Methods: :mod:`tokenprune_kernels.grounded.methods`; at keep
ratio 1 every method keeps every token (the unpruned run).

FLOPs (:mod:`~tokenprune_kernels.grounded.flops`): per sample, the decoder FLOPs of the method's
prefill plus its selection overhead, relative to the unpruned prefill of that sample; tables give
the mean over the test set. Equal compute: for every keep ratio, each in-LLM method (``fastv``,
``fastv1``) is also run per sample at the largest keep count whose total FLOPs do not exceed the
mapper's at that ratio (``fastv_eq``, ``fastv1_eq``); when even one kept token costs more, the
budget is unreachable for that sample and no number is invented; on those samples the method
is also run at its minimum (one kept token, more FLOPs than the mapper's), so that "given at
least the mapper's compute" (``*_eq`` where reachable, the minimum elsewhere) compares on every
sample, conservatively in the in-LLM method's favour. Mapper v2 (``mapper_spread``:
the mapper's scores under the spread rule) keeps the same count with the same scoring, so its
FLOPs equal the mapper's and these runs are its equal-compute comparison as well (the spread rule
is integer neighbour checks, counted as 0 FLOPs). The report's "Targets" section checks issue 21's
targets for mapper v2 with these numbers.

Adaptive mapper: per sample the smallest set of tokens whose predicted relevance mass (softmax of
the mapper logits) reaches a threshold, clamped to ``--adaptive-min`` / ``--adaptive-max`` keep
ratios (:func:`adaptive_counts`), for each of ``--thresholds``.

Prefill time: on the first ``--time-samples`` samples, wall time from processor inputs to the last
position's logits (vision tower + merge + M-RoPE ids + selection + language model on the kept
tokens; oracle labels not counted), median, ``torch.set_num_threads(--threads)``. On the same
samples ours (``mapper``, ``attention`` and their spread versions) also run the REAL path,
``apply_tokenprune(model, keep_ratio, mapper=..., spread_radius=...)`` and ``model(**inputs)``,
whose kept tokens are compared with the harness's (mismatches are reported).

Outputs: ``<out>.json`` (every summary number, the per-question outcomes as 0/1 strings and the
predictions' SHA-256), ``<out>.md``, ``<out>.png`` (accuracy vs keep ratio and vs relative FLOPs,
Wilson 95% bars); the in-LLM methods' labels give ``K`` of the model's own decoder-layer
count. ``--shard I/N`` runs samples ``I, I+N, ...`` and writes only the raw
``<out>.json``; ``--merge`` joins such shards and writes the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
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

import tokenprune_kernels as tp
from tokenprune_kernels.grounded import stats as S
from tokenprune_kernels.grounded.flops import (
    LMShape,
    fastv_flops,
    fastv_keep_for_budget,
    fastv_scoring_flops,
    layer0_rows_flops,
    mapper_flops,
    prefill_flops,
)
from tokenprune_kernels.grounded.methods import (
    DART_PIVOTS,
    FASTV_LAYERS,
    LLM_METHODS,
    METHODS,
    SPREAD_METHODS,
    SPREAD_RADIUS,
    answer_token,
    fastv_logits,
    keep_count,
    prepare,
    pruned_logits,
    select,
    select_layer0,
    select_scores,
    select_spread,
)
from tokenprune_kernels.grounded.model import TOKEN_ID, build_inputs
from tokenprune_kernels.grounded.scenes import (
    ALL_QUESTION_TYPES,
    ANSWERS_BY_TYPE,
    EXTRA_QUESTION_TYPES,
    LARGE_SIZES,
    QUESTION_TYPES,
    SPLIT_SIZES,
    TRAIN_SIZES,
    Sample,
    check_question_types,
    check_sizes,
    make_sample,
)
from tokenprune_kernels.mapper import TokenMapper

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
DEFAULT_METHODS: tuple[str, ...] = (
    "none",
    "oracle",
    "mapper",
    "attention",
    "mapper_spread",
    "attention_spread",
    "fastv",
    "fastv1",
    "dart",
    "divprune",
    "random",
    "uniform",
)
DEFAULT_N_PER_SIZE = 167
"""Scenes per image size of the fixed test set (9 training sizes: 1503 scenes)."""
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
"""Relevance-mass thresholds of the adaptive mapper."""
DEFAULT_ADAPTIVE_BOUNDS: tuple[float, float] = (1 / 32, 1 / 2)
"""(min, max) keep ratio of the adaptive mapper."""
SIZE_SETS: dict[str, tuple[tuple[int, int], ...]] = {"train": TRAIN_SIZES, "large": LARGE_SIZES}
OURS: tuple[str, ...] = ("mapper", "attention", "mapper_spread", "attention_spread")
"""Our methods: layer-0 attention scores (with or without the mapper, plain or spread top-k)."""
SCORE_SOURCE: dict[str, str] = {"mapper": "mapper", "attention": "attention", **SPREAD_METHODS}
"""The scores each of ours selects from (``mapper``: the mapper's logits, ``attention``: raw
layer-0 attention), computed once per sample."""
REAL_PATH: tuple[str, ...] = OURS
"""Ours that also run the real path (``apply_tokenprune``, with ``spread_radius`` for the spread
methods) on the timed samples."""
EQ_BASES: tuple[str, ...] = ("mapper", "mapper_spread")
"""Methods whose FLOPs set the equal-compute budget: the first of these in the method list (both
spend exactly the same FLOPs at a keep ratio: same keep count, same scoring; the spread rule adds
only integer neighbour checks, counted as 0)."""
EQ_SUFFIX = "_eq"
"""Key suffix of an in-LLM method run at the mapper's FLOPs (equal compute)."""
PAIRS: tuple[tuple[str, str], ...] = (
    ("mapper_spread", "attention"),
    ("mapper_spread", "divprune"),
    ("mapper_spread", "mapper"),
    ("mapper_spread", "fastv"),
    ("mapper_spread", "fastv_eq"),
    ("mapper_spread", "fastv1"),
    ("mapper_spread", "fastv1_eq"),
    ("mapper_spread", "oracle"),
    ("mapper_spread", "attention_spread"),
    ("attention_spread", "attention"),
    ("mapper", "attention"),
    ("mapper", "divprune"),
    ("mapper", "fastv"),
    ("mapper", "fastv_eq"),
    ("mapper", "fastv1"),
    ("mapper", "fastv1_eq"),
    ("mapper", "oracle"),
)
"""Method pairs compared question by question."""
GENERATE_CHECKS = 4
"""Timed samples whose answer token is checked against ``generate()``."""
N_BOOT = 2000
"""Paired bootstrap draws."""

METHOD_LABELS: dict[str, str] = {
    "none": "no pruning",
    "oracle": "oracle labels (upper bound)",
    "mapper": "mapper (ours)",
    "attention": "layer-0 attention (ours, training-free)",
    "mapper_spread": f"mapper v2: mapper + spread r={SPREAD_RADIUS} (ours)",
    "attention_spread": f"layer-0 attention + spread r={SPREAD_RADIUS} (ours, training-free)",
    "fastv": "FastV-like (K=2, in-LLM)",
    "fastv1": "FastV-like (K=1, in-LLM)",
    "fastv_eq": "FastV-like K=2 at the mapper's FLOPs",
    "fastv1_eq": "FastV-like K=1 at the mapper's FLOPs",
    "dart": "DART-like (duplication)",
    "divprune": "DivPrune-like (diversity)",
    "random": "random",
    "uniform": "uniform grid",
}
"""Report labels; the in-LLM methods' labels name the model's depth where it is known
(:func:`method_label`)."""


def method_label(key: str, layers: int | None = None) -> str:
    """The report label of a run key; for an in-LLM method (or its equal-compute run) with the
    language model's decoder layer count ``layers``, ``K`` is given as ``K of L layers``."""
    base = key[: -len(EQ_SUFFIX)] if key.endswith(EQ_SUFFIX) else key
    if layers is None or base not in FASTV_LAYERS:
        return METHOD_LABELS.get(key, key)
    k = FASTV_LAYERS[base]
    if key == base:
        return f"FastV-like (K={k} of {layers} layers, in-LLM)"
    return f"FastV-like K={k} of {layers} layers at the mapper's FLOPs"


def adaptive_counts(
    logits: torch.Tensor, threshold: float, min_ratio: float, max_ratio: float
) -> torch.Tensor:
    """Per-sample keep counts of the adaptive budget: the smallest ``k`` whose ``k`` largest
    softmax probabilities of the mapper ``logits`` sum to at least ``threshold``, clamped to
    ``[keep_count(n, min_ratio), keep_count(n, max_ratio)]`` - the op
    :func:`tokenprune_kernels.mass_keep_counts` (what ``select_topk(keep_mass=...)`` keeps).

    Args:
        logits: ``[N]`` or ``[B, N]`` float mapper logits of one sample / equal-length samples.
        threshold: relevance mass in ``(0, 1]``.
        min_ratio, max_ratio: keep-ratio bounds, ``0 < min_ratio <= max_ratio <= 1``.

    Returns:
        ``[B]`` int64 counts (``[1]`` for a 1-D input).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2) or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a [N] or [B, N] tensor with N >= 1, got {logits!r:.60}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not 0.0 < min_ratio <= max_ratio <= 1.0:
        raise ValueError(
            f"need 0 < min_ratio <= max_ratio <= 1, got min_ratio={min_ratio!r}, "
            f"max_ratio={max_ratio!r}"
        )
    x = logits.reshape(-1, logits.shape[-1]).float()
    b, n = x.shape
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int64, device=x.device)
    return tp.mass_keep_counts(x.reshape(-1), cu, threshold, min_ratio, max_ratio, "softmax")


def eval_samples(
    seed: int,
    n_per_size: int,
    sizes: Sequence[tuple[int, int]],
    qtypes: Sequence[str] = QUESTION_TYPES,
) -> list[Sample]:
    """The fixed test set of ``seed``: ``make_sample("test", i, seed, size, qtypes=qtypes)`` for
    every size and ``n_per_size`` indices per size (question type ``qtypes[i % len(qtypes)]``;
    the default is the five default types, opt-in types such as ``count_small`` and
    ``read_glyph`` only when named). A test-split size uses the indices
    :func:`~tokenprune_kernels.grounded.scenes.eval_indices` gives it (``k * n_per_size + j``
    for the ``k``-th size of the split); any other valid size (tests, tiny images) uses
    ``k = n_split_sizes + its place in sizes``."""
    if isinstance(n_per_size, bool) or not isinstance(n_per_size, int) or n_per_size < 1:
        raise ValueError(f"n_per_size must be an int >= 1, got {n_per_size!r}")
    sizes = check_sizes(sizes)
    if not sizes:
        raise ValueError("sizes must hold at least one (height, width)")
    qtypes = tuple(check_question_types(qtypes))
    split_sizes = list(SPLIT_SIZES["test"])
    out = []
    for place, size in enumerate(sizes):
        k = split_sizes.index(size) if size in split_sizes else len(split_sizes) + place
        out += [
            make_sample("test", k * n_per_size + j, seed, size, qtypes=qtypes)
            for j in range(n_per_size)
        ]
    return out


def _check_args(methods: Sequence[str], ratios: Sequence[float], thresholds: Sequence[float],
                bounds: Sequence[float]) -> None:  # fmt: skip
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {METHODS}, got {list(methods)}")
    if "none" not in methods:
        raise ValueError("methods must include 'none' (the unpruned reference)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"ratios must be in (0, 1], got {r!r}")
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"thresholds must be in (0, 1], got {t!r}")
    if thresholds and "mapper" not in methods:
        raise ValueError("thresholds (the adaptive mapper) need 'mapper' in methods")
    if len(bounds) != 2 or not 0.0 < bounds[0] <= bounds[1] <= 1.0:
        raise ValueError(
            f"adaptive_bounds must be (min, max) with 0 < min <= max <= 1, got {bounds}"
        )


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def eq_base(methods: Sequence[str]) -> str | None:
    """The method whose FLOPs the equal-compute runs match: ``mapper``, else ``mapper_spread``
    (the same FLOPs), else None (:data:`EQ_BASES`)."""
    return next((m for m in EQ_BASES if m in methods), None)


def eq_keys(methods: Sequence[str]) -> list[str]:
    """The equal-compute runs of ``methods``: ``<in-LLM method>_eq`` when the mapper (or mapper
    v2, whose FLOPs are the mapper's) is there."""
    if eq_base(methods) is None:
        return []
    return [m + EQ_SUFFIX for m in methods if m in LLM_METHODS]


def selection_flops(
    method: str,
    shape: LMShape,
    n: int,
    n_visual: int,
    instruction_positions: Sequence[int],
    mapper: TokenMapper | None = None,
) -> int:
    """FLOPs a method spends choosing tokens (see :mod:`~tokenprune_kernels.grounded.flops`):
    ours the layer-0 instruction rows (+ the mapper), in-LLM methods their layer-``K`` ranking,
    DivPrune-like its Gram matrix, DART-like its pivot similarities; the others 0 (the oracle's
    labels are not counted). The spread methods spend what their score source spends: the
    spread rule itself is at most ``(2r + 1)^2 - 1`` integer neighbour checks per visual token
    (8 at radius 1) and no floating-point work, counted as 0."""
    if method in OURS:
        rows = layer0_rows_flops(shape, instruction_positions)
        if SCORE_SOURCE[method] == "mapper":
            if mapper is None:
                raise ValueError(f"method {method!r} needs mapper (a TokenMapper)")
            cfg = mapper.config
            rows += mapper_flops(cfg.channels, cfg.kernel_size, n_visual, cfg.in_channels)
        return rows
    if method in LLM_METHODS:
        return fastv_scoring_flops(shape, n)
    if method == "divprune":
        return 2 * n_visual * n_visual * shape.hidden
    if method == "dart":
        return 2 * n_visual * min(DART_PIVOTS, n_visual) * shape.hidden
    return 0


def _instruction_positions(model: nn.Module, prep: Any) -> list[int]:
    from tokenprune_kernels.transformers import default_instruction_mask_for

    base = getattr(model, "model", model)
    ids = prep.inputs["input_ids"].to(prep.embeds.device)
    mask = default_instruction_mask_for(base, ids, prep.visual_mask)
    return mask[0].nonzero().flatten().tolist()


def run_eval(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    mapper: TokenMapper | None = None,
    label_model: nn.Module | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    adaptive_bounds: Sequence[float] = DEFAULT_ADAPTIVE_BOUNDS,
    time_samples: int = 27,
    real_path: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method at every keep ratio on ``samples`` (one prompt each) and record the
    per-question outcomes; :func:`summarize` turns them into statistics.

    Args:
        model: the grounded Qwen2-VL (sdpa or eager), not patched.
        processor: its processor.
        samples: the test set (:func:`eval_samples`), in order.
        methods: names of :data:`~tokenprune_kernels.grounded.methods.METHODS` (``none``
            required; ``mapper`` and ``mapper_spread`` need ``mapper``; ``oracle`` needs
            ``label_model``). With the mapper (or mapper v2) present every in-LLM method also
            runs at equal compute (:func:`eq_keys`).
        ratios: keep ratios in ``(0, 1]``.
        mapper: the trained mapper.
        label_model: the same weights with eager attention (oracle relevance labels).
        thresholds: relevance-mass thresholds of the adaptive mapper (empty: none).
        adaptive_bounds: its ``(min, max)`` keep ratios.
        time_samples: the first this many samples are timed (and run the real path).
        real_path: on the timed samples, also run ``apply_tokenprune`` for each of ours
            (:data:`REAL_PATH`) and compare.
        progress: called with a line every 50 samples.

    Returns:
        JSON-ready raw record: per run key (methods, equal-compute keys) and ratio ``pred``
        (answer token per sample), ``keep`` (visual tokens kept; None: unreachable budget),
        ``flops`` and ``overhead`` (relative to the sample's unpruned prefill); ``adaptive``
        per threshold; ``fastv_min_flops`` per in-LLM method (one kept token); ``eq_min``
        (``pred``, ``flops`` per equal-compute key and ratio: the run at one kept token on the
        samples where the budget is unreachable, None elsewhere); ``target``,
        ``n_visual``, ``seq_len`` per sample; ``lm_layers`` (the language model's decoder
        layers); timings and path checks of the timed samples.
    """
    _check_args(methods, ratios, thresholds, adaptive_bounds)
    if not samples:
        raise ValueError("samples must hold at least one Sample")
    for m in ("mapper", "mapper_spread"):
        if m in methods and mapper is None:
            raise ValueError(f"method {m!r} needs mapper (a TokenMapper)")
    if "oracle" in methods and label_model is None:
        raise ValueError("method 'oracle' needs label_model (eager attention)")
    from tokenprune_kernels.transformers import apply_tokenprune, last_pruned, revert_tokenprune

    say = progress or (lambda line: None)
    ratios = [float(r) for r in ratios]
    rk = [str(r) for r in ratios]
    shape = LMShape.from_config(model.config)
    eqs = eq_keys(methods)
    budget_key = eq_base(methods)
    keys = [*methods, *eqs]
    rec: dict[str, dict[str, dict[str, list[Any]]]] = {
        f: {k: {r: [] for r in rk} for k in keys} for f in ("pred", "keep", "flops", "overhead")
    }
    adaptive = {str(t): {"pred": [], "keep": [], "flops": []} for t in thresholds}
    fastv_min = {m: [] for m in methods if m in LLM_METHODS}
    eq_min: dict[str, dict[str, dict[str, list[Any]]]] = {
        f: {k: {r: [] for r in rk} for k in eqs} for f in ("pred", "flops")
    }
    per_sample: dict[str, list[int]] = {"target": [], "n_visual": [], "seq_len": []}
    times: dict[str, dict[str, list[float]]] = {k: {r: [] for r in rk} for k in methods}
    llm_times: dict[str, dict[str, list[float]]] = {k: {r: [] for r in rk} for k in methods}
    common_times: list[float] = []
    real_times: dict[str, dict[str, list[float]]] = {
        m: {r: [] for r in rk} for m in ("none", *REAL_PATH) if m in methods
    }
    mismatches: dict[str, int] = {m: 0 for m in REAL_PATH if m in methods}
    gen_checks: list[bool] = []
    t_start = time.perf_counter()

    def put(key: str, r: str, pred: int | None, keep: int | None, flops: float | None,
            over: float | None) -> None:  # fmt: skip
        rec["pred"][key][r].append(pred)
        rec["keep"][key][r].append(keep)
        rec["flops"][key][r].append(flops)
        rec["overhead"][key][r].append(over)

    for j, sample in enumerate(samples):
        timed = j < time_samples
        inputs = build_inputs(processor, [sample.image], [sample.question.text])
        target = TOKEN_ID[sample.question.answer]
        prep, t_common = _timed(lambda inputs=inputs: prepare(model, inputs))
        n, nv = int(prep.embeds.shape[1]), prep.n_visual
        per_sample["target"].append(target)
        per_sample["n_visual"].append(nv)
        per_sample["seq_len"].append(n)
        if timed:
            common_times.append(t_common)
        full, t_full = _timed(lambda prep=prep: pruned_logits(model, prep))
        tok_full = answer_token(full)
        if timed and j < GENERATE_CHECKS:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
            gen_checks.append(int(out[0, -1]) == tok_full)
        full_flops = prefill_flops(shape, n)
        instr = _instruction_positions(model, prep)
        over = {m: selection_flops(m, shape, n, nv, instr, mapper) for m in methods}
        for m in fastv_min:
            fastv_min[m].append(fastv_flops(shape, n, nv, 1, FASTV_LAYERS[m]) / full_flops)
        # ours: score once through the inference path's code, rank per ratio
        scores: dict[str, torch.Tensor] = {}
        score_dt: dict[str, float] = {}
        for m in ("mapper", "attention"):
            if any(SCORE_SOURCE.get(x) == m for x in methods):
                use = mapper if m == "mapper" else None
                (_, scores[m]), score_dt[m] = _timed(
                    lambda use=use, prep=prep, nv=nv: select_layer0(model, prep, nv, use)
                )
        label = None
        if "oracle" in methods:
            from tokenprune_kernels.grounded.labels_pipeline import relevance_label

            label = relevance_label(label_model, inputs, sample.question.answer)
        for r_f, r in zip(ratios, rk, strict=True):
            keep = keep_count(nv, r_f)
            for m in methods:
                if m == "none" or keep == nv:
                    put(m, r, tok_full, nv, 1.0, 0.0)
                    if timed:
                        times[m][r].append(t_common + t_full)
                        llm_times[m][r].append(t_full)
                    continue
                if m in LLM_METHODS:
                    k_layer = FASTV_LAYERS[m]
                    (logits, kept), dt = _timed(
                        lambda prep=prep, keep=keep, k_layer=k_layer: fastv_logits(
                            model, prep, keep, k_layer
                        )
                    )
                    flops = prefill_flops(shape, n, nv, keep, k_layer) + over[m]
                else:
                    rs = sample.index

                    def run(
                        m=m, prep=prep, r_f=r_f, label=label, rs=rs, keep=keep, scores=scores
                    ) -> Any:
                        if m in SPREAD_METHODS:
                            kept = select_spread(prep, scores[SCORE_SOURCE[m]], keep)
                        elif m in SCORE_SOURCE:
                            kept = select_scores(prep, scores[m], keep)
                        else:
                            kept = select(m, model, prep, r_f, mapper=mapper, label=label, seed=rs)
                        return pruned_logits(model, prep, kept), kept

                    (logits, kept), dt = _timed(run)
                    dt += score_dt.get(SCORE_SOURCE.get(m, ""), 0.0)
                    flops = prefill_flops(shape, n, nv, keep) + over[m]
                put(m, r, answer_token(logits), keep, flops / full_flops, over[m] / full_flops)
                if timed:
                    times[m][r].append(t_common + dt)
                    llm_times[m][r].append(dt)
                if real_path and timed and m in REAL_PATH:
                    apply_tokenprune(
                        model,
                        keep_ratio=r_f,
                        mapper=mapper if SCORE_SOURCE[m] == "mapper" else None,
                        spread_radius=SPREAD_RADIUS if m in SPREAD_METHODS else 0,
                    )
                    try:
                        with torch.no_grad():
                            _, dt_real = _timed(
                                lambda inputs=inputs: model(**inputs, use_cache=False)
                            )
                        pruned = last_pruned(model)
                    finally:
                        revert_tokenprune(model)
                    if not torch.equal(torch.sort(pruned.kept_visual[0]).values, kept):
                        mismatches[m] += 1
                    real_times[m][r].append(dt_real)
            # equal compute: each in-LLM method at the mapper's (= mapper v2's) FLOPs
            for key in eqs:
                m = key[: -len(EQ_SUFFIX)]
                if keep == nv:
                    put(key, r, tok_full, nv, 1.0, 0.0)
                    eq_min["pred"][key][r].append(None)
                    eq_min["flops"][key][r].append(None)
                    continue
                budget = rec["flops"][budget_key][r][-1] * full_flops
                k_eq = fastv_keep_for_budget(shape, n, nv, budget, FASTV_LAYERS[m])
                if k_eq is None:
                    put(key, r, None, None, None, None)
                    logits, _ = fastv_logits(model, prep, 1, FASTV_LAYERS[m])
                    eq_min["pred"][key][r].append(answer_token(logits))
                    flops = fastv_flops(shape, n, nv, 1, FASTV_LAYERS[m])
                    eq_min["flops"][key][r].append(flops / full_flops)
                    continue
                eq_min["pred"][key][r].append(None)
                eq_min["flops"][key][r].append(None)
                logits, _ = fastv_logits(model, prep, k_eq, FASTV_LAYERS[m])
                flops = fastv_flops(shape, n, nv, k_eq, FASTV_LAYERS[m])
                put(key, r, answer_token(logits), k_eq, flops / full_flops, over[m] / full_flops)
        lo, hi = adaptive_bounds
        for t in thresholds:
            count = int(adaptive_counts(scores["mapper"], t, lo, hi)[0])
            kept = select_scores(prep, scores["mapper"], count)
            logits = pruned_logits(model, prep, kept) if count < nv else full
            flops = prefill_flops(shape, n, nv, count) + over["mapper"]
            adaptive[str(t)]["pred"].append(answer_token(logits))
            adaptive[str(t)]["keep"].append(count)
            adaptive[str(t)]["flops"].append(flops / full_flops)
        if real_path and timed and "none" in real_times:
            with torch.no_grad():
                _, dt_real = _timed(lambda inputs=inputs: model(**inputs, use_cache=False))
            for r in rk:
                real_times["none"][r].append(dt_real)
        if (j + 1) % 50 == 0:
            say(f"{j + 1}/{len(samples)} samples, {time.perf_counter() - t_start:.0f} s")
    return {
        "methods": list(methods),
        "eq_keys": eqs,
        "ratios": ratios,
        "thresholds": [float(t) for t in thresholds],
        "adaptive_bounds": [float(b) for b in adaptive_bounds],
        "lm_layers": shape.layers,
        **per_sample,
        **rec,
        "adaptive": adaptive,
        "fastv_min_flops": fastv_min,
        "eq_min": eq_min,
        "times_s": {
            "prefill": times,
            "select_llm": llm_times,
            "vision_merge": common_times,
            "real_prefill": real_times,
        },
        "real_path_mismatches": mismatches,
        "generate_agreement": [sum(gen_checks), len(gen_checks)],
        "timed_samples": min(time_samples, len(samples)),
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------

PER_SAMPLE = ("target", "n_visual", "seq_len")
RECORDS = ("pred", "keep", "flops", "overhead")
CONFIG_KEYS = (
    "methods", "eq_keys", "ratios", "thresholds", "adaptive_bounds", "test_set", "lm_layers",
)  # fmt: skip


def merge_shards(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join the raw records of ``--shard I/N`` runs (shard ``I`` holds samples ``I, I+N, ...``)
    back into test-set order. Timings come from the shards that timed samples; wall time is the
    longest shard's."""
    if not shards:
        raise ValueError("shards must hold at least one raw record")
    total = shards[0].get("shard", [0, 1])[1]
    by_id = {s.get("shard", [0, 1])[0]: s for s in shards}
    if sorted(by_id) != list(range(total)) or len(shards) != total:
        raise ValueError(f"need shards 0..{total - 1} of {total} exactly once, got {sorted(by_id)}")
    parts = [by_id[i] for i in range(total)]
    for key in CONFIG_KEYS:
        if any(p.get(key) != parts[0].get(key) for p in parts):
            raise ValueError(f"shards differ in {key!r}: not from the same run")
    sizes = [len(p["target"]) for p in parts]

    def weave(lists: Sequence[list[Any]]) -> list[Any]:
        return [lists[i % total][i // total] for i in range(sum(sizes))]

    out = dict(parts[0])
    for key in PER_SAMPLE:
        out[key] = weave([p[key] for p in parts])
    for f in RECORDS:
        out[f] = {k: {r: weave([p[f][k][r] for p in parts]) for r in d} for k, d in out[f].items()}
    out["adaptive"] = {
        t: {f: weave([p["adaptive"][t][f] for p in parts]) for f in d}
        for t, d in out["adaptive"].items()
    }
    out["fastv_min_flops"] = {
        m: weave([p["fastv_min_flops"][m] for p in parts]) for m in out["fastv_min_flops"]
    }
    if "eq_min" in parts[0]:
        out["eq_min"] = {
            f: {
                k: {r: weave([p["eq_min"][f][k][r] for p in parts]) for r in d}
                for k, d in fd.items()
            }
            for f, fd in parts[0]["eq_min"].items()
        }
    timed = [p for p in parts if p["timed_samples"] > 0] or parts[:1]
    out["times_s"] = timed[0]["times_s"]
    out["timed_samples"] = timed[0]["timed_samples"]
    out["generate_agreement"] = [sum(p["generate_agreement"][i] for p in parts) for i in (0, 1)]
    out["real_path_mismatches"] = {
        m: sum(p["real_path_mismatches"][m] for p in parts) for m in out["real_path_mismatches"]
    }
    out["wall_s"] = max(p["wall_s"] for p in parts)
    out["shard_wall_s"] = [p["wall_s"] for p in parts]
    out["shard_commands"] = [p.get("command", "") for p in parts]
    out.pop("shard", None)
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _correct(preds: Sequence[int | None], target: Sequence[int]) -> torch.Tensor | None:
    if any(p is None for p in preds):
        return None
    return torch.tensor([p == t for p, t in zip(preds, target, strict=True)], dtype=torch.bool)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if len(vals) == len(values) and vals else None


def _median_ms(values: Sequence[float]) -> float | None:
    return 1e3 * statistics.median(values) if values else None


def _acc_entry(c: torch.Tensor, ref: torch.Tensor, index: torch.Tensor) -> dict[str, Any]:
    k, n = int(c.sum()), c.numel()
    ref_acc = float(ref.double().mean())
    return {
        "acc": k / n,
        "ci": list(S.wilson_interval(k, n)),
        "rel": (k / n) / ref_acc if ref_acc > 0 else None,
        "rel_ci": S.paired_ratio_interval(c, ref, index),
    }


def _pair_entry(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> dict[str, Any]:
    bb, cc = S.discordant(a, b)
    return {
        "diff": float(a.double().mean() - b.double().mean()),
        "ci": list(S.paired_difference_interval(a, b, index)),
        "b": bb,
        "c": cc,
        "p": S.mcnemar_exact(bb, cc),
    }


def summarize(raw: dict[str, Any], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Statistics of a raw record (:func:`run_eval` or :func:`merge_shards`).

    Returns:
        JSON-ready dict: ``n``; per run key and ratio ``accuracy`` (``acc``, Wilson ``ci``,
        ``rel`` to unpruned with its paired bootstrap ``rel_ci``; None where the run was
        unreachable), ``flops`` / ``overhead`` / ``keep_ratio`` means, ``reachable`` counts,
        ``min_flops`` of the in-LLM methods; ``paired[a|b][ratio]`` (``diff``, bootstrap
        ``ci``, discordant ``b``/``c``, McNemar ``p``); ``adaptive[threshold]``; timing medians
        (ms); ``correct`` per run key and ratio as a 0/1 string (the questions in order).
    """
    target = raw["target"]
    n = len(target)
    index = S.resample_index(n, n_boot, seed)
    rk = [str(r) for r in raw["ratios"]]
    keys = [*raw["methods"], *raw["eq_keys"]]
    none = _correct(raw["pred"]["none"][rk[0]], target)
    nv = raw["n_visual"]
    out: dict[str, Any] = {"n": n, "visual_tokens": [min(nv), max(nv)]}
    out["lm_layers"] = raw.get("lm_layers")
    correct: dict[str, dict[str, torch.Tensor | None]] = {}
    for f in ("accuracy", "flops", "overhead", "keep_ratio", "reachable", "correct"):
        out[f] = {k: {} for k in keys}
    for k in keys:
        correct[k] = {}
        for r in rk:
            c = _correct(raw["pred"][k][r], target)
            correct[k][r] = c
            keeps = raw["keep"][k][r]
            out["reachable"][k][r] = sum(v is not None for v in keeps)
            out["accuracy"][k][r] = None if c is None else _acc_entry(c, none, index)
            out["flops"][k][r] = _mean(raw["flops"][k][r])
            out["overhead"][k][r] = _mean(raw["overhead"][k][r])
            out["keep_ratio"][k][r] = (
                None
                if c is None
                else statistics.fmean(a / b for a, b in zip(keeps, nv, strict=True))
            )
            out["correct"][k][r] = None if c is None else "".join("01"[int(x)] for x in c)
    out["min_flops"] = {m: statistics.fmean(v) for m, v in raw["fastv_min_flops"].items()}
    out["paired"] = {}
    for a, b in PAIRS:
        if a not in correct or b not in correct:
            continue
        out["paired"][f"{a}|{b}"] = {
            r: None
            if correct[a][r] is None or correct[b][r] is None
            else _pair_entry(correct[a][r], correct[b][r], index)
            for r in rk
        }
    # given at least the mapper's compute: *_eq where reachable, one kept token elsewhere
    out["at_least"] = {}
    out["paired_at_least"] = {}
    for k in raw["eq_keys"] if "eq_min" in raw else ():
        out["at_least"][k] = {}
        for r in rk:
            pe, pm = raw["pred"][k][r], raw["eq_min"]["pred"][k][r]
            c = _correct([a if a is not None else b for a, b in zip(pe, pm, strict=True)], target)
            fe, fm = raw["flops"][k][r], raw["eq_min"]["flops"][k][r]
            unreachable = sum(a is None for a in pe)
            if c is None or not unreachable:
                out["at_least"][k][r] = None
                continue
            entry = _acc_entry(c, none, index)
            entry["flops"] = statistics.fmean(
                a if a is not None else b for a, b in zip(fe, fm, strict=True)
            )
            entry["unreachable"] = unreachable
            out["at_least"][k][r] = entry
            for a, b in PAIRS:
                if b == k and a in correct and correct[a][r] is not None:
                    d = out["paired_at_least"].setdefault(f"{a}|{b}", {})
                    d[r] = _pair_entry(correct[a][r], c, index)
    out["adaptive"] = {}
    for t, d in raw["adaptive"].items():
        c = _correct(d["pred"], target)
        entry = _acc_entry(c, none, index)
        entry["tokens"] = statistics.fmean(d["keep"])
        entry["keep_ratio"] = statistics.fmean(a / b for a, b in zip(d["keep"], nv, strict=True))
        entry["flops"] = statistics.fmean(d["flops"])
        entry["correct"] = "".join("01"[int(x)] for x in c)
        out["adaptive"][t] = entry
    ts = raw["times_s"]
    out["prefill_ms"] = {
        m: {r: _median_ms(v) for r, v in d.items()} for m, d in ts["prefill"].items()
    }
    out["select_llm_ms"] = {
        m: {r: _median_ms(v) for r, v in d.items()} for m, d in ts["select_llm"].items()
    }
    out["vision_merge_ms"] = _median_ms(ts["vision_merge"])
    out["real_prefill_ms"] = {
        m: {r: _median_ms(v) for r, v in d.items()} for m, d in ts["real_prefill"].items()
    }
    out["n_boot"] = n_boot
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _ci(lo_hi: Sequence[float] | None) -> str:
    return "" if lo_hi is None else f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def targets(summary: dict[str, Any], method: str | None = None) -> list[str]:
    """Issue 21's targets checked on ``summary`` for ``method`` (default: ``mapper_spread``,
    mapper v2, when it ran, else ``mapper``): at 6.25% and 3.125% keep ahead of raw layer-0
    attention and DivPrune-like with paired McNemar p < 0.05, and ahead of FastV-like at equal
    LLM compute (unreachable budgets said so); its difference to the oracle labels, and (mapper
    v2) at 3.125% at least half of the plain mapper's gap to the oracle closed; >= 98% of
    unpruned accuracy at 12.5%. One Markdown line each, with the numbers and MET / NOT MET."""
    m = method or ("mapper_spread" if "mapper_spread" in summary["accuracy"] else "mapper")
    layers = summary.get("lm_layers")
    lines = []
    paired = summary["paired"]
    for r in ("0.0625", "0.03125"):
        for other in ("attention", "divprune", "fastv_eq", "fastv1_eq", "oracle"):
            d = paired.get(f"{m}|{other}", {})
            if r not in d:
                continue
            e = d[r]
            if e is None:
                base = other[: -len(EQ_SUFFIX)]
                mf = summary["min_flops"].get(base)
                budget = summary["flops"][m][r]
                reach = summary.get("reachable", {}).get(other, {}).get(r)
                where = (
                    "" if reach is None else f" on {summary['n'] - reach}/{summary['n']} samples"
                )
                lines.append(
                    f"- {m} vs {other} at {float(r):.3%}: {method_label(base, layers)} cannot run "
                    f"at the mapper's {_pct(budget)}% of unpruned FLOPs{where} (its minimum is "
                    f"{_pct(mf)}%): no equal-compute comparison (unreachable)"
                )
                ge = summary.get("paired_at_least", {}).get(f"{m}|{other}", {}).get(r)
                al = summary.get("at_least", {}).get(other, {}).get(r)
                if ge is not None and al is not None:
                    ok = ge["diff"] > 0 and ge["p"] < 0.05
                    lines.append(
                        f"- {m} vs {other} given at least the mapper's compute at {float(r):.3%} "
                        f"({method_label(base, layers)} at its minimum on the {al['unreachable']} "
                        f"samples above, its mean FLOPs {_pct(al['flops'])}% vs the mapper's "
                        f"{_pct(budget)}%): {100 * ge['diff']:+.1f} points{_ci(ge['ci'])}, "
                        f"McNemar p = {_p(ge['p'])}; ahead with p < 0.05 (a conservative "
                        "equal-compute check: the in-LLM method has more compute): "
                        + ("MET" if ok else "NOT MET")
                    )
                continue
            if other == "oracle":
                lines.append(
                    f"- {m} vs oracle labels at {float(r):.3%}: {100 * e['diff']:+.1f} points"
                    f"{_ci(e['ci'])} (McNemar p = {_p(e['p'])})"
                    + ("; mapper v2's target is half of this gap" if m == "mapper" else "")
                )
                continue
            ok = e["diff"] > 0 and e["p"] < 0.05
            lines.append(
                f"- {m} vs {other} at {float(r):.3%}: {100 * e['diff']:+.1f} points"
                f"{_ci(e['ci'])}, McNemar p = {_p(e['p'])}; target ahead with p < 0.05: "
                + ("MET" if ok else "NOT MET")
            )
    acc = summary["accuracy"]
    r = "0.03125"
    trio = [acc.get(k, {}).get(r) for k in ("mapper", "oracle", m)]
    if m != "mapper" and all(e is not None for e in trio):
        plain, oracle, ours = (e["acc"] for e in trio)
        gap, closed = oracle - plain, ours - plain
        vs = paired.get(f"{m}|mapper", {}).get(r)
        paired_txt = "" if vs is None else f"{_ci(vs['ci'])}, McNemar p = {_p(vs['p'])}"
        if gap > 0:
            ok = closed >= gap / 2
            share = f"{100 * closed / gap:.0f}% of the gap closed"
        else:
            ok = closed >= 0
            share = "no gap to close (the plain mapper is not below the oracle)"
        lines.append(
            f"- {m} at 3.125%: plain mapper {_pct(plain)}%, oracle labels {_pct(oracle)}% (gap "
            f"{100 * gap:+.1f} points), {m} {_pct(ours)}% ({100 * closed:+.1f} points over the "
            f"mapper{paired_txt}): {share}; target at least half: " + ("MET" if ok else "NOT MET")
        )
    e = acc.get(m, {}).get("0.125")
    if e is not None and e["rel"] is not None:
        ok = e["rel"] >= 0.98
        lines.append(
            f"- {m} at 12.5% keeps {_pct(e['rel'])}%{_ci(e['rel_ci'])} of unpruned "
            f"accuracy; target >= 98%: {'MET' if ok else 'NOT MET'}"
        )
    elif e is not None:
        lines.append(
            f"- {m} at 12.5%: {_pct(e['acc'])}% with unpruned accuracy 0: no relative accuracy, "
            "target >= 98% not checkable"
        )
    return lines


def chance_accuracy(qtypes: Sequence[str] = QUESTION_TYPES) -> float:
    """Accuracy of a uniform guess among each question type's answers, the types equally
    frequent (as in the test set)."""
    return statistics.fmean(1.0 / len(ANSWERS_BY_TYPE[t]) for t in qtypes)


def _table(head: str, ratios: Sequence[str], rows: Sequence[tuple[str, list[str]]]) -> list[str]:
    lines = [
        f"| {head} | " + " | ".join(f"keep {float(r):.3g}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    return lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]


def format_report(summary: dict[str, Any], raw: dict[str, Any], header: dict[str, str],
                  command: str) -> str:  # fmt: skip
    """The Markdown report of :func:`summarize`'s ``summary`` of ``raw``."""
    rk = [str(r) for r in raw["ratios"]]
    keys = [*raw["methods"], *raw["eq_keys"]]
    ts = raw["test_set"]
    layers = raw.get("lm_layers")
    qtypes = ts.get("question_types", list(QUESTION_TYPES))

    def _label(key: str) -> str:
        return method_label(key, layers)

    depth = "- language model: " + (f"{layers} decoder layers" if layers else "depth not recorded")
    fastv = [m for m in raw["methods"] if m in LLM_METHODS]
    if layers and fastv:
        depth += "; " + ", ".join(
            f"FastV K={FASTV_LAYERS[m]} prunes after {FASTV_LAYERS[m]} of {layers} layers "
            f"({100 * FASTV_LAYERS[m] / layers:.0f}% of depth)"
            for m in fastv
        )
        depth += "; in 28-layer models FastV's usual K=2 is 7% of depth"
    eq_from = eq_base(raw["methods"])
    lines = [f"# Grounded-VQA pruning evaluation ({header.get('title', '')})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "title"]
    lines += [f"- command: `{command}`"]
    for c in raw.get("shard_commands", []):
        lines += [f"- shard command: `{c}`"]
    lines += [
        f"- fixed test set: split test, seed {ts['seed']}, sizes {ts['sizes']} "
        f"({summary['visual_tokens'][0]}-{summary['visual_tokens'][1]} visual tokens), "
        f"{ts['n_per_size']} scenes per size = {summary['n']} questions, question types "
        f"{', '.join(qtypes)} (type of scene i: i mod {len(qtypes)}); every method scores "
        "the same questions",
        "- accuracy: exact match of the answer token (argmax over the full vocabulary of the "
        "prefill logits at the last position); agrees with generate()'s first token on "
        f"{raw['generate_agreement'][0]}/{raw['generate_agreement'][1]} checked samples",
        f"- chance level (a uniform guess among each question type's answers, types balanced): "
        f"{100 * chance_accuracy(qtypes):.1f}%",
        f"- intervals: accuracy Wilson 95%; relative accuracy and paired differences: paired "
        f"bootstrap 95% ({summary['n_boot']} draws of the questions); p: exact two-sided McNemar",
        f"- torch threads: {raw['threads']}; wall time {raw['wall_s']} s"
        + (f" (shards: {raw['shard_wall_s']} s)" if "shard_wall_s" in raw else ""),
        depth,
        f"- spread methods: the mapper's / raw attention's scores, top-k under the spread rule "
        f"(radius {SPREAD_RADIUS} on the merged grid, docs/contract.md stage c); same keep "
        "count and FLOPs as the plain method",
        "",
        "## Accuracy (%) [Wilson 95%]",
        "",
    ]

    def acc_cell(k: str, r: str) -> str:
        e = summary["accuracy"][k][r]
        if e is None:
            return f"unreachable ({summary['reachable'][k][r]}/{summary['n']} samples)"
        return f"{100 * e['acc']:.1f}{_ci(e['ci'])}"

    def rel_cell(k: str, r: str) -> str:
        e = summary["accuracy"][k][r]
        return "unreachable" if e is None else f"{_pct(e['rel'])}{_ci(e['rel_ci'])}"

    lines += _table("method", rk, [(_label(k), [acc_cell(k, r) for r in rk]) for k in keys])
    if len(qtypes) > 1:
        lines += ["", "## Accuracy by question type (%) [Wilson 95%]", ""]
        lines += [
            "The same predictions split by question type (scene i has type i mod "
            f"{len(qtypes)}); methods only (equal-compute runs in the tables above).",
        ]
        for t, qtype in enumerate(qtypes):
            lines += ["", f"**{qtype}** ({len(range(t, summary['n'], len(qtypes)))} questions)", ""]
            rows = []
            for k in raw["methods"]:
                cells = []
                for r in rk:
                    bits = summary["correct"][k][r][t :: len(qtypes)]
                    ok = bits.count("1")
                    cells.append(
                        f"{100 * ok / len(bits):.1f}{_ci(S.wilson_interval(ok, len(bits)))}"
                    )
                rows.append((_label(k), cells))
            lines += _table("method", rk, rows)
    lines += ["", "## Accuracy relative to no pruning (%) [paired bootstrap 95%]", ""]
    lines += _table("method", rk, [(_label(k), [rel_cell(k, r) for r in rk]) for k in keys])
    lines += [
        "",
        "## LLM prefill FLOPs relative to unpruned (%), mean over the test set",
        "",
        "Decoder layers on the actual sequence (text + kept visual tokens; in-LLM methods: all "
        "tokens before their layer K) plus the method's selection overhead; the oracle's labels "
        "are not counted; the spread rule adds no floating-point work (at most 8 integer "
        "neighbour checks per visual token at radius 1), so the spread methods' FLOPs are their "
        "score source's. Equal-compute runs keep, per sample, the most tokens whose total does "
        "not exceed the mapper's (= mapper v2's).",
        "",
    ]

    def flops_cell(k: str, r: str) -> str:
        f = summary["flops"][k][r]
        if f is None:
            base = k[: -len(EQ_SUFFIX)]
            return f"unreachable (min {_pct(summary['min_flops'][base])})"
        return _pct(f)

    lines += _table("method", rk, [(_label(k), [flops_cell(k, r) for r in rk]) for k in keys])
    over_keys = [k for k in raw["methods"] if any(summary["overhead"][k][r] for r in rk)]
    if over_keys:
        lines += ["", "Of which selection overhead (%):", ""]
        lines += _table(
            "method",
            rk,
            [(_label(k), [_pct(summary["overhead"][k][r], 2) for r in rk]) for k in over_keys],
        )
    if raw["eq_keys"]:
        accs = [k for k in ("mapper", "mapper_spread") if k in raw["methods"]]
        lines += [
            "",
            "## Equal LLM compute: in-LLM methods at the mapper's FLOPs",
            "",
            "Mapper v2 (spread) keeps as many tokens as the mapper with the same scoring, so its "
            "FLOPs are the mapper's to the last FLOP: these runs are its equal-compute "
            "comparison too.",
            "",
            f"| keep | {eq_from} FLOPs % | "
            + "".join(f"{k} acc % | " for k in accs)
            + " | ".join(f"{_label(k)}: keep solved %, FLOPs %, acc %" for k in raw["eq_keys"])
            + " |",
            "|---|---|" + "---|" * (len(accs) + len(raw["eq_keys"])),
        ]
        for r in rk[1:]:
            cells = []
            for k in raw["eq_keys"]:
                e = summary["accuracy"][k][r]
                if e is None:
                    base = k[: -len(EQ_SUFFIX)]
                    cells.append(
                        f"unreachable on {summary['n'] - summary['reachable'][k][r]}/"
                        f"{summary['n']} samples (min FLOPs {_pct(summary['min_flops'][base])})"
                    )
                else:
                    cells.append(
                        f"{_pct(summary['keep_ratio'][k][r], 2)}, {_pct(summary['flops'][k][r])}, "
                        f"{100 * e['acc']:.1f}"
                    )
            ma = [summary["accuracy"][k][r] for k in accs]
            lines.append(
                f"| {float(r):.3g} | {_pct(summary['flops'][eq_from][r])} | "
                + "".join(f"{_pct(e['acc'] if e else None)} | " for e in ma)
                + " | ".join(cells)
                + " |"
            )
    at_least = summary.get("at_least", {})
    rows = [(k, r, e) for k, d in at_least.items() for r, e in d.items() if e is not None]
    m_ours = "mapper_spread" if "mapper_spread" in summary["accuracy"] else "mapper"
    if rows:
        lines += [
            "",
            "## In-LLM methods given at least the mapper's compute",
            "",
            "Where the mapper's budget is below an in-LLM method's minimum (one kept token after "
            "layer K), that sample runs at the minimum; elsewhere at the mapper's FLOPs (the "
            "equal-compute run). The in-LLM method gets more compute than the mapper on those "
            "samples, so a lead over it is a conservative equal-compute result.",
            "",
            f"| run | keep | samples at the minimum | FLOPs % (mapper's) | acc % | {m_ours} "
            "diff, points [95%] | McNemar p |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r, e in rows:
            pe = summary.get("paired_at_least", {}).get(f"{m_ours}|{k}", {}).get(r)
            diff = "-" if pe is None else f"{100 * pe['diff']:+.1f}{_ci(pe['ci'])}"
            lines.append(
                f"| {_label(k)} | {float(r):.3g} | {e['unreachable']}/{summary['n']} | "
                f"{_pct(e['flops'])} ({_pct(summary['flops'][eq_from][r])}) | "
                f"{100 * e['acc']:.1f} | {diff} | {'-' if pe is None else _p(pe['p'])} |"
            )
    lines += [
        "",
        "## Paired comparisons (same questions)",
        "",
        "Difference of accuracy in points [paired bootstrap 95%]; b / c: questions only the "
        "first / only the second answers right; p: exact McNemar.",
        "",
    ]
    for pair, d in summary["paired"].items():
        a, b = pair.split("|")
        lines += [f"**{_label(a)} vs {_label(b)}**", "", "| keep | diff (points) | b | c | p |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in rk[1:]:
            e = d[r]
            if e is None:
                lines.append(f"| {float(r):.3g} | unreachable | - | - | - |")
            else:
                lines.append(
                    f"| {float(r):.3g} | {100 * e['diff']:+.1f}{_ci(e['ci'])} | {e['b']} | "
                    f"{e['c']} | {_p(e['p'])} |"
                )
        lines.append("")
    if summary["adaptive"]:
        lo, hi = raw["adaptive_bounds"]
        lines += [
            "## Adaptive mapper (relevance-mass threshold)",
            "",
            f"Per sample the fewest top tokens whose mapper softmax mass reaches the threshold, "
            f"clamped to keep ratios [{lo:.4g}, {hi:.4g}].",
            "",
            "| threshold | mean tokens kept | mean keep % | FLOPs % | acc % [Wilson 95%] | "
            "relative % [bootstrap 95%] |",
            "|---|---|---|---|---|---|",
        ]
        for t, e in summary["adaptive"].items():
            lines.append(
                f"| {t} | {e['tokens']:.1f} | {_pct(e['keep_ratio'], 2)} | {_pct(e['flops'])} | "
                f"{100 * e['acc']:.1f}{_ci(e['ci'])} | {_pct(e['rel'])}{_ci(e['rel_ci'])} |"
            )
        lines.append("")
    methods = raw["methods"]
    lines += [
        f"## Prefill time (ms, median over the first {raw['timed_samples']} samples, one prompt)",
        "",
        "Harness path: vision tower + merge + M-RoPE ids + selection + language model on the kept "
        "tokens (oracle: label computation not counted). Real path: `model(**inputs)` unpatched, "
        "or patched with `apply_tokenprune(model, keep_ratio, mapper=..., spread_radius=...)` "
        "(the spread methods: `spread_radius=1`).",
        "",
    ]
    rows = [(_label(m), [_ms(summary["prefill_ms"][m][r]) for r in rk]) for m in methods]
    rows += [
        (f"real path: {_label(m)}", [_ms(d[r]) for r in rk])
        for m, d in summary["real_prefill_ms"].items()
    ]
    lines += _table("method", rk, rows)
    lines += [
        "",
        "Selection + language model only (the shared vision tower + merge + M-RoPE ids take "
        f"{_ms(summary['vision_merge_ms'])} ms, median):",
        "",
    ]
    lines += _table("method", rk, [(_label(m), [_ms(summary["select_llm_ms"][m][r]) for r in rk])
                                   for m in methods])  # fmt: skip
    mm = raw["real_path_mismatches"]
    if mm:
        lines += [
            "",
            "Real path vs harness selection: samples whose kept tokens differ: "
            + ", ".join(f"{k} {v}" for k, v in mm.items()),
        ]
    t = targets(summary)
    if t:
        who = "mapper_spread" if "mapper_spread" in summary["accuracy"] else "mapper"
        lines += [
            "",
            "## Targets (issue 21)",
            "",
            f"Checked for `{who}` ({_label(who)}) on this test set: ahead means a positive paired "
            "difference with exact McNemar p < 0.05; equal compute means FastV-like at the "
            "mapper's per-sample FLOPs; the oracle-gap target compares accuracies at 3.125%.",
            "",
            *t,
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], raw: dict[str, Any], path: str | Path, title: str = "") -> bool:
    """Accuracy vs keep ratio (left, log-2 x) and vs relative LLM FLOPs (right, log x), Wilson
    95% bars, the adaptive mapper as its own curve at its mean keep / FLOPs, to ``path`` (PNG).
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rk = [str(r) for r in raw["ratios"]]
    layers = raw.get("lm_layers")
    fig, (ax_k, ax_f) = plt.subplots(1, 2, figsize=(13, 5), dpi=120)

    def series(ax: Any, key: str, xs: list[float], es: list[dict[str, Any]], **kw: Any) -> None:
        mean = [100 * e["acc"] for e in es]
        err = [
            [100 * (e["acc"] - e["ci"][0]) for e in es],
            [100 * (e["ci"][1] - e["acc"]) for e in es],
        ]
        kw = {"marker": "o", **kw}
        ax.errorbar(xs, mean, yerr=err, label=method_label(key, layers), capsize=3, **kw)

    cmap = plt.get_cmap("tab10" if len(raw["methods"]) <= 10 else "tab20")
    colour = {m: cmap(i) for i, m in enumerate(raw["methods"])}
    for k in [*raw["methods"], *raw["eq_keys"]]:
        style = "-" if k in OURS else ("--" if k in ("none", "oracle") else ":")
        extra = {"color": colour.get(k, colour.get(k[: -len(EQ_SUFFIX)])),
                 "linewidth": 2 if k in OURS else 1.2}  # fmt: skip
        if k in raw["eq_keys"]:  # the base method's colour, square markers
            style, extra["marker"] = "-.", "s"
        ok = [r for r in rk if summary["accuracy"][k][r] is not None]
        es = [summary["accuracy"][k][r] for r in ok]
        if not es:
            continue
        if k not in raw["eq_keys"]:
            series(ax_k, k, [100 * float(r) for r in ok], es, linestyle=style, **extra)
        series(ax_f, k, [100 * summary["flops"][k][r] for r in ok], es, linestyle=style, **extra)
    if summary["adaptive"]:
        ad = list(summary["adaptive"].values())
        kw = {"linestyle": "-.", "linewidth": 2, "color": "black"}
        series(
            ax_k, "adaptive mapper (mass thresholds)", [100 * e["keep_ratio"] for e in ad], ad, **kw
        )
        series(ax_f, "adaptive mapper (mass thresholds)", [100 * e["flops"] for e in ad], ad, **kw)
    ax_k.set_xscale("log", base=2)
    ax_k.set_xticks([100 * float(r) for r in rk], [f"{100 * float(r):g}%" for r in rk])
    ax_k.set_xlabel("visual tokens kept (adaptive: mean)")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("LLM prefill FLOPs, % of unpruned (incl. selection)")
    for ax in (ax_k, ax_f):
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    ax_f.legend(fontsize=6, loc="lower right")
    fig.suptitle(title or "grounded VQA: accuracy vs keep ratio and vs FLOPs (Wilson 95%)")
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


QUICK_N_PER_SIZE = 2
"""``--quick``: scenes per size (18 questions on the training sizes)."""


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be I/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _question_types(text: str) -> list[str]:
    try:
        return check_question_types([t.strip() for t in text.split(",") if t.strip()])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--question-types must be a comma-separated list of {ALL_QUESTION_TYPES}, got {text!r}"
        ) from None


def unknown_words(processor: Any, samples: Sequence[Sample]) -> list[str]:
    """The words of the samples' questions and answers that the processor's tokenizer does not
    map to their :data:`~tokenprune_kernels.grounded.model.TOKEN_ID` id (e.g. the opt-in types'
    words with a tokenizer saved before they existed: ``<unk>``), in first-seen order."""
    tok = processor.tokenizer
    words = dict.fromkeys(w for s in samples for w in (*s.question.text.split(), s.question.answer))
    return [w for w in words if w not in TOKEN_ID or tok.convert_tokens_to_ids(w) != TOKEN_ID[w]]


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model-dir", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--mapper", type=Path, help="mapper .safetensors (default: the shipped mapper)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed test set")
    p.add_argument(
        "--n-per-size", type=int, default=DEFAULT_N_PER_SIZE, help="test scenes per image size"
    )
    p.add_argument("--sizes", choices=sorted(SIZE_SETS), default="train")
    p.add_argument(
        "--question-types", type=_question_types, default=list(QUESTION_TYPES),
        help="comma-separated question types of the test set (scene i gets type i mod count); "
        f"default the five default types; opt-in: {', '.join(EXTRA_QUESTION_TYPES)}",
    )  # fmt: skip
    p.add_argument(
        "--thresholds", nargs="*", type=float, default=list(DEFAULT_THRESHOLDS),
        help="relevance-mass thresholds of the adaptive mapper (none: skip it)",
    )  # fmt: skip
    p.add_argument("--adaptive-min", type=float, default=DEFAULT_ADAPTIVE_BOUNDS[0])
    p.add_argument("--adaptive-max", type=float, default=DEFAULT_ADAPTIVE_BOUNDS[1])
    p.add_argument("--time-samples", type=int, default=27, help="samples timed (the first ones)")
    p.add_argument("--bootstrap", type=int, default=N_BOOT, help="paired bootstrap draws")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timing)")
    p.add_argument("--no-real-path", action="store_true", help="skip the apply_tokenprune runs")
    p.add_argument(
        "--quick", action="store_true",
        help=f"CI-sized run: {QUICK_N_PER_SIZE} scenes per size, 2 timed, 200 bootstrap draws",
    )  # fmt: skip
    p.add_argument(
        "--shard", type=_shard, help="I/N: run samples I, I+N, ... and write only the raw .json"
    )
    p.add_argument(
        "--merge", nargs="+", type=Path, help="raw .json files of --shard runs to join and report"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output prefix: writes .json, .md and .png"
    )
    return p


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``tokenprune`` subcommands; its handler is :func:`cmd_eval`."""
    p = subparsers.add_parser(
        "eval",
        help="accuracy, FLOPs and paired statistics of every pruning method (grounded VQA)",
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


def _header(args: argparse.Namespace, model_dir: Path, mapper_file: Path | None) -> dict[str, str]:
    import transformers

    from tokenprune_kernels.bench import environment

    header = {"title": f"{args.sizes} sizes, fixed test set", **environment("cpu")}
    header["transformers"] = transformers.__version__
    header["model"] = str(Path(model_dir).resolve())
    header["model_sha256"] = _file_sha256(Path(model_dir) / "model.safetensors")
    if mapper_file is not None:
        header["mapper"] = str(mapper_file)
        header["mapper_sha256"] = _file_sha256(mapper_file)
    return header


def write_outputs(raw: dict[str, Any], out: Path, n_boot: int, title: str) -> str:
    """Summarize ``raw`` and write ``out``.json / .md / .png; returns the report."""
    summary = summarize(raw, n_boot=n_boot)
    header, command = raw["header"], raw["command"]
    saved = {k: v for k, v in raw.items() if k not in RECORDS and k != "adaptive"}
    preds = {"pred": raw["pred"], "adaptive": {t: d["pred"] for t, d in raw["adaptive"].items()}}
    saved["predictions_sha256"] = hashlib.sha256(
        json.dumps(preds, sort_keys=True).encode()
    ).hexdigest()
    saved["summary"] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    report = format_report(summary, raw, header, command)
    out.with_suffix(".md").write_text(report)
    if not plot(summary, raw, out.with_suffix(".png"), title):
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
    return report


def cmd_eval(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the evaluation of ``args`` (see :func:`add_eval_parser`) and write the outputs."""
    from tokenprune_kernels.grounded.model import (
        ASSETS_DIR,
        MODEL_DIR,
        load_model_dir,
        load_processor,
    )
    from tokenprune_kernels.mapper import load_mapper

    # the words after the program name: from the caller, else cli.main's parsed argv, else sys
    rest = list(argv if argv is not None else getattr(args, "argv", None) or sys.argv[1:])
    command = "tokenprune " + shlex.join(rest)
    out = Path(args.out)
    n_boot = 200 if args.quick else args.bootstrap
    if n_boot < 1:
        return cli_error(f"--bootstrap must be >= 1, got {n_boot}")
    title = f"grounded VQA, {args.sizes} sizes, fixed test set (bars: Wilson 95%)"
    if args.merge:
        try:
            raw = merge_shards([json.loads(Path(f).read_text()) for f in args.merge])
        except (OSError, ValueError, KeyError) as err:
            return cli_error(f"--merge: {err}")
        from tokenprune_kernels.bench import environment

        raw["command"] = command
        raw["header"] = {**raw["header"], "report commit": environment("cpu")["commit"]}
        print(write_outputs(raw, out, n_boot, title))
        return 0
    if args.threads < 1:
        return cli_error(f"--threads must be >= 1, got {args.threads}")
    n_per_size = QUICK_N_PER_SIZE if args.quick else args.n_per_size
    if n_per_size < 1:
        return cli_error(f"--n-per-size must be >= 1, got {n_per_size}")
    time_samples = min(2, args.time_samples) if args.quick else args.time_samples
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or MODEL_DIR
    if not (Path(model_dir) / "config.json").is_file():
        return cli_error(f"--model-dir '{model_dir}' holds no model (config.json)")
    methods = list(dict.fromkeys(["none", *args.methods]))
    mapper, mfile = None, None
    if "mapper" in methods or "mapper_spread" in methods:
        mfile = Path(args.mapper or ASSETS_DIR / "mapper.safetensors")
        if not mfile.is_file():
            return cli_error(
                f"--mapper '{mfile}' not found (or leave 'mapper' and 'mapper_spread' out of "
                "--methods)"
            )
        mapper = load_mapper(mfile)
    thresholds = args.thresholds if "mapper" in methods else []
    qtypes = list(args.question_types)
    samples = eval_samples(args.seed, n_per_size, SIZE_SETS[args.sizes], qtypes)
    unknown = unknown_words(load_processor(model_dir), samples)
    if unknown:
        return cli_error(
            f"the tokenizer of --model-dir '{model_dir}' does not know the words {unknown} of "
            f"the question types {qtypes} (they would be <unk>): use a model trained with them"
        )
    shard = args.shard or (0, 1)
    samples = samples[shard[0] :: shard[1]]
    if shard[0] > 0:
        time_samples = 0  # timings come from shard 0 only
    header = _header(args, Path(model_dir), mfile)  # before the run: the commit it started at
    model, processor = load_model_dir(model_dir)
    label_model = None
    if "oracle" in methods:
        label_model, _ = load_model_dir(model_dir)
        set_text_eager(label_model)
    try:
        raw = run_eval(
            model, processor, samples, methods=methods, ratios=args.ratios, mapper=mapper,
            label_model=label_model, thresholds=thresholds,
            adaptive_bounds=(args.adaptive_min, args.adaptive_max), time_samples=time_samples,
            real_path=not args.no_real_path, progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ValueError as err:
        return cli_error(str(err))
    raw["test_set"] = {
        "split": "test", "seed": args.seed, "n_per_size": n_per_size,
        "sizes": [list(s) for s in SIZE_SETS[args.sizes]], "question_types": qtypes,
    }  # fmt: skip
    raw["header"] = header
    raw["command"] = command
    if args.shard:
        raw["shard"] = list(shard)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(raw) + "\n")
        print(f"shard {shard[0]}/{shard[1]}: {len(samples)} samples -> {out.with_suffix('.json')}")
        return 0
    print(write_outputs(raw, out, n_boot, title))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenprune_kernels.grounded.evaluate ...`` (same options as ``tokenprune
    eval``)."""
    from tokenprune_kernels.cli import run_subcommand

    return run_subcommand("eval", argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "DEFAULT_ADAPTIVE_BOUNDS",
    "DEFAULT_METHODS",
    "DEFAULT_N_PER_SIZE",
    "DEFAULT_RATIOS",
    "DEFAULT_THRESHOLDS",
    "METHOD_LABELS",
    "PAIRS",
    "SIZE_SETS",
    "adaptive_counts",
    "add_eval_parser",
    "chance_accuracy",
    "cli_error",
    "cmd_eval",
    "eq_base",
    "eq_keys",
    "eval_samples",
    "format_report",
    "main",
    "merge_shards",
    "method_label",
    "plot",
    "run_eval",
    "selection_flops",
    "set_text_eager",
    "summarize",
    "targets",
    "unknown_words",
    "write_outputs",
]
