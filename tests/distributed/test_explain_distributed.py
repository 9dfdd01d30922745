"""``tokenprune explain`` by several processes: the same labels as one process, a killed rank and
a rerun with another world size label every sample exactly once, out-of-memory samples are
recorded and retried, the merge rebuilds the output and refuses samples done twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL", reason="tokenprune explain reads images with Pillow")
from _launch import srun_like, torchrun

from tokenprune_kernels.explain import cli
from tokenprune_kernels.explain.distributed import (
    PARTS_DIR,
    assign,
    done_ids,
    read_commits,
)
from tokenprune_kernels.labels import LabelRecord, ShardWriter, label_shard_paths, read_labels
from tokenprune_kernels.testing_models.explain import make_dataset

MAX_NEW = 3
WORKER = Path(__file__).resolve().parent / "_explain_worker.py"


@pytest.fixture(scope="module")
def loaded(llava_dir):
    return cli.load_model_and_processor(llava_dir, torch.device("cpu"), torch.float32)


def _args(llava_dir, data, out, *extra):
    return ["--model", str(llava_dir), "--data", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_same_output(a: Path, b: Path) -> None:
    """Two label directories hold the same merged result (labels up to float rounding)."""
    ra, rb = read_labels(a), read_labels(b)
    assert [r.sample_id for r in ra] == [r.sample_id for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.meta == y.meta
        torch.testing.assert_close(x.attn, y.attn, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x.label, y.label, rtol=1e-5, atol=1e-7)
    assert [p.name for p in label_shard_paths(a)] == [p.name for p in label_shard_paths(b)]
    assert (a / "incorrect.jsonl").read_text() == (b / "incorrect.jsonl").read_text()
    sa, sb = _summary(a), _summary(b)
    for key in ("records", "seen", "correct", "incorrect", "oom", "missing", "rate", "finished"):
        assert sa[key] == sb[key], key
    ia, ib = (json.loads((d / "index.json").read_text())["samples"] for d in (a, b))
    strip = ("commit",)
    assert [{k: v for k, v in e.items() if k not in strip} for e in ia] == [
        {k: v for k, v in e.items() if k not in strip} for e in ib
    ]


def _done_once(out: Path, ids: list[str]) -> None:
    """Every id is recorded done by exactly one commit, and the index says so."""
    counts = dict.fromkeys(ids, 0)
    for c in read_commits(out):
        for sid in [*c.labelled, *(e["id"] for e in c.incorrect)]:
            counts[sid] += 1
    assert counts == dict.fromkeys(ids, 1)
    index = json.loads((out / "index.json").read_text())["samples"]
    assert [e["id"] for e in index] == ids
    assert all(e["status"] in ("labelled", "incorrect") for e in index)


def test_assign_partitions_what_is_left_for_any_world_size():
    ids = [f"s{i}" for i in range(11)]
    done = {"s0", "s3", "s4", "s9"}
    left = [i for i, s in enumerate(ids) if s not in done]
    for world in (1, 2, 3, 5, 8, 13):
        shares = [assign(ids, done, r, world) for r in range(world)]
        assert sorted(i for share in shares for i in share) == left
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares == [assign(ids, done, r, world) for r in range(world)]  # deterministic
    assert assign(ids, done, 1, 3) == [2, 7]  # of what is left: 1 2 5 6 7 8 10
    with pytest.raises(ValueError, match="rank must be in"):
        assign(ids, done, 3, 3)


@pytest.mark.slow
def test_distributed_explain_equals_single_process(llava_dir, loaded, tmp_path, gen):
    data, _ = make_dataset(tmp_path, gen, loaded, MAX_NEW, wrong=("s1", "s4"), n=7)
    single = tmp_path / "single"
    assert cli.main(_args(llava_dir, data, single, "--shard-size", "2")) == 0
    multi = tmp_path / "multi"
    args = _args(llava_dir, data, multi, "--shard-size", "2")
    run = torchrun(["-m", "tokenprune_kernels", "explain", *args], nproc=2)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "5 of 7 answered correctly" in run.stdout

    _assert_same_output(single, multi)
    _done_once(multi, [f"s{i}" for i in range(7)])
    summary = _summary(multi)
    assert summary["world_size"] == 2 and summary["computed"] == 7 and summary["skipped"] == 0
    assert [(r["rank"], r["assigned"], r["finished"]) for r in summary["ranks"]] == [
        (0, 4, True),
        (1, 3, True),
    ]
    by_rank: dict[int, set[str]] = {0: set(), 1: set()}
    for c in read_commits(multi):
        by_rank[c.rank].update([*c.labelled, *(e["id"] for e in c.incorrect)])
    assert by_rank == {0: {"s0", "s2", "s4", "s6"}, 1: {"s1", "s3", "s5"}}


@pytest.mark.slow
def test_distributed_explain_killed_rank_then_rerun_with_three(llava_dir, loaded, tmp_path, gen):
    """torchrun, 2 ranks; rank 1 dies between a shard and its commit. A rerun as 3 srun tasks
    computes only what no commit holds and labels every sample exactly once."""
    ids = [f"s{i}" for i in range(8)]
    data, _ = make_dataset(tmp_path, gen, loaded, MAX_NEW, wrong=("s1", "s4"), n=8)
    out = tmp_path / "labels"
    args = _args(llava_dir, data, out, "--shard-size", "2")
    run = torchrun([str(WORKER), "1", "1", *args], nproc=2)
    assert run.returncode != 0, run.stdout[-2000:]

    # rank 1 took s1 s3 s5 s7: its first chunk (s1 wrong, s3) is committed; the shard of the
    # second (s5, s7) was written, its commit never was
    commits = read_commits(out)
    (first,) = [c for c in commits if c.rank == 1]
    assert first.labelled == ("s3",) and [e["id"] for e in first.incorrect] == ["s1"]
    rank1_dir = first.path.parent
    orphan = sorted(p.name for p in rank1_dir.glob("labels-*.safetensors"))
    assert orphan == ["labels-00000.safetensors", "labels-00001.safetensors"]
    assert [r.sample_id for r in read_labels(rank1_dir / orphan[1])] == ["s5", "s7"]
    assert not (out / "summary.json").exists()  # rank 1 never finished: nobody merged
    before = done_ids(commits)
    assert {"s1", "s3"} <= before and not {"s5", "s7"} & before

    runs = srun_like(["-m", "tokenprune_kernels", "explain", *args], ntasks=3)
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    summary = _summary(out)
    assert summary["world_size"] == 3 and summary["finished"] and summary["missing"] == 0
    assert summary["skipped"] == len(before) and summary["computed"] == 8 - len(before)
    assert (summary["seen"], summary["correct"], summary["incorrect"]) == (8, 6, 2)
    _done_once(out, ids)
    index = {e["id"]: e for e in json.loads((out / "index.json").read_text())["samples"]}
    first_run = rank1_dir.name.rsplit("-rank-", 1)[0]
    for sid in ids:
        assert index[sid]["commit"].startswith(f"{PARTS_DIR}/{first_run}-") == (sid in before)

    single = tmp_path / "single"
    assert cli.main(_args(llava_dir, data, single, "--shard-size", "2")) == 0
    _assert_same_output(single, out)


def test_distributed_out_of_memory_sample_is_recorded_and_retried(
    llava_dir, loaded, tmp_path, gen, monkeypatch
):
    data, _ = make_dataset(tmp_path, gen, loaded, MAX_NEW, wrong=("s1",), n=4)
    out = tmp_path / "labels"
    real = cli.label_sample
    calls: list[str] = []
    released: list[torch.device] = []

    def out_of_memory_on_s2(model, processor, record, **kwargs):
        calls.append(record.sample_id)
        if record.sample_id == "s2":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nx")
        return real(model, processor, record, **kwargs)

    monkeypatch.setattr(cli, "label_sample", out_of_memory_on_s2)
    monkeypatch.setattr(cli, "_release_memory", released.append)
    kwargs = dict(device="cpu", max_new_tokens=MAX_NEW, progress=False)
    summary = cli.run_explain(llava_dir, data, out, **kwargs)
    assert calls == ["s0", "s1", "s2", "s3"] and released == [torch.device("cpu")]
    assert summary["finished"] and summary["oom"] == 1 and summary["oom_ids"] == ["s2"]
    assert (summary["seen"], summary["correct"], summary["incorrect"]) == (3, 2, 1)
    index = {e["id"]: e for e in json.loads((out / "index.json").read_text())["samples"]}
    assert index["s2"]["status"] == "oom"
    assert index["s2"]["error"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert [r.sample_id for r in read_labels(out)] == ["s0", "s3"]

    calls.clear()
    monkeypatch.setattr(cli, "label_sample", lambda *a, **k: calls.append(a[2].sample_id) or real(*a, **k))  # fmt: skip
    again = cli.run_explain(llava_dir, data, out, **kwargs)
    assert calls == ["s2"]  # only the sample that ran out of memory is tried again
    assert again["oom"] == 0 and again["skipped"] == 3 and again["computed"] == 1
    assert [r.sample_id for r in read_labels(out)] == ["s0", "s2", "s3"]


def test_distributed_merge_only_rebuilds_and_refuses_twice_done(
    llava_dir, loaded, tmp_path, gen, capsys
):
    data, _ = make_dataset(tmp_path, gen, loaded, MAX_NEW, wrong=("s1",), n=3)
    out = tmp_path / "labels"
    assert cli.main(_args(llava_dir, data, out, "--shard-size", "1")) == 0
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    for p in [*out.glob("labels-*.safetensors"), out / "index.json", out / "summary.json"]:
        p.unlink()
    (out / "incorrect.jsonl").unlink()
    merge_only = ["--data", str(data), "--out", str(out), "--merge-only", "--shard-size", "1"]
    assert cli.main(merge_only) == 0
    assert "2 of 3 answered correctly" in capsys.readouterr().out
    _assert_same_output(reference, out)
    assert _summary(out)["merge_only"] and _summary(out)["computed"] == 0

    (part,) = (out / PARTS_DIR).glob("*-rank-00000")
    shutil.copytree(part, out / PARTS_DIR / "20000101-000000-aaaaaa-rank-00000")
    assert cli.main(merge_only) == 2
    err = capsys.readouterr().err
    assert (
        "3 sample(s) are recorded as done more than once" in err
        and "'s0' in parts/20000101-000000-aaaaaa-rank-00000/commit-00000.json and parts/" in err
    )

    assert cli.main(["--data", str(data), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--model is required (unless --merge-only)" in capsys.readouterr().err
    old = tmp_path / "old"
    with ShardWriter(old) as w:
        w.add(LabelRecord("a", torch.ones(2), torch.ones(2)))
    assert cli.main(_args(llava_dir, data, old)) == 2
    assert "holds label shards but no parts/ directory" in capsys.readouterr().err
