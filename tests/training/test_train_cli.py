"""``tokenprune train-mapper``: end to end on synthetic label shards, and every input error."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from tokenprune_kernels.labels import LabelRecord, ShardWriter
from tokenprune_kernels.mapper import MapperConfig, load_mapper
from tokenprune_kernels.training import synthetic_records
from tokenprune_kernels.training.cli import add_train_parser, cmd_train_mapper, main

FAST = ["--epochs", "2", "--batch-size", "8", "--channels", "4,8", "--no-progress"]


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    with ShardWriter(out, shard_size=25, metadata={"model": "synthetic"}) as w:
        for r in synthetic_records(60, 3, 45, seed=5):
            w.add(r)
        w.add(LabelRecord("all-zero", torch.rand(7), torch.zeros(7)))
    return out


def test_end_to_end(label_dir, tmp_path, capsys):
    out = tmp_path / "mapper.safetensors"
    rc = main(["--labels", str(label_dir), "--out", str(out), *FAST, "--kernel-size", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "60 usable, skipped 0 empty and 1 with an all-zero label" in captured.out
    assert "best epoch" in captured.out and "epoch 2/2" in captured.out
    mapper = load_mapper(out)
    assert mapper.config == MapperConfig(channels=(4, 8), kernel_size=3)
    log = json.loads((tmp_path / "mapper.train.json").read_text())
    assert log["command"].startswith("tokenprune train-mapper --labels ")
    assert log["labels"]["metadata"] == {"model": "synthetic"}
    assert log["labels"]["skipped_all_zero_label"] == 1
    assert log["samples"]["val"] == 6 and log["samples"]["train"] == 54
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert log["best"]["val_recall@25%"] == log["epochs"][log["best_epoch"] - 1]["val_recall@25%"]


def test_subcommand_wiring(label_dir, tmp_path):
    parser = argparse.ArgumentParser(prog="tokenprune")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "m.safetensors"
    argv = ["train-mapper", "--labels", str(label_dir), "--out", str(out), *FAST[:-1]]  # with bar
    args = parser.parse_args(argv)
    args.argv = argv
    assert args.func is cmd_train_mapper and args.epochs == 2 and args.channels == (4, 8)
    assert args.func(args) == 0
    log = json.loads(out.with_suffix(".train.json").read_text())
    assert log["command"].count("train-mapper") == 1
    defaults = parser.parse_args(["train-mapper", "--labels", "d", "--out", "o.safetensors"])
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.val_fraction) == (
        100,
        128,
        1e-3,
        0.1,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kernel-size", "4"], "bad option: kernel_size must be an odd int >= 1, got 4"),
        (["--channels", "8,0"], r"bad option: channels\[1\] must be a positive int, got 0"),
        (["--input-eps", "0"], "bad option: input_eps must be a finite float > 0"),
        (["--val-fraction", "1.5"], r"bad option: val_fraction must be in \(0, 1\), got 1.5"),
        (["--val-fraction", "0"], r"val_fraction must be in \(0, 1\), got 0.0"),
        (["--epochs", "0"], "bad option: epochs must be an int >= 1, got 0"),
        (["--lr", "-1"], "bad option: lr must be a finite float > 0"),
        (["--device", "tpu"], "bad option: device must be"),
        (["--threads", "-1"], "--threads must be >= 0"),
    ],
)
def test_bad_options(label_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "m.safetensors"
    rc = main(["--labels", str(label_dir), "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tokenprune train-mapper: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_paths_and_data(label_dir, tmp_path, capsys):
    def run(labels, out="m.safetensors", *extra):
        rc = main(["--labels", str(labels), "--out", str(tmp_path / out), *FAST, *extra])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "missing")
    assert rc == 2 and "label directory not found" in err
    (tmp_path / "empty").mkdir()
    rc, err = run(tmp_path / "empty")
    assert rc == 2 and "no label shards (labels-NNNNN.safetensors) in" in err
    rc, err = run(label_dir, "mapper.pt")
    assert rc == 2 and "out must end with '.safetensors', got" in err
    with ShardWriter(tmp_path / "one") as w:
        w.add(synthetic_records(1, seed=0)[0])
        w.add(LabelRecord("zero", torch.ones(3), torch.zeros(3)))
    rc, err = run(tmp_path / "one")
    assert rc == 2 and "too few samples for a train/validation split: 1 usable sample(s)" in err
    if not torch.cuda.is_available():
        rc, err = run(label_dir, "m.safetensors", "--device", "cuda")
        assert rc == 2 and "no CUDA GPU is visible" in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_argparse_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--labels", "d", "--out", "o.safetensors", "--channels", "8,x"])
    assert info.value.code == 2
    assert "--channels must be comma-separated positive ints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", "o.safetensors"])
    assert "--labels" in capsys.readouterr().err
