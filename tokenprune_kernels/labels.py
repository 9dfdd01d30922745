"""Label shards: the stored ``(attention signal, relevance label)`` pairs a mapper trains on.

``tokenprune explain`` writes them through :class:`ShardWriter`; ``tokenprune train-mapper``
reads them with :func:`read_labels` / :func:`iter_label_shards`. torch + safetensors only.

A label directory holds shards ``labels-00000.safetensors``, ``labels-00001.safetensors``, ...
Each shard is a safetensors file with the tensors

- ``attn``: ``[sum n_v]`` float32 >= 0, the mapper input of every sample, concatenated;
- ``label``: ``[sum n_v]`` float32 >= 0, the relevance label of every sample, concatenated;
- ``cu_seqlens``: ``[N + 1]`` int64, sample ``i`` owns ``[cu_seqlens[i], cu_seqlens[i + 1])``;
- optionally ``heads``: ``[sum n_v, Hq]`` float32 >= 0, the same attention per query head (the
  input of a mapper with several attention channels), and ``grid``: ``[sum n_v, 2]`` float32, each
  visual token's normalised row and column in its image grid (every record of a shard has them,
  or none);

and the string metadata

- ``sample_ids``: JSON list of the ``N`` sample ids, in order;
- ``meta``: JSON list of the ``N`` per-sample meta dicts;
- ``tokenprune_labels_format``: the format version (:data:`LABELS_FORMAT_VERSION`);
- ``writer_metadata``: JSON of the writer's ``metadata`` dict, plus every key of that dict on
  its own (strings as they are, other values as JSON) so that generic safetensors tools show it.

Shards are written to a hidden temporary name in the same directory, flushed to disk and then
renamed (``os.replace``), so an interrupted run never leaves a partial ``labels-*.safetensors``;
a reopened writer skips the sample ids already stored (:meth:`ShardWriter.done_ids`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

__all__ = [
    "LABELS_FORMAT_VERSION",
    "LabelRecord",
    "ShardWriter",
    "iter_label_shards",
    "label_shard_paths",
    "read_label_metadata",
    "read_labels",
]

#: Version of the shard layout; stored in every shard's metadata.
LABELS_FORMAT_VERSION = 1

_FORMAT_KEY = "tokenprune_labels_format"
_WRITER_KEY = "writer_metadata"
_RESERVED_KEYS = frozenset({"sample_ids", "meta", _FORMAT_KEY, _WRITER_KEY})
_SHARD_RE = re.compile(r"^labels-(\d{5,})\.safetensors$")
_TMP_PREFIX = ".labels-tmp-"


@dataclass
class LabelRecord:
    """One training sample.

    Attributes:
        sample_id: unique non-empty id (the data file's ``"id"``, or its line number).
        attn: ``[n_v]`` float32 >= 0, the layer-0 instruction attention of the visual tokens
            (the mapper input, as inference computes it).
        label: ``[n_v]`` float32 >= 0, the relevance of each visual token averaged over the
            answer tokens.
        meta: JSON-serialisable dict (``model_type``, ``modality``, ``n_visual``, ``question``,
            ``answer``, ...).
        heads: ``[n_v, Hq]`` float32 >= 0, ``attn`` per query head (its mean over the heads is
            ``attn``), or None.
        grid: ``[n_v, 2]`` float32, each visual token's normalised grid row and column
            (``tokenprune_kernels.mapper.grid_positions``), or None.
    """

    sample_id: str
    attn: torch.Tensor
    label: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    heads: torch.Tensor | None = None
    grid: torch.Tensor | None = None


_EXTRA = ("heads", "grid")  # optional per-token tensors of a record: [n_v, C]


def _checked_extra(record: LabelRecord, n: int) -> dict[str, torch.Tensor]:
    """The record's optional ``heads`` / ``grid`` as contiguous CPU float32 (only those set)."""
    out = {}
    for name in _EXTRA:
        t = getattr(record, name)
        if t is None:
            continue
        sid = record.sample_id
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"record.{name} of sample {sid!r} must be a float tensor or None")
        width = 2 if name == "grid" else None
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1 or width not in (None, t.shape[1]):
            raise ValueError(
                f"record.{name} of sample {sid!r} must be [n_v = {n}, {width or 'Hq'}], got "
                f"shape {list(t.shape)}"
            )
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()) or (name == "heads" and bool((t < 0).any())):
            raise ValueError(f"record.{name} of sample {sid!r} must be finite (and heads >= 0)")
        out[name] = t
    return out


def _checked_record(record: LabelRecord) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Validate ``record``; return its attn/label as contiguous CPU float32 and its meta JSON."""
    if not isinstance(record, LabelRecord):
        raise TypeError(f"record must be a LabelRecord, got {type(record).__name__}")
    sid = record.sample_id
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"record.sample_id must be a non-empty str, got {sid!r}")
    tensors = []
    for name in ("attn", "label"):
        t = getattr(record, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"record.{name} of sample {sid!r} must be a Tensor, got {type(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"record.{name} of sample {sid!r} must be floating point, got {t.dtype}"
            )
        if t.dim() != 1:
            raise ValueError(
                f"record.{name} of sample {sid!r} must be 1-D [n_v], got shape {list(t.shape)}"
            )
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"record.{name} of sample {sid!r} must be finite and >= 0")
        tensors.append(t)
    attn, label = tensors
    if attn.shape != label.shape:
        raise ValueError(
            f"record.attn and record.label of sample {sid!r} must have the same length, got "
            f"{attn.shape[0]} and {label.shape[0]}"
        )
    if not isinstance(record.meta, dict):
        raise TypeError(f"record.meta of sample {sid!r} must be a dict, got {type(record.meta)}")
    try:
        meta_json = json.dumps(record.meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"record.meta of sample {sid!r} is not JSON-serialisable: {err}") from err
    return attn, label, meta_json


def label_shard_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a label directory, in shard order (a single shard file: ``[path]``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory without ``labels-*.safetensors`` shards.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"label directory not found: '{path}'")
    shards = []
    for child in path.iterdir():
        match = _SHARD_RE.match(child.name)
        if match and child.is_file():
            shards.append((int(match.group(1)), child))
    if not shards:
        raise ValueError(f"no label shards (labels-NNNNN.safetensors) in '{path}'")
    return [p for _, p in sorted(shards)]


def _read_shard_header(f: Any, path: Path) -> tuple[list[str], list[dict[str, Any]], dict]:
    metadata = f.metadata() or {}
    try:
        version = int(metadata[_FORMAT_KEY])
        sample_ids = json.loads(metadata["sample_ids"])
        metas = json.loads(metadata["meta"])
        writer = json.loads(metadata.get(_WRITER_KEY, "{}"))
    except (KeyError, ValueError) as err:
        raise ValueError(f"'{path}' is not a label shard (bad or missing metadata: {err})") from err
    if version != LABELS_FORMAT_VERSION:
        raise ValueError(
            f"'{path}' has label format version {version}; this version of tokenprune_kernels "
            f"reads version {LABELS_FORMAT_VERSION}"
        )
    if not isinstance(sample_ids, list) or not isinstance(metas, list):
        raise ValueError(f"'{path}': metadata 'sample_ids' and 'meta' must be JSON lists")
    if len(sample_ids) != len(metas):
        raise ValueError(f"'{path}': {len(sample_ids)} sample ids but {len(metas)} meta entries")
    return sample_ids, metas, writer


def _read_shard(path: Path) -> list[LabelRecord]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sample_ids, metas, _ = _read_shard_header(f, path)
            keys = set(f.keys())
            missing = sorted({"attn", "label", "cu_seqlens"} - keys)
            if missing:
                raise ValueError(f"'{path}' is missing tensors {missing}")
            attn = f.get_tensor("attn")
            label = f.get_tensor("label")
            cu = f.get_tensor("cu_seqlens")
            extra = {name: f.get_tensor(name) for name in _EXTRA if name in keys}
    except SafetensorError as err:
        raise ValueError(f"'{path}' is not a valid safetensors file: {err}") from err
    n = len(sample_ids)
    if (
        attn.dtype != torch.float32
        or label.dtype != torch.float32
        or cu.dtype != torch.int64
        or attn.dim() != 1
        or attn.shape != label.shape
        or cu.shape != (n + 1,)
        or int(cu[0]) != 0
        or int(cu[-1]) != attn.shape[0]
        or bool((cu[1:] < cu[:-1]).any())
    ):
        raise ValueError(
            f"'{path}' is malformed: expected attn/label [T] float32 and cu_seqlens [{n + 1}] "
            f"int64 from 0 to T, non-decreasing; got attn {list(attn.shape)} {attn.dtype}, "
            f"label {list(label.shape)} {label.dtype}, cu_seqlens {list(cu.shape)} {cu.dtype}"
        )
    for name, t in extra.items():
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != attn.shape[0]:
            raise ValueError(
                f"'{path}' is malformed: expected {name} [{attn.shape[0]}, C] float32, got "
                f"{list(t.shape)} {t.dtype}"
            )
    bounds = cu.tolist()
    return [
        LabelRecord(
            sample_id=str(sample_ids[i]),
            attn=attn[bounds[i] : bounds[i + 1]].clone(),
            label=label[bounds[i] : bounds[i + 1]].clone(),
            meta=metas[i],
            **{name: t[bounds[i] : bounds[i + 1]].clone() for name, t in extra.items()},
        )
        for i in range(n)
    ]


def iter_label_shards(path: str | os.PathLike[str]) -> Iterator[list[LabelRecord]]:
    """Yield the records of each shard of a label directory (or one shard file), shard by shard.

    Each record's ``attn`` and ``label`` are ``[n_v]`` float32 CPU tensors (owning their memory).
    Raises as :func:`label_shard_paths`, and ``ValueError`` naming the file for a malformed shard.
    """
    for shard in label_shard_paths(path):
        yield _read_shard(shard)


def read_labels(path: str | os.PathLike[str]) -> list[LabelRecord]:
    """Every record of a label directory (or one shard file), in shard order.

    See :func:`iter_label_shards` for the record layout and errors.
    """
    return [record for shard in iter_label_shards(path) for record in shard]


def read_label_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The writer ``metadata`` dict of a label directory (from its first shard; ``{}`` if none)."""
    first = label_shard_paths(path)[0]
    try:
        with safe_open(str(first), framework="pt", device="cpu") as f:
            return _read_shard_header(f, first)[2]
    except SafetensorError as err:
        raise ValueError(f"'{first}' is not a valid safetensors file: {err}") from err


def _canonical(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, allow_nan=False)


def _lock_directory(path: Path) -> int | None:
    """An exclusive, non-blocking ``flock`` on the directory ``path``: the descriptor holding it
    (None where the platform has no ``fcntl``).

    Raises:
        ValueError: another descriptor (another :class:`ShardWriter`) holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"out_dir '{path}' is being written by another ShardWriter (one writer per "
            "directory: label disjoint ranges into separate directories)"
        ) from None
    return fd


class ShardWriter:
    """Write :class:`LabelRecord` s into a label directory, shard by shard; resumable.

    Use as a context manager (``with ShardWriter(out) as w: ...``); leaving the block flushes the
    buffered records, also when the block raises (every completed record is kept, so a rerun
    resumes after it). One writer per directory at a time: the writer holds an exclusive lock on
    ``out_dir`` (``flock`` on the directory, released by :meth:`close`) and a second writer on
    the same directory, in this process or another, is refused - two writers would number their
    shards alike and overwrite each other's.

    Args:
        out_dir: directory (created if missing). Existing shards are scanned: their sample ids
            are :meth:`done_ids`, and new shards are numbered after the last one. Leftover
            temporary files of an interrupted write are removed.
        shard_size: records per shard (>= 1).
        metadata: JSON-serialisable dict (model path, model_type, versions, command, ...) stored
            in every shard; it must equal the metadata of the shards already in ``out_dir``.
            Keys ``sample_ids``, ``meta``, ``writer_metadata`` and ``tokenprune_labels_format``
            are reserved.

    Raises:
        ValueError: bad ``shard_size`` or ``metadata``, a metadata mismatch with existing
            shards, an existing shard that cannot be read, or another writer open on
            ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        shard_size: int = 256,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        bad_keys = sorted(str(k) for k in metadata if not isinstance(k, str) or k in _RESERVED_KEYS)
        if bad_keys:
            raise ValueError(
                f"metadata keys must be str and not one of {sorted(_RESERVED_KEYS)}, got {bad_keys}"
            )
        try:
            self._metadata_json = _canonical(metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from err
        self._metadata = json.loads(self._metadata_json)
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"out_dir must be a directory, got the file '{self.out_dir}'")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self.out_dir)
        self.shard_size = shard_size
        self._done: set[str] = set()
        self._next_index = 0
        self._buffer: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []
        self._extras: list[dict[str, torch.Tensor]] = []  # each buffered record's heads / grid
        self._closed = False
        try:
            self._scan()
        except BaseException:
            self._unlock()
            raise

    def _scan(self) -> None:
        for child in self.out_dir.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_file():
                child.unlink()  # an interrupted write: never renamed, so never a shard
        for child in sorted(self.out_dir.iterdir()):
            match = _SHARD_RE.match(child.name)
            if not (match and child.is_file()):
                continue
            self._next_index = max(self._next_index, int(match.group(1)) + 1)
            try:
                with safe_open(str(child), framework="pt", device="cpu") as f:
                    sample_ids, _, writer = _read_shard_header(f, child)
            except SafetensorError as err:
                raise ValueError(f"existing shard '{child}' is not readable: {err}") from err
            if _canonical(writer) != self._metadata_json:
                raise ValueError(
                    f"metadata mismatch with the existing shard '{child}': it was written with "
                    f"{writer}, this writer has {self._metadata}; use another out_dir or the "
                    "same settings"
                )
            self._done.update(str(s) for s in sample_ids)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, Any]:
        """The writer metadata (a copy)."""
        return json.loads(self._metadata_json)

    def done_ids(self) -> set[str]:
        """Sample ids already stored (in earlier shards or this writer's, buffered included)."""
        return set(self._done)

    def add(self, record: LabelRecord) -> None:
        """Buffer ``record``; writes a shard when ``shard_size`` records are buffered.

        Raises ``ValueError`` for an id already in :meth:`done_ids`, a malformed record (see
        :class:`LabelRecord`), or a closed writer.
        """
        if self._closed:
            raise ValueError("this ShardWriter is closed")
        attn, label, meta_json = _checked_record(record)
        extra = _checked_extra(record, attn.shape[0])
        if record.sample_id in self._done:
            raise ValueError(
                f"sample_id {record.sample_id!r} is already stored in '{self.out_dir}'"
            )
        if self._buffer and set(extra) != set(self._extras[0]):
            raise ValueError(
                f"sample {record.sample_id!r} has the optional tensors {sorted(extra)}, the "
                f"shard's earlier records {sorted(self._extras[0])}: a shard has them all or none"
            )
        self._buffer.append((record.sample_id, attn, label, meta_json))
        self._extras.append(extra)
        self._done.add(record.sample_id)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records (if any) as one new shard, atomically."""
        if not self._buffer:
            return
        ids = [sid for sid, _, _, _ in self._buffer]
        lengths = [a.shape[0] for _, a, _, _ in self._buffer]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        tensors = {
            "attn": torch.cat([a for _, a, _, _ in self._buffer]),
            "label": torch.cat([lb for _, _, lb, _ in self._buffer]),
            "cu_seqlens": cu,
        }
        for name in self._extras[0]:
            parts = [extra[name] for extra in self._extras]
            if len({p.shape[1] for p in parts}) != 1:
                raise ValueError(f"the records' {name} differ in width: {parts[0].shape[1]}, ...")
            tensors[name] = torch.cat(parts)
        metadata = {
            key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for key, value in self._metadata.items()
        }
        metadata.update(
            {
                "sample_ids": json.dumps(ids),
                "meta": "[" + ",".join(m for _, _, _, m in self._buffer) + "]",
                _FORMAT_KEY: str(LABELS_FORMAT_VERSION),
                _WRITER_KEY: self._metadata_json,
            }
        )
        data = safetensors_save(tensors, metadata=metadata)
        final = self.out_dir / f"labels-{self._next_index:05d}.safetensors"
        tmp = self.out_dir / f"{_TMP_PREFIX}{self._next_index:05d}-{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._next_index += 1
        self._buffer.clear()
        self._extras.clear()

    def __del__(self) -> None:  # a writer dropped unclosed (a crash) releases the directory
        if getattr(self, "_lock_fd", None) is not None:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases its flock
            self._lock_fd = None

    def close(self) -> None:
        """Flush the buffered records, release the directory; further :meth:`add` calls raise.
        Idempotent."""
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                self._unlock()
