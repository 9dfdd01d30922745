"""Training data for the mapper: targets, the packed sample store, the split and the batches.

- :func:`make_target`: the method's target, the label with its lowest 50% zeroed, renormalised.
- :class:`PackedSamples`: every usable sample packed into two flat float32 tensors (input signal,
  target) plus offsets; built from label records by :func:`prepare_samples`, which counts the
  samples it skips.
- :func:`split_indices`: the deterministic train/validation split.
- :func:`batch_indices` and :meth:`PackedSamples.collate`: random batches of variable-length
  samples, padded to the batch maximum with a ``lengths`` tensor (what
  :meth:`TokenMapper.forward` takes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenprune_kernels.labels import LabelRecord

__all__ = [
    "PackedSamples",
    "SkipCounts",
    "batch_indices",
    "group_heads",
    "keep_count",
    "make_target",
    "prepare_samples",
    "split_indices",
    "topk_mask",
]


def keep_count(n: Tensor, ratio: float) -> Tensor:
    """Per-sample keep count of the op contract: ``clamp(floor(ratio * n + 0.5), 1, n)``.

    ``n``: ``[B]`` integer lengths (>= 1); ``ratio`` in (0, 1]. Returns ``[B]`` int64, computed in
    float64 exactly as ``select_topk`` does, so metrics count the tokens inference keeps.
    """
    k = torch.floor(ratio * n.to(torch.float64) + 0.5).to(torch.int64)
    return torch.minimum(torch.clamp(k, min=1), n.to(torch.int64))


def topk_mask(scores: Tensor, lengths: Tensor, k: Tensor) -> Tensor:
    """Top-``k[b]`` positions of each padded row, with the op's tie-break.

    Args:
        scores: ``[B, N]`` float, finite at valid positions (padding may hold anything).
        lengths: ``[B]`` integer, valid positions per row.
        k: ``[B]`` integer, ``0 <= k[b] <= lengths[b]``.

    Returns:
        ``[B, N]`` bool: True at the ``k[b]`` valid positions with the highest scores; equal
        scores go to the lower index (a stable descending sort), padding is never chosen.
    """
    batch, width = scores.shape
    positions = torch.arange(width, device=scores.device)
    valid = positions.unsqueeze(0) < lengths.to(scores.device).unsqueeze(1)
    keyed = torch.where(valid, scores.float(), float("-inf"))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, positions.unsqueeze(0).expand(batch, width))
    return (rank < k.to(scores.device).unsqueeze(1)) & valid


def make_target(label: Tensor) -> Tensor | None:
    """The training target of one sample: the label's lowest 50% zeroed, renormalised to sum 1.

    The ``ceil(n / 2)`` highest labels are kept (the contract's keep count at ratio 0.5); the
    ``floor(n / 2)`` lowest are zeroed. Ties are broken as in ``select_topk``: among equal
    labels the lower token index ranks higher (is kept first).

    Args:
        label: ``[n]`` float, finite, ``>= 0``.

    Returns:
        ``[n]`` float32 summing to 1, or None when the sample cannot be a target (``n == 0`` or
        every kept label is 0, i.e. an all-zero label).
    """
    if label.dim() != 1:
        raise ValueError(f"label must be 1-D [n], got shape {list(label.shape)}")
    n = label.shape[0]
    if n == 0:
        return None
    label = label.to(torch.float32)
    k = keep_count(torch.tensor([n]), 0.5)
    keep = topk_mask(label.unsqueeze(0), torch.tensor([n]), k)[0]
    kept = torch.where(keep, label, 0.0)
    total = kept.double().sum()
    if not total > 0:
        return None
    return (kept.double() / total).to(torch.float32)


@dataclass
class PackedSamples:
    """Samples packed flat: sample ``i`` owns ``[offsets[i], offsets[i + 1])``.

    Attributes:
        attn: ``[T]`` float32 mapper input (the stored layer-0 attention signal), or ``[T, G]``
            (per-head-group means).
        target: ``[T]`` float32 target (:func:`make_target`), each sample sums to 1.
        label: ``[T]`` float32 raw label (for the top-k recall metrics).
        offsets: ``[N + 1]`` int64.
        ids: the ``N`` sample ids.
        grid: ``[T, 2]`` float32 normalised grid row and column of each token, or None.
    """

    attn: Tensor
    target: Tensor
    label: Tensor
    offsets: Tensor
    ids: list[str] = field(default_factory=list)
    grid: Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> Tensor:
        """``[N]`` int64 sample lengths."""
        return self.offsets[1:] - self.offsets[:-1]

    def collate(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pad the samples ``indices`` (``[B]`` int64) to the longest of them.

        Returns ``(attn [B, N] (or [B, N, G]), target [B, N], label [B, N], lengths [B])``:
        float32 rows zero-padded after each sample's ``lengths[b]`` tokens, ``lengths`` int64;
        all on the CPU. :meth:`collate_grid` pads the grid the same way.
        """
        flat, valid, lengths = self._layout(indices)
        padded = [_pad(t, flat, valid) for t in (self.attn, self.target, self.label)]
        return padded[0], padded[1], padded[2], lengths

    def collate_grid(self, indices: Tensor) -> Tensor | None:
        """``grid [B, N, 2]`` of the samples ``indices`` padded as :meth:`collate` pads them, or
        None without a grid."""
        if self.grid is None:
            return None
        flat, valid, _ = self._layout(indices)
        return _pad(self.grid, flat, valid)

    def _layout(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices = indices.to(torch.int64)
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        width = int(lengths.max()) if indices.numel() else 0
        positions = torch.arange(width)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)
        flat = torch.where(valid, starts.unsqueeze(1) + positions.unsqueeze(0), 0)
        return flat, valid, lengths


def _pad(values: Tensor, flat: Tensor, valid: Tensor) -> Tensor:
    """``values [T, ...]`` gathered at ``flat [B, N]``, zero where ``valid`` is False."""
    mask = valid.reshape(*valid.shape, *([1] * (values.dim() - 1)))
    return torch.where(mask, values[flat], 0.0)


@dataclass
class SkipCounts:
    """Samples :func:`prepare_samples` left out, by reason."""

    empty: int = 0
    all_zero_label: int = 0

    @property
    def total(self) -> int:
        """All skipped samples."""
        return self.empty + self.all_zero_label


def group_heads(heads: Tensor, groups: int) -> Tensor:
    """``heads [n, Hq]`` per-query-head attention -> ``[n, groups]``: channel ``g`` the mean over
    the query heads ``g * Hq / groups .. (g + 1) * Hq / groups - 1`` (what
    ``instruction_attention_heads(..., head_groups=groups)`` computes)."""
    n, hq = heads.shape
    if groups < 1 or hq % groups:
        raise ValueError(f"attention_channels ({groups}) must divide the label's {hq} heads")
    return heads.reshape(n, groups, hq // groups).mean(-1)


def prepare_samples(
    records: Iterable[LabelRecord], attention_channels: int = 1, grid: bool = False
) -> tuple[PackedSamples, SkipCounts]:
    """Targets of every record, packed; samples without a usable target are skipped and counted.

    Args:
        records: label records (``attn``/``label``: ``[n_v]`` float32 >= 0).
        attention_channels: ``G``, the mapper's attention channels: 1 packs ``attn`` (the
            paper's input); ``G > 1`` packs each record's ``heads`` grouped by
            :func:`group_heads` (records need ``heads``).
        grid: pack each record's ``grid`` too (records need it).

    Returns:
        The packed samples (in record order) and the skip counts: ``empty`` (``n_v == 0``) and
        ``all_zero_label`` (no positive label: nothing to learn).

    Raises:
        ValueError: two records with the same ``sample_id``, mismatched attn/label shapes, or
            a record without the ``heads`` / ``grid`` asked for.
    """
    attn, target, label, lengths, ids, grids = [], [], [], [], [], []
    seen: set[str] = set()
    skipped = SkipCounts()
    for record in records:
        if record.sample_id in seen:
            raise ValueError(f"duplicate sample_id {record.sample_id!r} in the labels")
        seen.add(record.sample_id)
        if record.attn.shape != record.label.shape or record.attn.dim() != 1:
            raise ValueError(
                f"sample {record.sample_id!r}: attn and label must be [n_v], got "
                f"{list(record.attn.shape)} and {list(record.label.shape)}"
            )
        if record.label.numel() == 0:
            skipped.empty += 1
            continue
        t = make_target(record.label)
        if t is None:
            skipped.all_zero_label += 1
            continue
        for name, wanted in (("heads", attention_channels > 1), ("grid", grid)):
            if wanted and getattr(record, name) is None:
                raise ValueError(
                    f"sample {record.sample_id!r} has no {name}: labels made without "
                    f"per-head attention / grid positions cannot train this mapper input"
                )
        if attention_channels > 1:
            attn.append(group_heads(record.heads.to(torch.float32), attention_channels))
        else:
            attn.append(record.attn.to(torch.float32))
        if grid:
            grids.append(record.grid.to(torch.float32))
        target.append(t)
        label.append(record.label.to(torch.float32))
        lengths.append(t.shape[0])
        ids.append(record.sample_id)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    empty = torch.zeros(0, dtype=torch.float32)
    packed = PackedSamples(
        attn=torch.cat(attn) if attn else torch.zeros(0, attention_channels).squeeze(1),
        target=torch.cat(target) if target else empty,
        label=torch.cat(label) if label else empty,
        offsets=offsets,
        ids=ids,
        grid=(torch.cat(grids) if grids else torch.zeros(0, 2)) if grid else None,
    )
    return packed, skipped


def split_indices(num_samples: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic train/validation split of ``num_samples`` samples.

    A random permutation from ``torch.Generator().manual_seed(seed)``; the first
    ``max(1, round(val_fraction * num_samples))`` samples are validation. Both parts are
    returned sorted (``[N_train]``, ``[N_val]`` int64).

    Raises:
        ValueError: ``val_fraction`` not in (0, 1), or fewer than one sample left on either side.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    num_val = max(1, math.floor(val_fraction * num_samples + 0.5))
    if num_samples - num_val < 1:
        raise ValueError(
            f"too few samples for a train/validation split: {num_samples} usable sample(s) with "
            f"val_fraction {val_fraction} leaves {num_samples - num_val} for training; at least "
            "2 are needed"
        )
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return perm[num_val:].sort().values, perm[:num_val].sort().values


def batch_indices(
    indices: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    lengths: Tensor | None = None,
    bucket: bool = False,
) -> list[Tensor]:
    """Split ``indices`` (``[M]`` int64) into batches of at most ``batch_size``.

    With a ``generator``: a fresh random order (random batches of mixed lengths). With
    ``bucket=True`` (needs ``lengths``, ``[N]`` over all samples): the shuffled samples are sorted
    by length within chunks of ``50 * batch_size`` before batching and the batch order is shuffled
    again, so a batch holds similar lengths (less padding) while epochs still differ. Without a
    generator the order is ``indices`` as given (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = indices
    if generator is not None:
        order = indices[torch.randperm(indices.numel(), generator=generator)]
        if bucket:
            if lengths is None:
                raise ValueError("bucket=True needs lengths")
            chunk = 50 * batch_size
            parts = []
            for start in range(0, order.numel(), chunk):
                part = order[start : start + chunk]
                parts.append(part[torch.sort(lengths[part], stable=True).indices])
            order = torch.cat(parts) if parts else order
    batches = list(torch.split(order, batch_size))
    if generator is not None and bucket and len(batches) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
