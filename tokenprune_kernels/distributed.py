"""Which process of a multi-process run this is: torchrun's or srun's environment, the device of
each rank, and the process group of the run.

``tokenprune explain`` and ``tokenprune train-mapper`` run as one process, or as ``N`` processes
started by ``torchrun`` or SLURM's ``srun``:

- torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
  they are used as they are (``env://`` rendezvous).
- srun sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (read when ``RANK`` is
  absent). The process group then meets at ``tcp://$MASTER_ADDR:$MASTER_PORT``: the job script
  exports ``MASTER_ADDR`` (the first node of the job; SLURM does not set it) and may export
  ``MASTER_PORT`` (default 29500).
- Neither: one process, rank 0 of 1.

Nothing here queries a device or opens a connection at import time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_MASTER_PORT",
    "DistEnv",
    "detect_env",
    "process_group",
    "rank_device",
    "write_bytes_atomic",
    "write_json_atomic",
]

#: ``MASTER_PORT`` under srun when the job script sets none.
DEFAULT_MASTER_PORT = 29500

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes (``1``: a plain single-process run).
        local_rank: rank on this node (picks the GPU).
        launcher: ``"torchrun"``, ``"slurm"`` or ``"none"``.
        master_addr, master_port: where the process group meets (srun only; torchrun's are
            read by ``env://``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that writes shared files where only one may)."""
        return self.rank == 0

    def describe(self) -> str:
        """``rank 1/4 (torchrun, local rank 1)`` for messages."""
        if not self.distributed:
            return "single process"
        return f"rank {self.rank}/{self.world_size} ({self.launcher}, local rank {self.local_rank})"


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int:
    text = environ.get(name)
    if text is None or text.strip() == "":
        raise ValueError(f"environment variable {name} must be set (an int >= {minimum})")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name} must be >= {minimum}, got {value}")
    return value


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's rank from torchrun's variables, else srun's, else a single process.

    Args:
        environ: the environment (default ``os.environ``).

    Raises:
        ValueError: a variable that is not an int in range, ``RANK`` without ``WORLD_SIZE`` (or
            the like), a rank outside ``[0, world_size)``, or a multi-task srun step without
            ``MASTER_ADDR`` / with a bad ``MASTER_PORT``.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in _TORCHRUN_VARS):
        rank = _int_var(env, "RANK", 0)
        world = _int_var(env, "WORLD_SIZE", 1)
        local = _int_var(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else rank
        launcher, addr, port = "torchrun", None, None
    elif "SLURM_PROCID" in env:
        rank = _int_var(env, "SLURM_PROCID", 0)
        world = _int_var(env, "SLURM_NTASKS", 1)
        local = _int_var(env, "SLURM_LOCALID", 0) if "SLURM_LOCALID" in env else 0
        launcher, addr, port = "slurm", None, None
        if world > 1:
            addr = env.get("MASTER_ADDR", "").strip()
            if not addr:
                raise ValueError(
                    f"srun started {world} tasks (SLURM_NTASKS) but MASTER_ADDR is not set: "
                    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head '
                    "-n 1) in the job script (and MASTER_PORT, default "
                    f"{DEFAULT_MASTER_PORT})"
                )
            port = DEFAULT_MASTER_PORT
            if env.get("MASTER_PORT", "").strip():
                port = _int_var(env, "MASTER_PORT", 1)
    else:
        return DistEnv()
    if rank >= world:
        raise ValueError(f"rank {rank} is not below the world size {world} ({launcher})")
    return DistEnv(rank, world, local, launcher, addr, port)


def rank_device(env: DistEnv, device: str | None) -> torch.device:
    """The device this rank computes on.

    Args:
        env: from :func:`detect_env`.
        device: ``None`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            In a multi-process run ``"cuda"`` means GPU ``local_rank`` (or GPU 0 when each task
            sees a single GPU, as with ``srun --gpus-per-task=1``); ``"cuda:N"`` is refused
            there (every rank would use GPU N).

    Raises:
        ValueError: CUDA asked for but not visible, ``cuda:N`` in a multi-process run, or fewer
            visible GPUs than ranks on this node.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no CUDA GPU is visible")
    if not env.distributed:
        return dev
    if dev.index is not None:
        raise ValueError(
            f"device {device} names one GPU for every rank; use --device cuda (each rank takes "
            "the GPU of its local rank)"
        )
    count = torch.cuda.device_count()
    if env.local_rank < count:
        return torch.device("cuda", env.local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise ValueError(
        f"local rank {env.local_rank} but only {count} GPUs are visible on this node: start at "
        "most one process per GPU"
    )


@contextlib.contextmanager
def process_group(
    env: DistEnv, backend: str, timeout: datetime.timedelta | None = None
) -> Iterator[None]:
    """Join the run's ``torch.distributed`` process group for the block (nothing for one process).

    Args:
        env: from :func:`detect_env`.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        timeout: of the rendezvous and of every collective (torch's default when None).

    Raises:
        RuntimeError: the other processes never joined (the message says which rank waited).
    """
    if not env.distributed:
        yield
        return
    import torch.distributed as dist

    kwargs = {} if timeout is None else {"timeout": timeout}
    init_method = "env://"
    if env.launcher == "slurm":
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=env.rank, world_size=env.world_size, **kwargs
        )
    except RuntimeError as err:  # DistStoreError and friends: a rank that never came
        raise RuntimeError(
            f"{env.describe()}: the {env.world_size} processes did not meet at {init_method} "
            f"({err}); under SLURM start them with srun (one task per GPU), not from the batch "
            "script itself"
        ) from err
    try:
        yield
    finally:
        dist.destroy_process_group()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    The bytes go to a temporary name in the same directory (unique per process), are flushed
    (and ``fsync``-ed unless ``fsync=False``), then renamed over ``path`` (``os.replace``): a
    process killed at any point leaves either the old file or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike[str], data: Any, fsync: bool = True) -> None:
    """:func:`write_bytes_atomic` of ``data`` as indented JSON."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), fsync)
