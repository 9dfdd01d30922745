"""Mapper v2 inputs on the training side: label shards with per-head attention and grid
positions, their packing for a mapper with G attention channels (and grid), and the CLI."""

from __future__ import annotations

import pytest
import torch

from tokenprune_kernels.labels import LabelRecord, ShardWriter, read_labels
from tokenprune_kernels.mapper import MapperConfig, load_mapper
from tokenprune_kernels.training.cli import main
from tokenprune_kernels.training.data import group_heads, prepare_samples


def _record(i: int, n: int, gen: torch.Generator, extras: bool = True) -> LabelRecord:
    heads = torch.rand(n, 4, generator=gen) / n
    return LabelRecord(
        f"s{i}",
        heads.mean(1),
        torch.rand(n, generator=gen),
        {"i": i},
        heads=heads if extras else None,
        grid=torch.rand(n, 2, generator=gen) if extras else None,
    )


def test_shards_keep_heads_and_grid(tmp_path, gen):
    records = [_record(i, 3 + i, gen) for i in range(5)]
    with ShardWriter(tmp_path, shard_size=2) as w:
        for r in records:
            w.add(r)
    back = read_labels(tmp_path)
    assert [r.sample_id for r in back] == [r.sample_id for r in records]
    for a, b in zip(back, records, strict=True):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.grid, b.grid)
        assert torch.equal(a.attn, b.attn) and a.meta == b.meta


def test_shard_records_all_or_none(tmp_path, gen):
    with ShardWriter(tmp_path, shard_size=10) as w:
        w.add(_record(0, 4, gen))
        with pytest.raises(ValueError, match="a shard has them all or none"):
            w.add(_record(1, 4, gen, extras=False))
    bad = _record(2, 4, gen)
    bad.heads = -bad.heads
    with ShardWriter(tmp_path / "b") as w, pytest.raises(ValueError, match="heads >= 0"):
        w.add(bad)
    bad = _record(3, 4, gen)
    bad.grid = bad.grid[:, :1]
    with ShardWriter(tmp_path / "c") as w, pytest.raises(ValueError, match=r"\[n_v = 4, 2\]"):
        w.add(bad)


def test_group_heads_and_prepare_samples(gen):
    records = [_record(i, 5 + i, gen) for i in range(3)]
    heads = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(group_heads(heads, 2), heads.reshape(3, 2, 2).mean(-1))
    torch.testing.assert_close(group_heads(heads, 1)[:, 0], heads.mean(1))
    with pytest.raises(ValueError, match="must divide the label's 4 heads"):
        group_heads(heads, 3)
    one, _ = prepare_samples(records)
    assert one.attn.shape == (18,) and one.grid is None
    two, _ = prepare_samples(records, 2, grid=True)
    assert two.attn.shape == (18, 2) and two.grid.shape == (18, 2)
    torch.testing.assert_close(two.attn.mean(1), one.attn)
    attn, _, _, _ = two.collate(torch.tensor([2, 0]))
    grid = two.collate_grid(torch.tensor([2, 0]))
    assert attn.shape == (2, 7, 2) and grid.shape == (2, 7, 2)
    assert torch.equal(grid[1, 5:], torch.zeros(2, 2))  # padding
    torch.testing.assert_close(grid[0], records[2].grid)
    no_extras = [_record(9, 4, gen, extras=False)]
    with pytest.raises(ValueError, match="has no heads"):
        prepare_samples(no_extras, 2)
    with pytest.raises(ValueError, match="has no grid"):
        prepare_samples(no_extras, 1, grid=True)


def test_cli_trains_a_v2_mapper(tmp_path, gen, capsys):
    with ShardWriter(tmp_path / "labels", shard_size=16) as w:
        for i in range(24):
            w.add(_record(i, 6 + i % 9, gen))
    out = tmp_path / "m.safetensors"
    args = ["--labels", str(tmp_path / "labels"), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--channels", "4,8", "--no-progress"]  # fmt: skip
    assert main([*args, "--attention-channels", "2", "--grid"]) == 0, capsys.readouterr().err
    mapper = load_mapper(out)
    assert mapper.config == MapperConfig(channels=(4, 8), attention_channels=2, grid=True)
    assert main([*args, "--attention-channels", "3"]) == 2
    assert "must divide the label's 4 heads" in capsys.readouterr().err
