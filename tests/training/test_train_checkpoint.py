"""Checkpoints: a run stopped after an epoch and resumed takes bitwise the same steps."""

from __future__ import annotations

import pytest
import torch

from tokenprune_kernels.mapper import MapperConfig
from tokenprune_kernels.training import (
    TrainConfig,
    prepare_samples,
    synthetic_records,
    train_mapper,
)
from tokenprune_kernels.training.checkpoint import checkpoint_path_for, load_checkpoint


@pytest.fixture(scope="module")
def samples():
    return prepare_samples(synthetic_records(90, 5, 40, seed=2))[0]


def _config(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "val_fraction": 0.2}
    return TrainConfig(**{**base, "mapper": MapperConfig(channels=(4, 8)), **kw})


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_takes_the_same_steps(samples, tmp_path):
    straight = train_mapper(samples, _config(), checkpoint=tmp_path / "a.ckpt.safetensors")
    ckpt = tmp_path / "b.ckpt.safetensors"
    first = train_mapper(samples, _config(epochs=2), checkpoint=ckpt)
    assert load_checkpoint(ckpt, _config().to_dict()).epoch == 2
    lines: list[str] = []
    resumed = train_mapper(samples, _config(), checkpoint=ckpt, resume=True, printer=lines.append)
    assert any("resumed from" in line and "after epoch 2" in line for line in lines)
    assert _same_state(resumed.model.state_dict(), straight.model.state_dict())
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in straight.history]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in resumed.history] == strip
    assert resumed.history[:2] == first.history
    assert (resumed.best_epoch, resumed.initial) == (straight.best_epoch, straight.initial)
    a = load_checkpoint(tmp_path / "a.ckpt.safetensors", _config().to_dict())
    b = load_checkpoint(ckpt, _config().to_dict())
    assert a.epoch == b.epoch == 3 and _same_state(a.model, b.model)
    assert _same_state(a.best, b.best) and torch.equal(a.batch_rng, b.batch_rng)
    for index, state in a.optimizer["state"].items():
        assert _same_state(state, b.optimizer["state"][index])


def test_resume_without_a_checkpoint_starts_afresh_and_checks_settings(samples, tmp_path):
    ckpt = tmp_path / "m.ckpt.safetensors"
    fresh = train_mapper(samples, _config(epochs=1), checkpoint=ckpt, resume=True)
    plain = train_mapper(samples, _config(epochs=1))
    assert _same_state(fresh.model.state_dict(), plain.model.state_dict())
    assert fresh.log["resumed"] is None and ckpt.is_file()
    with pytest.raises(ValueError, match=r"written with other settings .* only --epochs and"):
        train_mapper(samples, _config(epochs=2, lr=1e-3), checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="resume needs a checkpoint path"):
        train_mapper(samples, _config(), resume=True)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a mapper training checkpoint"):
        load_checkpoint(tmp_path / "bad.safetensors", _config().to_dict())
    assert checkpoint_path_for("run/m.safetensors").as_posix() == "run/m.ckpt.safetensors"
