"""Training checkpoints: everything needed to continue a run as if it had never stopped.

One ``.safetensors`` file (no pickle), written atomically after every epoch by rank 0:

- tensors ``model.<name>`` (the current weights), ``best.<name>`` (the best epoch's weights),
  ``optim.<param index>.<key>`` (Adam's ``step``, ``exp_avg``, ``exp_avg_sq``), ``rng.batch``
  (the batch-order generator, the only randomness of an epoch) and ``rng.torch`` (torch's global
  CPU generator);
- metadata ``checkpoint``: JSON with the finished ``epoch``, the optimiser's ``param_groups``, the
  best epoch and KL, the history, the untrained and raw-attention metrics, the training config
  and the world size that wrote it.

A run resumed from it - with any number of processes, since the batches do not depend on it -
takes the same steps as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from tokenprune_kernels.distributed import write_bytes_atomic

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "checkpoint_path_for", "load_checkpoint"]

CHECKPOINT_FORMAT = "tokenprune mapper checkpoint v1"
_META_KEY = "checkpoint"
#: Config fields a resumed run may change: more epochs, another device.
_RESUMABLE_CHANGES = ("epochs", "device")


def checkpoint_path_for(out: str | os.PathLike[str]) -> Path:
    """The checkpoint beside a mapper: ``m.safetensors`` -> ``m.ckpt.safetensors``."""
    return Path(out).with_suffix(".ckpt.safetensors")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


@dataclass
class Checkpoint:
    """The state after ``epoch`` finished epochs (see the module docstring for the file).

    ``model``/``best``: state dicts (``best`` empty before any epoch); ``optimizer``: an
    ``optimizer.state_dict()``; ``batch_rng``/``torch_rng``: generator states (uint8);
    ``history``/``initial``/``baseline``: as in :class:`~.train.TrainResult`; ``config``:
    :meth:`TrainConfig.to_dict`.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    best_epoch: int
    best_kl: float
    optimizer: dict[str, Any]
    batch_rng: torch.Tensor
    torch_rng: torch.Tensor
    history: list[dict[str, float]]
    initial: dict[str, float]
    baseline: dict[str, float]
    config: dict[str, Any]
    world_size: int = 1

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint to ``path`` atomically (temporary name, fsync, rename)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for prefix, state in (("model", self.model), ("best", self.best)):
            for name, t in state.items():
                tensors[f"{prefix}.{name}"] = t.detach().to("cpu").clone().contiguous()
        for index, state in self.optimizer["state"].items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").clone().contiguous()
        tensors["rng.batch"] = self.batch_rng.clone()
        tensors["rng.torch"] = self.torch_rng.clone()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_kl": self.best_kl if math.isfinite(self.best_kl) else None,
            "param_groups": self.optimizer["param_groups"],
            "history": self.history,
            "initial": self.initial,
            "baseline": self.baseline,
            "config": self.config,
            "world_size": self.world_size,
        }
        write_bytes_atomic(path, safetensors_save(tensors, metadata={_META_KEY: json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike[str], config: dict[str, Any]) -> Checkpoint:
    """Read a checkpoint written for a run with ``config`` (:meth:`TrainConfig.to_dict`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, or written with other settings (only ``epochs`` and
            ``device`` may change between the run that wrote it and the one that resumes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except (SafetensorError, KeyError, ValueError) as err:
        raise ValueError(f"'{path}' is not a mapper training checkpoint: {err}") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' has format {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    config = json.loads(json.dumps(config))  # tuples as lists, as stored
    if _comparable(meta["config"]) != _comparable(config):
        raise ValueError(
            f"checkpoint '{path}' was written with other settings ({_comparable(meta['config'])}) "
            f"than this run ({_comparable(config)}); only --epochs and --device may change on "
            "--resume"
        )

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in section("optim").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    best_kl = meta["best_kl"]
    return Checkpoint(
        epoch=int(meta["epoch"]),
        model=section("model"),
        best=section("best"),
        best_epoch=int(meta["best_epoch"]),
        best_kl=math.inf if best_kl is None else float(best_kl),
        optimizer={"state": state, "param_groups": meta["param_groups"]},
        batch_rng=tensors["rng.batch"],
        torch_rng=tensors["rng.torch"],
        history=meta["history"],
        initial=meta["initial"],
        baseline=meta["baseline"],
        config=meta["config"],
        world_size=int(meta["world_size"]),
    )
