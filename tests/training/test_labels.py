"""Label shards: write/read round trip, resume, metadata checks, atomic writes, bad records."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
from safetensors import safe_open

from tokenprune_kernels import labels as labels_mod
from tokenprune_kernels.labels import (
    LabelRecord,
    ShardWriter,
    iter_label_shards,
    label_shard_paths,
    read_label_metadata,
    read_labels,
)

META = {"model": "tiny", "model_type": "llava", "versions": {"torch": "x"}, "command": "a b"}


def _records(gen: torch.Generator, count: int, start: int = 0) -> list[LabelRecord]:
    out = []
    for i in range(start, start + count):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        out.append(
            LabelRecord(
                sample_id=f"s{i}",
                attn=torch.rand(n, generator=gen),
                label=torch.rand(n, generator=gen),
                meta={"n_visual": n, "question": f"q{i}?", "modality": "image"},
            )
        )
    return out


def _assert_same(got: list[LabelRecord], want: list[LabelRecord]) -> None:
    assert [r.sample_id for r in got] == [r.sample_id for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.attn.dtype == torch.float32 and g.label.dtype == torch.float32
        assert torch.equal(g.attn, w.attn) and torch.equal(g.label, w.label)
        assert g.meta == w.meta


def test_round_trip_shards_and_layout(tmp_path, gen):
    recs = _records(gen, 11)
    with ShardWriter(tmp_path / "out", shard_size=4, metadata=META) as w:
        for r in recs:
            w.add(r)
    paths = label_shard_paths(tmp_path / "out")
    assert [p.name for p in paths] == [f"labels-0000{i}.safetensors" for i in range(3)]
    _assert_same(read_labels(tmp_path / "out"), recs)
    assert [len(s) for s in iter_label_shards(tmp_path / "out")] == [4, 4, 3]
    assert read_label_metadata(tmp_path / "out") == META
    # the documented on-disk layout
    with safe_open(str(paths[1]), framework="pt") as f:
        md = f.metadata()
        assert json.loads(md["sample_ids"]) == ["s4", "s5", "s6", "s7"]
        assert json.loads(md["writer_metadata"]) == META
        assert md["model"] == "tiny" and json.loads(md["versions"]) == {"torch": "x"}
        cu = f.get_tensor("cu_seqlens")
        assert cu.dtype == torch.int64 and cu.tolist()[0] == 0
        assert cu.tolist()[-1] == f.get_tensor("attn").shape[0] == f.get_tensor("label").shape[0]
    # a single shard file reads too
    _assert_same(read_labels(paths[2]), recs[8:])


def test_resume_skips_done_ids_and_appends(tmp_path, gen):
    recs = _records(gen, 9)
    with ShardWriter(tmp_path, shard_size=4, metadata=META) as w:
        for r in recs[:5]:
            w.add(r)
    with ShardWriter(tmp_path, shard_size=4, metadata=dict(META)) as w:
        assert w.done_ids() == {f"s{i}" for i in range(5)}
        for r in recs:
            if r.sample_id not in w.done_ids():
                w.add(r)
        with pytest.raises(ValueError, match="'s2' is already stored"):
            w.add(recs[2])
    assert len(label_shard_paths(tmp_path)) == 3  # 4 + 1, then 4
    _assert_same(read_labels(tmp_path), recs)


def test_one_writer_per_directory(tmp_path, gen):
    """A second writer on a directory in use is refused (in this process and from another);
    closing, or failing to open, releases it. Before the lock, two writers numbered their shards
    alike and the later one overwrote the other's (records lost without an error)."""
    import subprocess
    import sys

    recs = _records(gen, 6)
    first = ShardWriter(tmp_path, shard_size=2, metadata=META)
    first.add(recs[0])
    with pytest.raises(ValueError, match=r"another ShardWriter .* separate directories"):
        ShardWriter(tmp_path, shard_size=2, metadata=META)
    code = (
        "import sys; from tokenprune_kernels.labels import ShardWriter\n"
        "try:\n    ShardWriter(sys.argv[1])\nexcept ValueError as e:\n    print(e); sys.exit(3)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 3 and "another ShardWriter" in out.stdout, out.stderr
    other = tmp_path / "other"  # another directory is free
    with ShardWriter(other, metadata=META) as w:
        w.add(recs[5])
    first.add(recs[1])
    first.close()
    with ShardWriter(tmp_path, shard_size=2, metadata=META) as w:  # released by close
        for r in recs[2:5]:
            w.add(r)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=2, metadata=META):
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="metadata mismatch"):  # a failed open releases it too
        ShardWriter(tmp_path, metadata={**META, "model": "x"})
    with ShardWriter(tmp_path, shard_size=2, metadata=META) as w:
        assert w.done_ids() == {f"s{i}" for i in range(5)}
    _assert_same(read_labels(tmp_path), recs[:5])


def test_metadata_mismatch_on_resume(tmp_path, gen):
    with ShardWriter(tmp_path, metadata=META) as w:
        w.add(_records(gen, 1)[0])
    with pytest.raises(ValueError, match="metadata mismatch"):
        ShardWriter(tmp_path, metadata={**META, "model": "other"})
    with pytest.raises(ValueError, match="metadata mismatch"):
        ShardWriter(tmp_path)


def test_interrupted_write_leaves_no_partial_shard(tmp_path, gen, monkeypatch):
    recs = _records(gen, 6)
    with ShardWriter(tmp_path, shard_size=3, metadata=META) as w:
        for r in recs[:3]:
            w.add(r)

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash between write and rename")

    w = ShardWriter(tmp_path, shard_size=3, metadata=META)
    monkeypatch.setattr(labels_mod.os, "replace", crash)
    w.add(recs[3])
    w.add(recs[4])
    with pytest.raises(KeyboardInterrupt):
        w.add(recs[5])  # the shard write fails mid-way
    monkeypatch.undo()
    del w  # the crashed writer goes away (its process would), and with it its directory lock
    gc.collect()
    assert sorted(os.listdir(tmp_path)) == ["labels-00000.safetensors"]
    _assert_same(read_labels(tmp_path), recs[:3])
    # a leftover temp file from a hard kill is ignored by readers and removed by the next writer
    (tmp_path / ".labels-tmp-00001-123").write_bytes(b"partial")
    _assert_same(read_labels(tmp_path), recs[:3])
    with ShardWriter(tmp_path, shard_size=3, metadata=META) as w:
        assert w.done_ids() == {"s0", "s1", "s2"}
        for r in recs[3:]:
            w.add(r)
    assert sorted(os.listdir(tmp_path)) == ["labels-00000.safetensors", "labels-00001.safetensors"]
    _assert_same(read_labels(tmp_path), recs)


def test_exception_in_block_keeps_completed_records(tmp_path, gen):
    recs = _records(gen, 3)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=10) as w:
        w.add(recs[0])
        w.add(recs[1])
        raise RuntimeError("model failed")
    _assert_same(read_labels(tmp_path), recs[:2])
    with pytest.raises(ValueError, match="closed"):
        w.add(recs[2])


def test_bad_records_and_arguments(tmp_path):
    w = ShardWriter(tmp_path / "d")
    good = torch.rand(5)
    with pytest.raises(ValueError, match="sample_id must be a non-empty str"):
        w.add(LabelRecord("", good, good))
    with pytest.raises(ValueError, match="same length"):
        w.add(LabelRecord("a", good, torch.rand(4)))
    with pytest.raises(ValueError, match=r"record.label of sample 'a' must be finite and >= 0"):
        w.add(LabelRecord("a", good, -good))
    with pytest.raises(ValueError, match="finite"):
        w.add(LabelRecord("a", torch.tensor([1.0, float("nan")]), torch.ones(2)))
    with pytest.raises(ValueError, match="1-D"):
        w.add(LabelRecord("a", good.view(1, 5), good.view(1, 5)))
    with pytest.raises(TypeError, match="floating point"):
        w.add(LabelRecord("a", torch.ones(3, dtype=torch.int64), torch.ones(3)))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        w.add(LabelRecord("a", good, good, {"t": torch.ones(1)}))
    assert w.done_ids() == set()
    with pytest.raises(ValueError, match="shard_size must be an int >= 1"):
        ShardWriter(tmp_path / "e", shard_size=0)
    with pytest.raises(ValueError, match="not one of"):
        ShardWriter(tmp_path / "e", metadata={"sample_ids": "x"})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ShardWriter(tmp_path / "e", metadata={"x": object()})


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="label directory not found"):
        read_labels(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no label shards"):
        read_labels(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels-00000.safetensors").write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_labels(tmp_path / "bad")
