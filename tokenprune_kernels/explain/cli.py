"""``tokenprune explain``: relevance labels for mapper training from a local model and JSONL data.

    tokenprune explain --model /models/Qwen2-VL-7B-Instruct --data train.jsonl --out labels/
    torchrun --nproc_per_node 8 -m tokenprune_kernels explain --model ... --data ... --out ...

For every record (see :mod:`tokenprune_kernels.explain.data` for the format) the model decodes
the prompt greedily; samples whose answer matches the reference (``--match``) are labelled: the
layer-0 instruction attention of the visual tokens on the prompt (the mapper input, computed as
inference does) and the gradient-weighted relevance of each visual token averaged over the answer
tokens (the label). They go to ``--out`` as safetensors shards
(:class:`tokenprune_kernels.labels.ShardWriter`) in data-file order; wrong answers go to
``incorrect.jsonl``, one entry per record to ``index.json``. ``summary.json`` holds the counts
(``seen``, ``correct``, ``incorrect``, ``rate`` = correct / seen, ``oom``, ``missing``,
``skipped`` = already done before this run, ``computed``, ``samples_per_s``).

One process or many: under torchrun or srun (:mod:`tokenprune_kernels.distributed`) every process
loads the model on its own GPU and labels every ``world_size``-th sample not done yet; each
writes only its own part of ``--out`` and the last to finish merges
(:mod:`tokenprune_kernels.explain.distributed`). The run is resumable: rerun the same command -
with any number of processes - after an interruption and finished samples (labelled or wrong)
are skipped; a killed process loses at most its last ``--shard-size`` samples, never records a
half-finished one. ``--merge-only`` rebuilds the merged output from what is committed.

Memory, per process (bf16 by default on CUDA). Alive the whole run: the weights (2 bytes per
parameter). Per sample, freed before the next: greedy decoding holds the KV cache (``2 * layers
* kv_heads * head_dim * 2`` bytes per token) and one layer's eager attention scores at a time;
the relevance pass (teacher-forced sequence of ``S = prompt + answer - 1`` tokens; parameters
frozen, so no weight gradient and no vision-tower graph) keeps for EVERY decoder layer the
attention probabilities autograd saves - the float32 softmax output and its bf16 copy, ``6 * heads
* S^2`` bytes per layer (``8 * heads * S^2`` in float32) - plus the layers' ``[S, hidden]`` /
``[S, mlp]`` activations and the ``[answer, vocab]`` logits; the backward adds one layer's
``[heads, S, S]`` gradient at a time with ``--answer-chunk 1`` (``k`` per layer, all layers at
once, with ``--answer-chunk k``). For a 28-layer, 28-head model (Qwen2-VL-7B) at ``S = 1300``
the saved attention is about 8 GB, at ``S = 2600`` about 32 GB: it grows with the square of the
visual-token count. A sample that raises ``torch.cuda.OutOfMemoryError`` is recorded (its id and
the error in ``index.json``, ``oom_ids`` in ``summary.json``), its memory released, and the run
goes on; it is not done, so the next run tries it again.

The model is loaded from the local directory only (``local_files_only``) with eager attention;
model types: those of :data:`~tokenprune_kernels.explain.relevance.SUPPORTED_MODEL_TYPES`.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune_kernels.distributed import (
    DistEnv,
    detect_env,
    process_group,
    rank_device,
    write_json_atomic,
)
from tokenprune_kernels.explain.data import ExplainRecord, read_records
from tokenprune_kernels.explain.distributed import (
    SUMMARY_FILE,
    PartWriter,
    assign,
    check_layout,
    claim_merge,
    done_ids,
    merge,
    new_run_id,
    read_commits,
    read_rank_summaries,
    write_rank_summary,
)
from tokenprune_kernels.explain.pipeline import MATCH_MODES, SampleResult, label_sample
from tokenprune_kernels.explain.processor import load_processor
from tokenprune_kernels.explain.relevance import SUPPORTED_MODEL_TYPES, TARGETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS_FILE = "explain_settings.json"


def add_explain_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand to ``subparsers`` (an ``argparse`` subparsers action).

    Returns the subparser; its ``func`` default is :func:`cmd_explain`.
    """
    p = subparsers.add_parser(
        "explain",
        help="relevance labels (mapper input + gradient-weighted relevance) from a local model",
        description=(
            "Greedy-decode each record; for the samples answered correctly, store the layer-0 "
            "instruction attention of the visual tokens (the mapper input) and their "
            "gradient-weighted relevance (the label) as safetensors shards. Resumable."
        ),
    )
    p.add_argument(
        "--model", default=None, help="local model directory (weights + processor); required"
    )
    p.add_argument("--data", required=True, help="JSONL records: image|video, question, answer")
    p.add_argument("--out", required=True, help="output directory (shards, summary.json)")
    p.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if visible)")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="model dtype (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="logit",
        help="explained output per answer token: its logit (default) or log-probability",
    )
    p.add_argument(
        "--answer-chunk",
        type=int,
        default=1,
        help="answer tokens per backward pass (1: least memory; more: fewer, batched passes)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=32, help="greedy decoding budget (default 32)"
    )
    p.add_argument(
        "--match",
        choices=MATCH_MODES,
        default="normalized",
        help="answer check: normalized (case, spaces, final punctuation ignored) or exact",
    )
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--merge-only",
        action="store_true",
        help="compute nothing: merge what earlier runs committed in --out (no --model needed)",
    )
    p.set_defaults(func=cmd_explain)
    return p


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    return DTYPES[dtype]


def check_model_dir(model_dir: str | Path) -> str:
    """Read the config of a local model directory; return its supported ``model_type``.

    Raises:
        FileNotFoundError: no such directory / no ``config.json``.
        ValueError: unreadable config or an unsupported model type (lists the supported ones).
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: '{model_dir}'")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{model_dir}' has no config.json: not a model directory")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the model config in '{model_dir}': {err}") from err
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} of '{model_dir}' is not supported by tokenprune explain; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def load_model_and_processor(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, *, video: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Load a supported model (eager attention, eval mode, on ``device`` in ``dtype``) and its
    processor from a local directory (never the hub). ``video=False`` (image-only data) lets
    the processor be built without torchvision (see
    :func:`~tokenprune_kernels.explain.processor.load_processor`)."""
    from transformers import AutoModelForImageTextToText

    model_type = check_model_dir(model_dir)
    processor = load_processor(model_dir, model_type, video=video)
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), local_files_only=True, dtype=dtype, attn_implementation="eager"
    )
    return model.to(device).eval(), processor


def _release_memory(device: torch.device) -> None:
    """After an out-of-memory error: collect the dropped sample's tensors, return the cached
    blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _share_run_id(env: DistEnv) -> str:
    """Rank 0's fresh run id, the same in every process of the run."""
    run_id = new_run_id()
    if not env.distributed:
        return run_id
    import torch.distributed as dist

    with process_group(env, "gloo"):
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def run_explain(
    model_dir: str | Path | None,
    data: str | Path,
    out: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    target: str = "logit",
    answer_chunk: int = 1,
    max_new_tokens: int = 32,
    match: str = "normalized",
    shard_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    command: str | None = None,
    on_sample: Callable[[ExplainRecord, SampleResult | None], None] | None = None,
    merge_only: bool = False,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Label every record of ``data`` with the model in ``model_dir``; write shards to ``out``.

    Arguments as the CLI options. ``env`` is this process's place in a multi-process run
    (default: :func:`~tokenprune_kernels.distributed.detect_env`, from torchrun's or srun's
    variables); each process labels its share of the samples not done yet (see
    :mod:`tokenprune_kernels.explain.distributed`). ``on_sample(record, result)`` is called after
    each computed sample has been buffered for its commit (``result`` is None for a sample that
    ran out of memory); tests use it to interrupt a run. ``merge_only``: compute nothing, merge
    what earlier runs committed (``model_dir`` is not needed).

    Returns:
        The merged summary (also ``out/summary.json``) when this process merged - always for a
        single process - else this process's rank summary (``"merged": False``).

    Raises:
        FileNotFoundError: missing data file, model directory or media file.
        ValueError: bad record, unreadable image, unsupported model type, settings that differ
            from an earlier run in ``out``, bad option values, a sample done twice (merge).
    """
    for name, value in (
        ("answer_chunk", answer_chunk),
        ("max_new_tokens", max_new_tokens),
        ("shard_size", shard_size),
        ("limit", limit),
    ):
        _positive(name, value)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    env = detect_env() if env is None else env
    records = read_records(data)
    if limit is not None:
        records = records[:limit]
    ids = [r.sample_id for r in records]
    lines = [r.line for r in records]
    out = Path(out)
    settings_path = out / SETTINGS_FILE
    info = {"data": str(Path(data).resolve()), "command": command}
    if merge_only:
        if not settings_path.is_file():
            raise FileNotFoundError(f"'{out}' holds no {SETTINGS_FILE}: nothing to merge")
        settings = json.loads(settings_path.read_text())
        summary = merge(out, ids, lines, settings, shard_size)
        summary.update(model=settings["model"], model_type=settings["model_type"], **info)
        write_json_atomic(out / SUMMARY_FILE, summary)
        return summary
    if model_dir is None:
        raise ValueError("model_dir (--model) is required unless merge_only (--merge-only)")
    model_type = check_model_dir(model_dir)
    dev = rank_device(env, device)
    torch_dtype = _resolve_dtype(dtype, dev)
    settings = {
        "tool": "tokenprune explain",
        "model": str(Path(model_dir).resolve()),
        "model_type": model_type,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "target": target,
        "max_new_tokens": max_new_tokens,
        "match": match,
        "attn": "layer-0 instruction attention on the prompt (default instruction rule)",
        "label": "gradient-weighted attention relevance, mean over answer tokens",
    }
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(
                f"'{out}' holds a run with other settings ({previous}); this run has {settings}: "
                "use another --out or the same settings"
            )
    check_layout(out)
    run_id = _share_run_id(env)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    video = any(r.modality == "video" for r in records)
    model, processor = load_model_and_processor(model_dir, dev, torch_dtype, video=video)
    out.mkdir(parents=True, exist_ok=True)
    if not settings_path.is_file():
        write_json_atomic(settings_path, settings)
    # what earlier runs finished; this run's own commits are left out, so that every process
    # sees the same set however late it starts
    done = done_ids(read_commits(out), exclude_run=run_id)
    mine = [records[i] for i in assign(ids, done, env.rank, env.world_size)]
    skipped = sum(1 for sid in ids if sid in done)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    computed = 0
    finished = False
    bar = tqdm(
        total=len(mine),
        desc="explain" if not env.distributed else f"explain rank 0/{env.world_size}",
        unit="sample",
        disable=not progress or not env.is_main,
    )
    part = PartWriter(out, run_id, env.rank, env.world_size, shard_size, settings)
    try:
        with part:
            for record in mine:
                error = None
                try:
                    result = label_sample(
                        model,
                        processor,
                        record,
                        max_new_tokens=max_new_tokens,
                        target=target,
                        answer_chunk=answer_chunk,
                        match=match,
                    )
                except torch.cuda.OutOfMemoryError as err:
                    result, error = None, (str(err).strip().splitlines() or ["out of memory"])[0]
                if result is None:  # outside the except block: the failed frames are gone
                    _release_memory(dev)
                    part.add_oom({"id": record.sample_id, "line": record.line, "error": error})
                elif result.record is not None:
                    part.add_labelled(result.record)
                else:
                    part.add_incorrect(
                        {
                            "id": record.sample_id,
                            "line": record.line,
                            "answer": record.answer,
                            "greedy_answer": result.greedy_answer,
                        }
                    )
                computed += 1
                bar.update(1)
                ok, bad = part.committed["labelled"], part.committed["incorrect"]
                bar.set_postfix(committed=ok + bad, oom=part.committed["oom"])
                if on_sample is not None:
                    on_sample(record, result)
        finished = True
    finally:
        bar.close()
        seconds = time.perf_counter() - start
        rank_summary = {
            "run": run_id,
            "rank": env.rank,
            "world_size": env.world_size,
            "launcher": env.launcher,
            "device": str(dev),
            "assigned": len(mine),
            "computed": computed,
            "skipped": skipped,
            **part.committed,
            "finished": finished,
            "seconds": round(seconds, 3),
        }
        write_rank_summary(out, run_id, env.rank, rank_summary)
        merged = None
        if claim_merge(out, run_id, env.world_size):
            try:
                merged = _merge_run(out, run_id, ids, lines, settings, shard_size, info)
            except Exception as err:
                if finished:
                    raise
                print(f"tokenprune explain: merge after the interruption failed: {err}",
                      file=sys.stderr)  # fmt: skip
    return merged if merged is not None else {**rank_summary, "merged": False}


def _merge_run(
    out: Path,
    run_id: str,
    ids: list[str],
    lines: list[int],
    settings: dict[str, Any],
    shard_size: int,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Merge after the last rank of run ``run_id`` finished; the run's figures from its ranks."""
    ranks = read_rank_summaries(out, run_id)
    computed = sum(r["computed"] for r in ranks)
    seconds = max(r["seconds"] for r in ranks)
    run = {
        "skipped": ranks[0]["skipped"],
        "computed": computed,
        "seconds": seconds,
        "samples_per_s": round(computed / seconds, 4) if seconds > 0 else None,
        "world_size": len(ranks),
        "run": run_id,
        "ranks": [
            {k: r[k] for k in ("rank", "device", "assigned", "computed", "seconds", "finished")}
            for r in ranks
        ],
        "model": settings["model"],
        "model_type": settings["model_type"],
        **info,
    }
    return merge(out, ids, lines, settings, shard_size, run=run)


def cmd_explain(args: argparse.Namespace) -> int:
    """The ``tokenprune explain`` command: errors are printed (no traceback), exit code 2."""
    argv = getattr(args, "argv", None)
    command = None if argv is None else "tokenprune " + " ".join(shlex.quote(a) for a in argv)
    try:
        env = detect_env()
        if args.model is None and not args.merge_only:
            raise ValueError("--model is required (unless --merge-only)")
        summary = run_explain(
            args.model,
            args.data,
            args.out,
            device=args.device,
            dtype=args.dtype,
            target=args.target,
            answer_chunk=args.answer_chunk,
            max_new_tokens=args.max_new_tokens,
            match=args.match,
            shard_size=args.shard_size,
            limit=args.limit,
            progress=not args.no_progress,
            command=command,
            merge_only=args.merge_only,
            env=env,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"tokenprune explain: error: {err}", file=sys.stderr)
        return 2
    if summary.get("merged") is False:
        print(
            f"explain {env.describe()}: {summary['computed']} computed ({summary['labelled']} "
            f"labelled, {summary['incorrect']} wrong, {summary['oom']} out of memory) in "
            f"{summary['seconds']:.1f} s; the last rank to finish merges"
        )
        return 0
    rate = "n/a" if summary["rate"] is None else f"{summary['rate']:.3f}"
    oom = f", {summary['oom']} out of memory (retried by the next run)" if summary["oom"] else ""
    missing = f", {summary['missing']} not done yet" if summary["missing"] else ""
    print(
        f"explain: {summary['correct']} of {summary['seen']} answered correctly (rate {rate}), "
        f"{summary['computed']} computed now, {summary['skipped']} already done{oom}{missing}; "
        f"shards, index.json and summary.json in {args.out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenprune explain`` on its own: ``main(["--model", DIR, "--data", F, "--out", D])``."""
    from tokenprune_kernels.cli import run_subcommand

    return run_subcommand("explain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
