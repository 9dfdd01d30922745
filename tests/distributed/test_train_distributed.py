"""``tokenprune train-mapper`` under torchrun (2 processes, DDP on gloo) takes the steps one
process takes on the same global batches; its checkpoint resumes in a single process."""

from __future__ import annotations

import json

import pytest
import torch
from _launch import torchrun

from tokenprune_kernels.mapper import load_mapper
from tokenprune_kernels.training.cli import main as train_main
from tokenprune_kernels.training.synthetic import write_synthetic_labels

# 61 samples -> 55 train, 6 val. Batches of 9: the last holds 1 sample, so rank 1's share of it
# is empty; --max-batch-tokens splits the larger shares into micro-batches.
OPTIONS = ["--batch-size", "9", "--channels", "4,8", "--lr", "3e-3", "--no-progress",
           "--max-batch-tokens", "120"]  # fmt: skip


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    write_synthetic_labels(out, 61, min_tokens=8, max_tokens=40, seed=4)
    return out


def _close_mappers(a, b) -> None:
    """Same weights up to float rounding. The head bias gets a zero gradient (softmax ignores a
    shift), so Adam moves it by rounding noise: compare the logits up to their mean instead."""
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if name != "head.bias":
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 17, generator=gen)
    lengths = torch.tensor([17, 5, 11])
    with torch.no_grad():
        diff = a(attn, lengths) - b(attn, lengths)
    valid = torch.arange(17) < lengths.unsqueeze(1)
    diff = torch.where(valid, diff - (diff * valid).sum(1, keepdim=True) / lengths[:, None], 0.0)
    assert diff.abs().max() < 1e-4


def _log(out):
    return json.loads(out.with_suffix(".train.json").read_text())


@pytest.mark.slow
def test_distributed_training_equals_single_process(label_dir, tmp_path):
    one = tmp_path / "one" / "m.safetensors"
    args = ["--labels", str(label_dir), "--epochs", "2", *OPTIONS]
    assert train_main([*args, "--out", str(one)]) == 0
    two = tmp_path / "two" / "m.safetensors"
    run = torchrun(["-m", "tokenprune_kernels", "train-mapper", *args, "--out", str(two)])
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("best epoch 2") == 1  # rank 0 alone reports
    assert "2 processes (DistributedDataParallel)" in run.stdout

    _close_mappers(load_mapper(one), load_mapper(two))
    log1, log2 = _log(one), _log(two)
    assert (log1["world_size"], log2["world_size"]) == (1, 2)
    for e1, e2 in zip(log1["epochs"], log2["epochs"], strict=True):
        for key in ("train_loss", "val_kl", "val_recall@50%", "val_recall@25%"):
            assert e2[key] == pytest.approx(e1[key], rel=1e-5, abs=1e-6), key
    assert sorted(p.name for p in two.parent.iterdir()) == [
        "m.ckpt.safetensors",
        "m.json",
        "m.safetensors",
        "m.train.json",
    ]

    # the 2-process checkpoint continues in one process as the single-process run would
    three = tmp_path / "three" / "m.safetensors"
    assert train_main([*args[:2], "--epochs", "3", *OPTIONS, "--out", str(three)]) == 0
    resumed = ["--epochs", "3", *OPTIONS, "--out", str(two), "--resume"]
    assert train_main(["--labels", str(label_dir), *resumed]) == 0
    _close_mappers(load_mapper(three), load_mapper(two))
    log = _log(two)
    assert log["resumed"]["epoch"] == 2 and len(log["epochs"]) == 3
    assert log["epochs"][2]["val_kl"] == pytest.approx(_log(three)["epochs"][2]["val_kl"], 1e-5)
