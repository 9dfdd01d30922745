"""Mapper training: loss, metrics, the loop, checkpoints and the JSON log.

Per sample of ``n`` visual tokens the target ``t`` is the label with its lowest 50% zeroed and
renormalised (:func:`~tokenprune_kernels.training.data.make_target`); the mapper gives logits
``z`` (``[n]``) from the stored layer-0 attention signal; the loss is

    KL(t || softmax(z)) = sum_i t_i * (log t_i - log_softmax(z)_i)     (0 log 0 = 0)

averaged over the samples of a batch. Metrics on the validation split after every epoch: the
mean KL and the top-k recall at 50% and 25%: with ``k`` the contract's keep count for that ratio,
the fraction of the label's top-``k`` tokens that are among the mapper's top-``k`` (ties broken
as ``select_topk`` breaks them), averaged over samples. The checkpoint with the lowest validation
KL is saved with :func:`~tokenprune_kernels.mapper.save_mapper`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenprune_kernels.distributed import write_json_atomic
from tokenprune_kernels.labels import read_label_metadata, read_labels
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper
from tokenprune_kernels.mapper.io import config_path_for

from .checkpoint import Checkpoint, load_checkpoint
from .data import (
    PackedSamples,
    batch_indices,
    keep_count,
    prepare_samples,
    split_indices,
    topk_mask,
)

__all__ = [
    "RECALL_RATIOS",
    "TrainConfig",
    "TrainResult",
    "attention_baseline",
    "evaluate",
    "kl_per_sample",
    "log_path_for",
    "recall_at",
    "train_mapper",
    "train_mapper_from_labels",
]

#: Keep ratios of the recall metrics (the method's two operating points).
RECALL_RATIOS = (0.5, 0.25)

_LOG_SUFFIX = ".train.json"


def _metric_name(ratio: float) -> str:
    return f"recall@{round(ratio * 100)}%"


def log_path_for(out: str | os.PathLike[str]) -> Path:
    """The training log beside a mapper file: ``mapper.safetensors`` -> ``mapper.train.json``."""
    return config_path_for(out).with_suffix(_LOG_SUFFIX)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_mapper`.

    Attributes:
        epochs: passes over the training split (>= 1; the method used about 100).
        batch_size: samples per optimiser step (>= 1; the method used 128).
        lr: Adam learning rate (> 0).
        val_fraction: validation share of the usable samples, in (0, 1).
        seed: seeds the mapper's initialisation, the split and the batch order.
        device: where the mapper trains (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        bucket: batch samples of similar length together (less padding; see
            :func:`~tokenprune_kernels.training.data.batch_indices`).
        max_batch_tokens: if set, a batch whose padded size ``B * N`` exceeds it is run as
            several micro-batches (by length) whose gradients add up to the batch's: the same
            step, less memory.
        mapper: the mapper's shape.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    bucket: bool = False
    max_batch_tokens: int | None = None
    mapper: MapperConfig = field(default_factory=MapperConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        lr = self.lr
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not (math.isfinite(lr) and lr > 0)
        ):
            raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {vf!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        mbt = self.max_batch_tokens
        if mbt is not None and (isinstance(mbt, bool) or not isinstance(mbt, int) or mbt < 1):
            raise ValueError(f"max_batch_tokens must be an int >= 1 or None, got {mbt!r}")
        if not isinstance(self.mapper, MapperConfig):
            raise TypeError(f"mapper must be a MapperConfig, got {type(self.mapper).__name__}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be a torch device string, got {self.device!r}") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the mapper config as :meth:`MapperConfig.to_dict`)."""
        out = asdict(self)
        out["mapper"] = self.mapper.to_dict()
        return out


def kl_per_sample(logits: Tensor, target: Tensor, lengths: Tensor) -> Tensor:
    """``KL(target || softmax(logits))`` of each padded row.

    Args:
        logits: ``[B, N]`` float32 mapper logits (padding: any finite value).
        target: ``[B, N]`` float32, each row's valid part sums to 1, padding 0.
        lengths: ``[B]`` integer, ``>= 1``.

    Returns:
        ``[B]`` float32, ``sum_i t_i (log t_i - log_softmax(z)_i)`` over each row's valid
        positions (``0 log 0 = 0``). Differentiable in ``logits``.
    """
    width = logits.shape[1]
    valid = torch.arange(width, device=logits.device).unsqueeze(0) < lengths.unsqueeze(1)
    log_q = torch.log_softmax(torch.where(valid, logits, float("-inf")), dim=1)
    # where target is 0 the term is 0, whatever log_q is (even -inf after an underflow)
    cross = torch.where(valid & (target > 0), target * log_q, 0.0)
    return (torch.xlogy(target, target) - cross).sum(dim=1)


def recall_at(scores: Tensor, label: Tensor, lengths: Tensor, ratio: float) -> Tensor:
    """Top-k recall of each padded row: the share of the label's top-k found in the scores' top-k.

    ``scores``, ``label``: ``[B, N]`` float; ``lengths``: ``[B]`` (>= 1); ``k`` per row is the
    contract's keep count at ``ratio``. Returns ``[B]`` float32 in [0, 1].
    """
    k = keep_count(lengths.cpu(), ratio).to(scores.device)
    hit = topk_mask(scores, lengths, k) & topk_mask(label, lengths, k)
    return hit.sum(dim=1).float() / k.float()


def _grid(samples: PackedSamples, indices: Tensor, device: torch.device) -> Tensor | None:
    """The padded grid input of ``samples[indices]`` on ``device`` (None without a grid)."""
    grid = samples.collate_grid(indices)
    return None if grid is None else grid.to(device)


def _micro_batches(batch: Tensor, lengths: Tensor, max_tokens: int | None) -> list[Tensor]:
    """Split one batch (``[B]`` sample indices) so that each part's padded size is bounded."""
    if max_tokens is None or batch.numel() * int(lengths[batch].max()) <= max_tokens:
        return [batch]
    batch = batch[torch.sort(lengths[batch], stable=True).indices]
    parts: list[Tensor] = []
    start = 0
    for end in range(1, batch.numel() + 1):
        # sorted by length: batch[start:end] pads to (end - start) * length of batch[end - 1]
        if end - start > 1 and (end - start) * int(lengths[batch[end - 1]]) > max_tokens:
            parts.append(batch[start : end - 1])
            start = end - 1
    parts.append(batch[start:])
    return parts


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the initialised process group (0, 1 without)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the processes of the group (as is for one process)."""
    if _rank_world()[1] == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@torch.no_grad()
def evaluate(
    model: TokenMapper,
    samples: PackedSamples,
    indices: Tensor,
    batch_size: int = 128,
    max_batch_tokens: int | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` on ``samples[indices]`` (``[M]`` int64, ``M >= 1``).

    Returns ``{"kl": mean KL, "recall@50%": ..., "recall@25%": ...}`` (means over samples),
    computed on the model's device. Inside an initialised process group every process scores
    every ``world_size``-th sample and the sums are added up over the processes (all of them must
    call it, with the same arguments); every process gets the same result.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = _rank_world()
    names = ["kl", *(_metric_name(r) for r in RECALL_RATIOS)]
    sums = dict.fromkeys(names, 0.0)
    lengths_all = samples.lengths
    share = indices[rank::world] if world > 1 else indices
    for batch in batch_indices(share, batch_size) if share.numel() else []:
        for part in _micro_batches(batch, lengths_all, max_batch_tokens):
            attn, target, label, lengths = (t.to(device) for t in samples.collate(part))
            logits = model(attn, lengths, _grid(samples, part, device))
            sums["kl"] += float(kl_per_sample(logits, target, lengths).double().sum())
            for ratio in RECALL_RATIOS:
                recall = recall_at(logits, label, lengths, ratio)
                sums[_metric_name(ratio)] += float(recall.double().sum())
    model.train(was_training)
    totals = _sum_over_ranks([sums[k] for k in names], device)
    return {key: value / indices.numel() for key, value in zip(names, totals, strict=True)}


def attention_baseline(samples: PackedSamples, indices: Tensor) -> dict[str, float]:
    """Recall of the raw attention signal (the training-free score) on ``samples[indices]``.

    Returns ``{"recall@50%": ..., "recall@25%": ...}``: what a mapper must beat.
    """
    sums = {_metric_name(r): 0.0 for r in RECALL_RATIOS}
    for batch in batch_indices(indices, 256):
        attn, _, label, lengths = samples.collate(batch)
        if attn.dim() == 3:  # per-head-group means: the training-free score is their mean
            attn = attn.mean(-1)
        for ratio in RECALL_RATIOS:
            sums[_metric_name(ratio)] += float(recall_at(attn, label, lengths, ratio).sum())
    return {key: value / indices.numel() for key, value in sums.items()}


@dataclass
class TrainResult:
    """What :func:`train_mapper` returns.

    Attributes:
        model: the best mapper (lowest validation KL), on the training device, in eval mode.
        history: one dict per epoch: ``epoch``, ``train_loss``, ``val_kl``, ``val_recall@50%``,
            ``val_recall@25%``, ``seconds``.
        best_epoch: 1-based epoch of ``model``.
        initial: validation metrics of the untrained mapper.
        baseline: validation recall of the raw attention signal.
        log: the JSON log (also written to ``log_path`` when one was given).
    """

    model: TokenMapper
    history: list[dict[str, float]]
    best_epoch: int
    initial: dict[str, float]
    baseline: dict[str, float]
    log: dict[str, Any]

    @property
    def best(self) -> dict[str, float]:
        """The history entry of :attr:`best_epoch`."""
        return self.history[self.best_epoch - 1]


def _save_mapper_atomic(model: TokenMapper, out: Path) -> None:
    """save_mapper to temporary names beside ``out``, then rename both files into place."""
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.safetensors")
    save_mapper(model, tmp)
    os.replace(config_path_for(tmp), config_path_for(out))
    os.replace(tmp, out)


def _versions() -> dict[str, str]:
    import tokenprune_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenprune_kernels": tokenprune_kernels.__version__,
    }


def _train_step(
    net: torch.nn.Module,
    batch: Tensor,
    samples: PackedSamples,
    max_batch_tokens: int | None,
    device: torch.device,
) -> float:
    """Gradients of one optimiser step over the GLOBAL ``batch``; returns its mean loss.

    One process: the batch, split into micro-batches when ``max_batch_tokens`` asks for it.
    Under DistributedDataParallel (``net``) process ``r`` of ``W`` takes ``batch[r::W]`` and
    scales its summed KL by ``W / len(batch)``: DDP averages the processes' gradients, so the step
    is that of the mean over the global batch, as one process takes it. Only the last micro-batch
    of a process synchronises; a process whose share is empty (a batch smaller than the world)
    runs a zero-weighted pass so that every process joins the gradient all-reduce.
    """
    rank, world = _rank_world()
    share = batch[rank::world] if world > 1 else batch
    lengths_all = samples.lengths
    parts = _micro_batches(share, lengths_all, max_batch_tokens) if share.numel() else []
    batch_loss = 0.0
    if not parts:  # a real sample of the batch, weighted 0: inputs of the mapper's shape
        attn, _, _, lengths = (t.to(device) for t in samples.collate(batch[:1]))
        net(attn, lengths, _grid(samples, batch[:1], device)).sum().mul(0.0).backward()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        sync = contextlib.nullcontext() if world == 1 or last else net.no_sync()
        with sync:
            attn, target, _, lengths = (t.to(device) for t in samples.collate(part))
            kl = kl_per_sample(net(attn, lengths, _grid(samples, part, device)), target, lengths)
            loss = kl.sum() / batch.numel()
            if world > 1:
                loss = loss * world
            loss.backward()
            batch_loss += float(kl.detach().sum() / batch.numel())
    return _sum_over_ranks([batch_loss], device)[0]


def train_mapper(
    samples: PackedSamples,
    config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log_extra: dict[str, Any] | None = None,
    printer: Callable[[str], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a :class:`TokenMapper` on packed samples with Adam and a validation split.

    Inside an initialised ``torch.distributed`` process group (``tokenprune train-mapper`` under
    torchrun or srun) the mapper trains data-parallel (DistributedDataParallel): every process
    builds the same batches (same seed), takes its share of each, and the step is the one a
    single process takes on the whole batch (``config.batch_size`` is the global batch); up to
    float rounding, the result is the single-process one. Only rank 0 writes ``out``, the log and
    the checkpoint and calls ``printer``.

    Args:
        samples: from :func:`~tokenprune_kernels.training.data.prepare_samples`.
        config: :class:`TrainConfig` (defaults: the method's settings).
        out: if given, a ``.safetensors`` path; the best-by-validation-KL mapper is saved there
            (and its ``.json`` config beside it) whenever it improves, atomically.
        log_path: if given, the JSON log is rewritten there after every epoch.
        progress: show a tqdm progress bar per epoch.
        log_extra: extra JSON-ready entries for the log (label dir, command, ...).
        printer: called with one line per epoch (and a header); None prints nothing.
        checkpoint: if given, the training state is saved there after every epoch
            (:mod:`~tokenprune_kernels.training.checkpoint`).
        resume: continue from ``checkpoint`` when that file exists (it must have been written
            with the same settings but ``epochs`` and ``device``); start afresh when it does not.

    Returns:
        :class:`TrainResult`. The same ``samples`` and ``config`` on the same device give
        bitwise-identical weights on the CPU (run to run; cuDNN is set deterministic on CUDA),
        also when the run was stopped after an epoch and resumed from its checkpoint.

    Raises:
        ValueError: too few samples for the split, a bad ``out`` suffix, CUDA asked for but not
            available, a non-finite loss (lower ``lr``), a checkpoint of other settings.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but no CUDA GPU is visible")
    if out is not None:
        out = Path(out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"out must end with '.safetensors', got '{out}'")
        out.parent.mkdir(parents=True, exist_ok=True)
    log_path = None if log_path is None else Path(log_path)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if resume and checkpoint is None:
        raise ValueError("resume needs a checkpoint path")
    groups = 1 if samples.attn.dim() == 1 else samples.attn.shape[1]
    if (
        groups != config.mapper.attention_channels
        or (samples.grid is not None) != config.mapper.grid
    ):
        raise ValueError(
            f"the samples hold {groups} attention channel(s) "
            f"{'with' if samples.grid is not None else 'without'} a grid, the mapper config asks "
            f"for attention_channels={config.mapper.attention_channels}, grid={config.mapper.grid}"
        )
    rank, world = _rank_world()
    main = rank == 0
    say = (printer if main else None) or (lambda line: None)

    train_idx, val_idx = split_indices(len(samples), config.val_fraction, config.seed)
    lengths_all = samples.lengths
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TokenMapper(config.mapper)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batch_gen = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict[str, float]] = []
    best_kl = math.inf
    best_epoch = 0
    best_state: dict[str, Tensor] | None = None
    start_epoch = 0
    resumed = None
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, config.to_dict())
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        batch_gen.set_state(state.batch_rng)
        torch.set_rng_state(state.torch_rng)
        history, start_epoch = state.history, state.epoch
        best_kl, best_epoch = state.best_kl, state.best_epoch
        best_state = {k: v.to(device) for k, v in state.best.items()} or None
        initial, baseline = state.initial, state.baseline
        resumed = {"checkpoint": str(checkpoint), "epoch": state.epoch, "world_size": world}
    else:
        baseline = attention_baseline(samples, val_idx)
        initial = evaluate(model, samples, val_idx, config.batch_size, config.max_batch_tokens)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    log: dict[str, Any] = {
        "format": "tokenprune mapper training log v1",
        **(log_extra or {}),
        "out": None if out is None else str(out),
        "versions": _versions(),
        "device": str(device),
        "world_size": world,
        "config": config.to_dict(),
        "samples": {
            "usable": len(samples),
            "train": int(train_idx.numel()),
            "val": int(val_idx.numel()),
            "train_tokens": int(lengths_all[train_idx].sum()),
            "val_tokens": int(lengths_all[val_idx].sum()),
            "val_ids_head": [samples.ids[i] for i in val_idx[:20].tolist()],
        },
        "val_attention_baseline": baseline,
        "val_initial": initial,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "resumed": resumed,
        "epochs": history,
        "best_epoch": best_epoch or None,
        "best": history[best_epoch - 1] if best_epoch else None,
    }
    say(
        f"training a mapper {config.mapper.channels} k={config.mapper.kernel_size} on "
        f"{train_idx.numel()} samples ({log['samples']['train_tokens']} tokens), validating on "
        f"{val_idx.numel()}; device {device}"
        + (f", {world} processes (DistributedDataParallel)" if world > 1 else "")
    )
    if resumed:
        say(f"resumed from '{checkpoint}' after epoch {start_epoch}")
    say(
        "val before training: "
        + "  ".join(f"{k} {v:.4f}" for k, v in initial.items())
        + "  | raw attention: "
        + "  ".join(f"{k} {v:.4f}" for k, v in baseline.items())
    )

    from tqdm.auto import tqdm

    cudnn_flags = torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True
    )
    with cudnn_flags, warnings.catch_warnings():
        # The depthwise weights' gradients ([C, 1, K]) come with another stride on the size-1
        # axis than DDP's bucket views: the same layout, which DDP copies with a warning.
        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            model.train()
            loss_sum = 0.0
            batches = batch_indices(
                train_idx, config.batch_size, batch_gen, lengths_all, bucket=config.bucket
            )
            bar = tqdm(
                total=int(train_idx.numel()),
                desc=f"epoch {epoch}/{config.epochs}",
                unit="sample",
                disable=not progress or not main,
                leave=False,
                file=sys.stderr,
            )
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                batch_loss = _train_step(net, batch, samples, config.max_batch_tokens, device)
                if not math.isfinite(batch_loss):
                    bar.close()
                    raise ValueError(
                        f"training diverged: non-finite loss in epoch {epoch}; lower the "
                        f"learning rate (lr={config.lr})"
                    )
                optimizer.step()
                loss_sum += batch_loss * batch.numel()
                bar.update(batch.numel())
                bar.set_postfix(loss=f"{batch_loss:.4f}")
            bar.close()
            metrics = evaluate(model, samples, val_idx, config.batch_size, config.max_batch_tokens)
            if not math.isfinite(metrics["kl"]):
                raise ValueError(
                    f"training diverged: non-finite validation KL after epoch {epoch}; lower the "
                    f"learning rate (lr={config.lr})"
                )
            entry = {
                "epoch": epoch,
                "train_loss": loss_sum / train_idx.numel(),
                **{f"val_{k}": v for k, v in metrics.items()},
                "seconds": time.perf_counter() - started,
            }
            history.append(entry)
            improved = metrics["kl"] < best_kl
            if improved:
                best_kl, best_epoch = metrics["kl"], epoch
                best_state = copy.deepcopy(model.state_dict())
                if out is not None and main:
                    _save_mapper_atomic(model, out)
            log["epochs"] = history
            log["best_epoch"] = best_epoch
            log["best"] = history[best_epoch - 1] if best_epoch else None
            if main and checkpoint is not None:
                Checkpoint(
                    epoch=epoch,
                    model=model.state_dict(),
                    best=best_state or {},
                    best_epoch=best_epoch,
                    best_kl=best_kl,
                    optimizer=optimizer.state_dict(),
                    batch_rng=batch_gen.get_state(),
                    torch_rng=torch.get_rng_state(),
                    history=history,
                    initial=initial,
                    baseline=baseline,
                    config=config.to_dict(),
                    world_size=world,
                ).save(checkpoint)
            if main and log_path is not None:
                write_json_atomic(log_path, log, fsync=False)
            say(
                f"epoch {epoch}/{config.epochs}  train_loss {entry['train_loss']:.4f}  "
                f"val_kl {metrics['kl']:.4f}  "
                + "  ".join(
                    f"val_{_metric_name(r)} {metrics[_metric_name(r)]:.4f}" for r in RECALL_RATIOS
                )
                + f"  {entry['seconds']:.1f}s"
                + ("  *best" if improved else "")
            )

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, history, best_epoch, initial, baseline, log)


def train_mapper_from_labels(
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    progress: bool = False,
    printer: Callable[[str], None] | None = None,
    command: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Read a label directory, train a mapper, save it to ``out`` and the log beside it.

    Args:
        labels: label directory written by ``tokenprune explain`` (see
            :mod:`tokenprune_kernels.labels`).
        out: ``.safetensors`` path of the best mapper (``.json`` config beside it); the log goes
            to :func:`log_path_for` ``(out)`` unless ``log_path`` is given.
        config, progress, printer, checkpoint, resume: as :func:`train_mapper`.
        command: the command line, recorded in the log.

    Raises:
        FileNotFoundError: ``labels`` does not exist.
        ValueError: no shards, a bad ``out`` suffix, too few usable samples, and the errors of
            :func:`train_mapper`.
    """
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"out must end with '.safetensors', got '{out}'")
    config = TrainConfig() if config is None else config
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but no CUDA GPU is visible")
    say = (printer if _rank_world()[0] == 0 else None) or (lambda line: None)
    label_meta = read_label_metadata(labels)
    records = read_labels(labels)
    samples, skipped = prepare_samples(
        records, config.mapper.attention_channels, config.mapper.grid
    )
    say(
        f"read {len(records)} samples from '{labels}': {len(samples)} usable, skipped "
        f"{skipped.empty} empty and {skipped.all_zero_label} with an all-zero label"
    )
    del records
    extra = {
        "command": command,
        "labels": {
            "path": str(Path(labels).resolve()),
            "metadata": label_meta,
            "records": len(samples) + skipped.total,
            "skipped_empty": skipped.empty,
            "skipped_all_zero_label": skipped.all_zero_label,
        },
    }
    result = train_mapper(
        samples,
        config,
        out=out,
        log_path=log_path_for(out) if log_path is None else log_path,
        progress=progress,
        log_extra=extra,
        printer=printer,
        checkpoint=checkpoint,
        resume=resume,
    )
    return result
