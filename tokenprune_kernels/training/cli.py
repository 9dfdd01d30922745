"""``tokenprune train-mapper``: train a mapper on a label directory.

``add_train_parser(subparsers)`` adds the subcommand to the ``tokenprune`` parser; :func:`main`
runs it on its own (``python -m tokenprune_kernels.training.cli --labels DIR --out m.safetensors``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

__all__ = ["add_train_parser", "cmd_train_mapper", "main"]

_DESCRIPTION = (
    "Train a mapper on the (attention, relevance) labels of `tokenprune explain`: target = label "
    "with its lowest 50%% zeroed and renormalised, loss KL(target || softmax(mapper)), Adam, a "
    "validation split. Saves the mapper with the lowest validation KL (OUT and OUT's .json "
    "config, what apply_tokenprune(mapper=OUT) loads), a per-epoch log OUT -> *.train.json and a "
    "checkpoint OUT -> *.ckpt.safetensors (--resume continues from it). Under torchrun or srun "
    "the processes train data-parallel (DistributedDataParallel; --batch-size is the global "
    "batch); only rank 0 writes files."
)


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--channels must be comma-separated positive ints like 32,64,128, got {text!r}"
        ) from None
    return channels


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--labels", required=True, help="label directory (tokenprune explain)")
    parser.add_argument("--out", required=True, help="mapper file to write, *.safetensors")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step (128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="validation share, in (0, 1) (0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="init, split and batch order (0)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda[:N]; under torchrun/srun cuda is each rank's local GPU",
    )
    parser.add_argument(
        "--channels",
        type=_channels,
        default=None,
        help="mapper block widths, comma-separated (default 32,64,128,256,512)",
    )
    parser.add_argument("--kernel-size", type=int, default=None, help="odd conv width (5)")
    parser.add_argument("--input-eps", type=float, default=None, help="input log eps (1e-4)")
    parser.add_argument(
        "--attention-channels",
        type=int,
        default=1,
        help="mapper input: 1 (default) the head-mean layer-0 attention (the paper's input); G > "
        "1 the attention per group of query heads (G = the model's KV heads: one channel per "
        "GQA group; needs labels with per-head attention)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="mapper input: also each visual token's normalised grid row and column (needs "
        "labels with grid positions)",
    )
    parser.add_argument(
        "--bucket",
        action="store_true",
        help="batch samples of similar length together (less padding, faster)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="split batches whose padded B*N exceeds this into micro-batches (same step)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log", default=None, help="log path (default OUT -> *.train.json)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="training state written after every epoch (default OUT -> *.ckpt.safetensors)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if it exists (same settings; --epochs may grow)",
    )
    parser.set_defaults(func=cmd_train_mapper)
    return parser


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train-mapper`` to a parser's subcommands; its ``func`` is :func:`cmd_train_mapper`."""
    parser = subparsers.add_parser(
        "train-mapper",
        help="train a mapper on label shards (tokenprune explain)",
        description=_DESCRIPTION,
    )
    return _configure(parser)


def _error(message: str) -> int:
    print(f"tokenprune train-mapper: error: {message}", file=sys.stderr)
    return 2


def cmd_train_mapper(args: argparse.Namespace) -> int:
    """Run ``train-mapper`` with parsed arguments; returns the exit code (0, or 2 on bad input)."""
    import torch

    from tokenprune_kernels.distributed import detect_env, process_group, rank_device
    from tokenprune_kernels.mapper import MapperConfig

    from .checkpoint import checkpoint_path_for
    from .train import TrainConfig, log_path_for, train_mapper_from_labels

    argv = getattr(args, "argv", None)
    command = None
    if argv is not None:
        argv = list(argv)
        if not argv or argv[0] != "train-mapper":
            argv = ["train-mapper", *argv]
        command = "tokenprune " + " ".join(shlex.quote(a) for a in argv)
    try:
        env = detect_env()
        device = rank_device(env, args.device)
        defaults = MapperConfig()
        mapper = MapperConfig(
            channels=defaults.channels if args.channels is None else args.channels,
            kernel_size=defaults.kernel_size if args.kernel_size is None else args.kernel_size,
            input_eps=defaults.input_eps if args.input_eps is None else args.input_eps,
            attention_channels=args.attention_channels,
            grid=args.grid,
        )
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            device=str(device),
            bucket=args.bucket,
            max_batch_tokens=args.max_batch_tokens,
            mapper=mapper,
        )
    except (ValueError, TypeError) as err:
        return _error(f"bad option: {err} (see --help)")
    if args.threads < 0:
        return _error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or checkpoint_path_for(args.out)
    try:
        with process_group(env, "nccl" if device.type == "cuda" else "gloo"):
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)
            result = train_mapper_from_labels(
                args.labels,
                args.out,
                config,
                progress=not args.no_progress,
                printer=lambda line: print(line, flush=True),
                command=command,
                log_path=args.log,
                checkpoint=checkpoint,
                resume=args.resume,
            )
    except (FileNotFoundError, ValueError) as err:
        return _error(str(err))
    if not env.is_main:
        return 0
    best = result.best
    log = args.log or log_path_for(args.out)
    print(
        f"best epoch {result.best_epoch}: val_kl {best['val_kl']:.4f}  "
        f"val_recall@50% {best['val_recall@50%']:.4f}  val_recall@25% "
        f"{best['val_recall@25%']:.4f}\nwrote {args.out} (+ .json config), {log} and {checkpoint}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train-mapper`` on ``argv`` (the arguments after the subcommand name)."""
    from tokenprune_kernels.cli import run_subcommand

    return run_subcommand("train-mapper", argv)


if __name__ == "__main__":
    raise SystemExit(main())
