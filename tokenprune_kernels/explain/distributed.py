"""Resumable labelling by one or many processes: what each process writes, what counts as done,
which samples a process takes, and the merge into one label directory.

Layout of an ``--out`` directory::

    explain_settings.json                         the settings every run into it must share
    parts/<run>-rank-<R>/labels-NNNNN.safetensors  one process's label shards
    parts/<run>-rank-<R>/commit-NNNNN.json         what that process has durably finished
    parts/<run>-rank-<R>/rank-summary.json         written when the process ends its share
    labels-NNNNN.safetensors                       the merged labels, in data-file order
    incorrect.jsonl, index.json, summary.json      merged: wrong answers, one entry per record,
                                                   the counts

A run (one ``tokenprune explain`` command, all its processes) gets an id from rank 0; a process
writes only in its own ``parts/<run>-rank-<R>/`` directory, so no two processes ever write the
same file.

What is done. The unit is the sample (its id), not the process: a process buffers its finished
samples and, every ``shard_size`` of them (and when it stops), writes the labelled ones as one
shard (atomically: temporary name, fsync, rename) and THEN a commit file listing that shard and
every sample of the chunk - labelled, answered wrongly, or out of memory - again atomically. A
sample is done when a commit names it labelled or wrong. A process killed before a commit loses
at most that chunk: a shard without its commit is ignored and its samples are computed again;
nothing half-written is ever read as done. Samples that ran out of memory are recorded (with the
error) but are not done: the next run tries them again (perhaps with a smaller ``--answer-chunk``
or on a larger GPU).

Which samples a process takes. At start every process reads every commit of EARLIER runs (those
of the current run are left out, so a process that starts late sees the same set as one that
starts early), drops the done samples from the data file's records and takes every
``world_size``-th of the rest, starting at its rank: deterministic, balanced, and independent of
how many processes the earlier runs had.

The merge. The process that finishes last (each process writes its rank summary, then checks
whether every rank of its run has; the first to create ``parts/<run>.merge`` merges) - or a
``--merge-only`` command - reads all commits, checks that no sample is done twice, copies the
labels into ``labels-*.safetensors`` in data-file order (the same records, in the same order, as
a single-process run writes), and writes ``incorrect.jsonl``, ``index.json`` and
``summary.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenprune_kernels.distributed import write_json_atomic
from tokenprune_kernels.labels import (
    LabelRecord,
    ShardWriter,
    iter_label_shards,
    label_shard_paths,
    read_labels,
)

__all__ = [
    "INCORRECT_FILE",
    "INDEX_FILE",
    "PARTS_DIR",
    "SUMMARY_FILE",
    "Commit",
    "PartWriter",
    "assign",
    "check_layout",
    "claim_merge",
    "done_ids",
    "merge",
    "new_run_id",
    "part_dir",
    "read_commits",
    "read_rank_summaries",
    "write_rank_summary",
]

PARTS_DIR = "parts"
INDEX_FILE = "index.json"
INCORRECT_FILE = "incorrect.jsonl"
SUMMARY_FILE = "summary.json"
RANK_SUMMARY_FILE = "rank-summary.json"
_COMMIT_RE = re.compile(r"^commit-(\d{5,})\.json$")
_PART_RE = re.compile(r"^(?P<run>.+)-rank-(?P<rank>\d{5})$")
_SHARD_RE = re.compile(r"^labels-\d{5,}\.safetensors$")
_COMMIT_FORMAT = 1


def new_run_id() -> str:
    """A fresh run id: UTC time and a random suffix (``20250101-120000-1a2b3c``)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def part_dir(out: Path, run_id: str, rank: int) -> Path:
    """``out/parts/<run>-rank-<RRRRR>``: where one process of one run writes."""
    return Path(out) / PARTS_DIR / f"{run_id}-rank-{rank:05d}"


def check_layout(out: Path) -> None:
    """Refuse an ``--out`` that holds label shards but no ``parts/`` (not written by this command's
    current layout: its shards are not accounted for by any commit)."""
    out = Path(out)
    if not out.is_dir() or (out / PARTS_DIR).is_dir():
        return
    if any(_SHARD_RE.match(p.name) for p in out.iterdir()):
        raise ValueError(
            f"'{out}' holds label shards but no {PARTS_DIR}/ directory (written by an older "
            "tokenprune explain, or by hand); use another --out"
        )


@dataclass(frozen=True)
class Commit:
    """One commit file: a chunk of samples one process finished.

    Attributes:
        path: the commit file.
        run: the run id; rank: the process's rank in that run.
        shard: the shard holding the ``labelled`` samples (in that order), or None.
        labelled: ids of the labelled samples.
        incorrect: one dict per wrongly answered sample (``id``, ``line``, ``answer``,
            ``greedy_answer``).
        oom: one dict per sample that ran out of memory (``id``, ``line``, ``error``).
    """

    path: Path
    run: str
    rank: int
    shard: Path | None
    labelled: tuple[str, ...]
    incorrect: tuple[dict[str, Any], ...] = ()
    oom: tuple[dict[str, Any], ...] = ()


def read_commits(out: Path) -> list[Commit]:
    """Every commit under ``out/parts/``, in directory and sequence order.

    Raises:
        ValueError: a commit file that is not valid (commit files are written atomically, so
            this is damage from outside; the message names the file).
    """
    parts = Path(out) / PARTS_DIR
    if not parts.is_dir():
        return []
    commits: list[Commit] = []
    for directory in sorted(p for p in parts.iterdir() if p.is_dir()):
        if not _PART_RE.match(directory.name):
            continue
        files = sorted(
            (int(m.group(1)), p)
            for p in directory.iterdir()
            if (m := _COMMIT_RE.match(p.name)) and p.is_file()
        )
        for _, path in files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("format") != _COMMIT_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {_COMMIT_FORMAT}")
                labelled = tuple(str(s) for s in data["labelled"])
                incorrect = tuple(dict(e) for e in data["incorrect"])
                oom = tuple(dict(e) for e in data["oom"])
                shard = data["shard"]
                if (shard is None) != (not labelled):
                    raise ValueError("a shard must be named exactly when samples are labelled")
                commit = Commit(
                    path=path,
                    run=str(data["run"]),
                    rank=int(data["rank"]),
                    shard=None if shard is None else directory / str(shard),
                    labelled=labelled,
                    incorrect=incorrect,
                    oom=oom,
                )
            except (OSError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"commit file '{path}' is not valid: {err}") from err
            commits.append(commit)
    return commits


def done_ids(commits: Sequence[Commit], exclude_run: str | None = None) -> set[str]:
    """Ids of the samples the commits record as labelled or answered wrongly (out-of-memory
    samples are not done), leaving out the commits of run ``exclude_run``."""
    done: set[str] = set()
    for c in commits:
        if c.run == exclude_run:
            continue
        done.update(c.labelled)
        done.update(str(e["id"]) for e in c.incorrect)
    return done


def assign(ids: Sequence[str], done: set[str], rank: int, world_size: int) -> list[int]:
    """Positions (into ``ids``) of the samples process ``rank`` of ``world_size`` takes.

    The samples not in ``done``, in data-file order; every ``world_size``-th of them starting at
    ``rank``. Every process computing this from the same ``ids`` and ``done`` gets a disjoint
    share, and the shares cover every sample not done.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world {world_size}")
    remaining = [i for i, sid in enumerate(ids) if sid not in done]
    return remaining[rank::world_size]


class PartWriter:
    """One process's output: its label shards and commit files (see the module docstring).

    Use as a context manager; leaving the block commits what is buffered, also when the block
    raises (a process killed outright commits nothing more: its buffered chunk is lost, never
    half-recorded).

    Args:
        out: the ``--out`` directory.
        run_id, rank, world_size: this process's run and place in it.
        shard_size: samples per commit (and at most as many labels per shard), >= 1.
        metadata: the shards' writer metadata (the run settings).

    Raises:
        ValueError: the part directory already holds files (a run id used twice).
    """

    def __init__(
        self,
        out: Path,
        run_id: str,
        rank: int,
        world_size: int,
        shard_size: int,
        metadata: dict[str, Any],
    ) -> None:
        self.dir = part_dir(out, run_id, rank)
        if self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(f"'{self.dir}' already holds files: a run id used twice")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.rank, self.world_size = run_id, rank, world_size
        self.shard_size = shard_size
        self._writer = ShardWriter(self.dir, shard_size=shard_size, metadata=metadata)
        self._labelled: list[str] = []
        self._incorrect: list[dict[str, Any]] = []
        self._oom: list[dict[str, Any]] = []
        self._seq = 0
        self._known: set[str] = set()
        self.committed = {"labelled": 0, "incorrect": 0, "oom": 0}

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.commit()

    @property
    def pending(self) -> int:
        """Samples finished but not committed yet."""
        return len(self._labelled) + len(self._incorrect) + len(self._oom)

    def add_labelled(self, record: LabelRecord) -> None:
        """Buffer a labelled sample."""
        self._writer.add(record)
        self._labelled.append(record.sample_id)
        self._maybe_commit()

    def add_incorrect(self, entry: dict[str, Any]) -> None:
        """Buffer a wrongly answered sample (``id``, ``line``, ``answer``, ``greedy_answer``)."""
        self._incorrect.append(entry)
        self._maybe_commit()

    def add_oom(self, entry: dict[str, Any]) -> None:
        """Buffer a sample that ran out of memory (``id``, ``line``, ``error``)."""
        self._oom.append(entry)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self.pending >= self.shard_size:
            self.commit()

    def commit(self) -> None:
        """Write the buffered labels as a shard, then the commit file naming every buffered
        sample; both atomically, in that order. Nothing to do when nothing is buffered."""
        if not self.pending:
            return
        self._writer.flush()
        shards = self._shards()
        new = sorted(shards - self._known)
        if len(new) != (1 if self._labelled else 0):
            raise RuntimeError(f"expected one new shard in '{self.dir}', found {new}")
        self._known = shards
        data = {
            "format": _COMMIT_FORMAT,
            "run": self.run_id,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq": self._seq,
            "shard": new[0] if new else None,
            "labelled": self._labelled,
            "incorrect": self._incorrect,
            "oom": self._oom,
        }
        self._write_commit(self.dir / f"commit-{self._seq:05d}.json", data)
        self.committed["labelled"] += len(self._labelled)
        self.committed["incorrect"] += len(self._incorrect)
        self.committed["oom"] += len(self._oom)
        self._seq += 1
        self._labelled, self._incorrect, self._oom = [], [], []

    def _shards(self) -> set[str]:
        return {p.name for p in self.dir.iterdir() if _SHARD_RE.match(p.name)}

    def _write_commit(self, path: Path, data: dict[str, Any]) -> None:
        write_json_atomic(path, data)


def write_rank_summary(out: Path, run_id: str, rank: int, summary: dict[str, Any]) -> None:
    """``rank-summary.json`` of one process of a run (after its last commit)."""
    write_json_atomic(part_dir(out, run_id, rank) / RANK_SUMMARY_FILE, summary)


def read_rank_summaries(out: Path, run_id: str) -> list[dict[str, Any]]:
    """The rank summaries written so far by the processes of run ``run_id``, by rank."""
    parts = Path(out) / PARTS_DIR
    found = []
    for path in sorted(parts.glob(f"{run_id}-rank-*/{RANK_SUMMARY_FILE}")):
        found.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(found, key=lambda s: s["rank"])


def claim_merge(out: Path, run_id: str, world_size: int) -> bool:
    """Whether this process merges run ``run_id``: every rank has written its summary and this
    process is the first to create ``parts/<run>.merge`` (exclusive create: at most one wins)."""
    if len(read_rank_summaries(out, run_id)) < world_size:
        return False
    try:
        fd = os.open(Path(out) / PARTS_DIR / f"{run_id}.merge", os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


@dataclass
class _Entries:
    labelled: list[Commit] = field(default_factory=list)
    incorrect: list[tuple[Commit, dict[str, Any]]] = field(default_factory=list)
    oom: list[tuple[Commit, dict[str, Any]]] = field(default_factory=list)


def _relative(path: Path, out: Path) -> str:
    return str(path.relative_to(out))


def merge(
    out: Path,
    ids: Sequence[str],
    lines: Sequence[int],
    metadata: dict[str, Any],
    shard_size: int,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge every commit of ``out`` into the label directory's top level.

    Args:
        out: the ``--out`` directory.
        ids, lines: the data file's sample ids and line numbers, in file order.
        metadata: the shards' writer metadata (the run settings).
        shard_size: labels per merged shard.
        run: the finishing run's figures (``skipped``, ``computed``, ``seconds``, ``ranks``, ...)
            copied into the summary; None for ``--merge-only``.

    Returns:
        The counts (also in ``summary.json``): ``records``, ``seen`` (labelled + wrong),
        ``correct``, ``incorrect``, ``oom``, ``missing`` (no commit yet), ``rate``, ``finished``
        (every record labelled, wrong or out of memory), ``not_in_data`` (done samples whose id
        the data file no longer has), ``oom_ids``, and the run's figures.

    Raises:
        ValueError: a sample done more than once (two runs writing into ``out`` at the same
            time, or files copied in), or a commit whose shard is missing or disagrees with it.
    """
    out = Path(out)
    commits = read_commits(out)
    wanted = set(ids)
    entries: dict[str, _Entries] = {}
    for c in commits:
        for sid in c.labelled:
            entries.setdefault(sid, _Entries()).labelled.append(c)
        for e in c.incorrect:
            entries.setdefault(str(e["id"]), _Entries()).incorrect.append((c, e))
        for e in c.oom:
            entries.setdefault(str(e["id"]), _Entries()).oom.append((c, e))
    twice = {
        sid: [_relative(c.path, out) for c in e.labelled]
        + [_relative(c.path, out) for c, _ in e.incorrect]
        for sid, e in entries.items()
        if len(e.labelled) + len(e.incorrect) > 1
    }
    if twice:
        shown = "; ".join(f"{sid!r} in {' and '.join(w)}" for sid, w in list(twice.items())[:3])
        raise ValueError(
            f"{len(twice)} sample(s) are recorded as done more than once ({shown}): two runs "
            f"wrote into '{out}' at the same time? Remove one of the {PARTS_DIR}/ directories "
            "named and run with --merge-only"
        )
    # the labels, read back from the part shards of the commits that hold wanted samples
    labels: dict[str, LabelRecord] = {}
    for c in commits:
        if c.shard is None or not wanted.intersection(c.labelled):
            continue
        if not c.shard.is_file():
            raise ValueError(f"commit '{c.path}' names the shard '{c.shard}', which is missing")
        records = read_labels(c.shard)
        if tuple(r.sample_id for r in records) != c.labelled:
            raise ValueError(f"shard '{c.shard}' does not hold the samples its commit lists")
        labels.update((r.sample_id, r) for r in records if r.sample_id in wanted)

    tmp = out / f".merge-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    index: list[dict[str, Any]] = []
    incorrect: list[dict[str, Any]] = []
    oom_ids: list[str] = []
    counts = {"labelled": 0, "incorrect": 0, "oom": 0, "missing": 0}
    try:
        with ShardWriter(tmp, shard_size=shard_size, metadata=metadata) as writer:
            for sid, line in zip(ids, lines, strict=True):
                e = entries.get(sid, _Entries())
                item: dict[str, Any] = {"id": sid, "line": line}
                if e.labelled:
                    writer.add(labels[sid])
                    item.update(status="labelled", commit=_relative(e.labelled[0].path, out))
                elif e.incorrect:
                    c, entry = e.incorrect[0]
                    incorrect.append(entry)
                    item.update(status="incorrect", commit=_relative(c.path, out))
                elif e.oom:
                    c, entry = e.oom[-1]
                    oom_ids.append(sid)
                    item.update(status="oom", commit=_relative(c.path, out))
                    item["error"] = entry.get("error")
                else:
                    item["status"] = "missing"
                counts[item["status"]] += 1
                index.append(item)
        where = {}
        if counts["labelled"]:
            for shard in label_shard_paths(tmp):
                for row, rec in enumerate(next(iter_label_shards(shard))):
                    where[rec.sample_id] = (shard.name, row)
        for item in index:
            if item["status"] == "labelled":
                item["shard"], item["row"] = where[item["id"]]
        # swap the merged shards in: old ones out, new ones renamed into place
        for p in out.iterdir():
            if _SHARD_RE.match(p.name) and p.is_file():
                p.unlink()
        if counts["labelled"]:
            for shard in label_shard_paths(tmp):
                os.replace(shard, out / shard.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    with open(out / f".{INCORRECT_FILE}.tmp-{os.getpid()}", "w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in incorrect))
    os.replace(out / f".{INCORRECT_FILE}.tmp-{os.getpid()}", out / INCORRECT_FILE)
    seen = counts["labelled"] + counts["incorrect"]
    summary: dict[str, Any] = {
        "records": len(ids),
        "seen": seen,
        "correct": counts["labelled"],
        "incorrect": counts["incorrect"],
        "oom": counts["oom"],
        "missing": counts["missing"],
        "rate": counts["labelled"] / seen if seen else None,
        "finished": counts["missing"] == 0,
        "not_in_data": sum(
            1 for sid, e in entries.items() if sid not in wanted and (e.labelled or e.incorrect)
        ),
        "oom_ids": oom_ids,
        **(run or {"skipped": seen, "computed": 0, "merge_only": True}),
    }
    write_json_atomic(
        out / INDEX_FILE,
        {"format": "tokenprune explain index v1", "records": len(ids), "samples": index},
    )
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary
