"""``tokenprune_kernels.distributed``: ranks from torchrun's and srun's variables, each rank's
device, the single-process no-op, atomic JSON."""

from __future__ import annotations

import json

import pytest
import torch

from tokenprune_kernels.distributed import (
    DEFAULT_MASTER_PORT,
    DistEnv,
    detect_env,
    process_group,
    rank_device,
    write_json_atomic,
)

SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node7"}


def test_distributed_env_single_process():
    env = detect_env({"PATH": "/bin"})
    assert env == DistEnv() and not env.distributed and env.is_main
    assert env.describe() == "single process"


def test_distributed_env_torchrun():
    env = detect_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", **SLURM})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (2, 4, 0, "torchrun")
    assert env.distributed and not env.is_main and env.master_addr is None
    assert env.describe() == "rank 2/4 (torchrun, local rank 0)"


def test_distributed_env_slurm_when_torchrun_vars_are_absent():
    env = detect_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "slurm")
    assert (env.master_addr, env.master_port) == ("node7", DEFAULT_MASTER_PORT)
    assert detect_env({**SLURM, "MASTER_PORT": "31000"}).master_port == 31000
    one = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # a one-task job: no group
    assert not one.distributed and one.launcher == "slurm"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE must be set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an int, got 'x'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not below the world size 2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1, got 0"),
        ({**SLURM, "MASTER_ADDR": ""}, "MASTER_ADDR is not set: export MASTER_ADDR="),
        ({**SLURM, "MASTER_PORT": "-1"}, "MASTER_PORT must be >= 1"),
        ({"SLURM_PROCID": "0"}, "SLURM_NTASKS must be set"),
    ],
)
def test_distributed_env_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        detect_env(environ)


def test_distributed_rank_device_on_cpu():
    env = DistEnv(1, 2, 1, "torchrun")
    assert rank_device(env, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'tpu'"):
        rank_device(env, "tpu")
    if not torch.cuda.is_available():
        assert rank_device(env, None) == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            rank_device(env, "cuda")


@pytest.mark.cuda
def test_distributed_rank_device_on_gpus():
    count = torch.cuda.device_count()
    assert rank_device(DistEnv(0, 2, 0, "torchrun"), "cuda") == torch.device("cuda", 0)
    assert rank_device(DistEnv(), "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="names one GPU for every rank"):
        rank_device(DistEnv(0, 2, 0, "torchrun"), "cuda:0")
    if count == 1:  # one GPU per task (srun --gpus-per-task=1): every local rank uses it
        assert rank_device(DistEnv(1, 2, 1, "slurm"), "cuda") == torch.device("cuda", 0)


def test_distributed_process_group_is_a_no_op_for_one_process():
    import torch.distributed as dist

    with process_group(DistEnv(), "gloo"):
        assert not dist.is_initialized()


def test_distributed_write_json_atomic(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": [1, 2]})
    write_json_atomic(path, {"x": 3}, fsync=False)
    assert json.loads(path.read_text()) == {"x": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": 3} and len(list(tmp_path.iterdir())) == 1
