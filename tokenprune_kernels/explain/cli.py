"""``tokenprune explain``: relevance labels for mapper training from a local model and JSONL data.

    tokenprune explain --model /models/Qwen2-VL-7B-Instruct --data train.jsonl --out labels/

For every record (see :mod:`tokenprune_kernels.explain.data` for the format) the model decodes
the prompt greedily; samples whose answer matches the reference (``--match``) are labelled: the
layer-0 instruction attention of the visual tokens on the prompt (the mapper input, computed as
inference does) and the gradient-weighted relevance of each visual token averaged over the answer
tokens (the label). They go to ``--out`` as safetensors shards
(:class:`tokenprune_kernels.labels.ShardWriter`); wrong answers go to ``incorrect.jsonl``. The run
is resumable: rerun the same command after an interruption and finished samples (labelled or
wrong) are skipped. ``summary.json`` holds the counts (``seen``, ``correct``, ``incorrect``,
``rate`` = correct / seen, ``skipped`` = already done before this run).

The model is loaded from the local directory only (``local_files_only``) with eager attention;
model types: those of :data:`~tokenprune_kernels.explain.relevance.SUPPORTED_MODEL_TYPES`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune_kernels.explain.data import ExplainRecord, read_records
from tokenprune_kernels.explain.pipeline import MATCH_MODES, SampleResult, label_sample
from tokenprune_kernels.explain.processor import load_processor
from tokenprune_kernels.explain.relevance import SUPPORTED_MODEL_TYPES, TARGETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INCORRECT_FILE = "incorrect.jsonl"
SETTINGS_FILE = "explain_settings.json"
SUMMARY_FILE = "summary.json"


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
    p.add_argument("--model", required=True, help="local model directory (weights + processor)")
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
    p.set_defaults(func=cmd_explain)
    return p


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA GPU is visible")
    return dev


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


def _read_incorrect(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that sample is redone
            if isinstance(obj, dict) and "id" in obj:
                out[str(obj["id"])] = obj
    return out


def run_explain(
    model_dir: str | Path,
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
    on_sample: Callable[[ExplainRecord, SampleResult], None] | None = None,
) -> dict[str, Any]:
    """Label every record of ``data`` with the model in ``model_dir``; write shards to ``out``.

    Arguments as the CLI options; ``on_sample(record, result)`` is called after each computed
    sample has been stored (tests use it to interrupt a run). Returns the summary dict (also
    written to ``out/summary.json``).

    Raises:
        FileNotFoundError: missing data file, model directory or media file.
        ValueError: bad record, unreadable image, unsupported model type, settings that differ
            from an earlier run in ``out``, bad option values.
    """
    from tokenprune_kernels.labels import ShardWriter

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
    records = read_records(data)
    if limit is not None:
        records = records[:limit]
    model_type = check_model_dir(model_dir)
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    out = Path(out)
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
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(
                f"'{out}' holds a run with other settings ({previous}); this run has {settings}: "
                "use another --out or the same settings"
            )
    video = any(r.modality == "video" for r in records)
    model, processor = load_model_and_processor(model_dir, dev, torch_dtype, video=video)
    out.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    incorrect_path = out / INCORRECT_FILE
    incorrect = _read_incorrect(incorrect_path)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    skipped = computed = 0
    finished = False
    ids = [r.sample_id for r in records]
    summary: dict[str, Any] = {}
    n_ok = n_bad = 0
    with ShardWriter(out, shard_size=shard_size, metadata=settings) as writer:
        stored = writer.done_ids()
        n_ok = sum(1 for i in ids if i in stored)
        n_bad = sum(1 for i in ids if i in incorrect and i not in stored)
        bar = tqdm(total=len(records), desc="explain", unit="sample", disable=not progress)
        try:
            with open(incorrect_path, "a", encoding="utf-8") as log:
                for record in records:
                    if record.sample_id in stored or record.sample_id in incorrect:
                        skipped += 1
                        bar.update(1)
                        continue
                    result = label_sample(
                        model,
                        processor,
                        record,
                        max_new_tokens=max_new_tokens,
                        target=target,
                        answer_chunk=answer_chunk,
                        match=match,
                    )
                    if result.record is not None:
                        writer.add(result.record)
                        n_ok += 1
                    else:
                        entry = {
                            "id": record.sample_id,
                            "line": record.line,
                            "answer": record.answer,
                            "greedy_answer": result.greedy_answer,
                        }
                        incorrect[record.sample_id] = entry
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                        n_bad += 1
                    computed += 1
                    bar.update(1)
                    bar.set_postfix(correct=n_ok, rate=f"{n_ok / (n_ok + n_bad):.2f}")
                    if on_sample is not None:
                        on_sample(record, result)
            finished = True
        finally:
            bar.close()
            writer.flush()
            seen = n_ok + n_bad
            summary = {
                "records": len(records),
                "seen": seen,
                "correct": n_ok,
                "incorrect": n_bad,
                "rate": n_ok / seen if seen else None,
                "skipped": skipped,
                "computed": computed,
                "finished": finished,
                "seconds": round(time.perf_counter() - start, 3),
                "model": settings["model"],
                "model_type": model_type,
                "data": str(Path(data).resolve()),
                "command": command,
            }
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_explain(args: argparse.Namespace) -> int:
    """The ``tokenprune explain`` command: errors are printed (no traceback), exit code 2."""
    argv = getattr(args, "argv", None)
    command = None if argv is None else "tokenprune " + " ".join(shlex.quote(a) for a in argv)
    try:
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
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"tokenprune explain: error: {err}", file=sys.stderr)
        return 2
    rate = "n/a" if summary["rate"] is None else f"{summary['rate']:.3f}"
    print(
        f"explain: {summary['correct']} of {summary['seen']} answered correctly (rate {rate}), "
        f"{summary['computed']} computed now, {summary['skipped']} already done; "
        f"shards and summary.json in {args.out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenprune explain`` on its own: ``main(["--model", DIR, "--data", F, "--out", D])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tokenprune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_explain_parser(sub)
    args = parser.parse_args(["explain", *argv])
    args.argv = ["explain", *argv]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
