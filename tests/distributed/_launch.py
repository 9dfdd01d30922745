"""Launchers of real process groups on this machine for the multi-process tests:
``torchrun --standalone`` and srun's environment (``SLURM_PROCID`` / ``SLURM_NTASKS`` /
``SLURM_LOCALID``, ``MASTER_ADDR`` / ``MASTER_PORT``) set by hand for N plain processes. Every
process imports this checkout's package."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: What a launched process group may take at most (startup is ~5-10 s per process on 2 cores).
LAUNCH_TIMEOUT_S = 300
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (``ARGS``: ``-m module ...`` or a
    script and its arguments); returns the finished process (output captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def srun_like(args: list[str], ntasks: int) -> list[subprocess.CompletedProcess]:
    """``python ARGS`` as ``ntasks`` processes with the variables srun sets (one node); the job
    script's ``MASTER_ADDR``/``MASTER_PORT`` point at this machine."""
    port = _free_port()
    procs = []
    for task in range(ntasks):
        env = _child_env(
            {
                "SLURM_PROCID": str(task),
                "SLURM_NTASKS": str(ntasks),
                "SLURM_LOCALID": str(task),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=LAUNCH_TIMEOUT_S)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done
