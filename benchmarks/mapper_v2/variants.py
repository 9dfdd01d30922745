"""Mapper v2 experiment: the candidate inputs, built from what ``collect.py`` stored.

Variants (name -> attention channels of the grounded model's layer 0 (4 query heads, 2 KV
heads), grid input):

- ``mean``: the paper's input, the mean over the 4 query heads (1 channel);
- ``kv``: the mean over each GQA group's query heads (2 channels, one per KV head);
- ``heads``: one channel per query head (4);
- each with ``+grid``: the token's normalised row and column in its image grid (2 more).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokenprune_kernels.labels import LabelRecord
from tokenprune_kernels.mapper import grid_positions
from tokenprune_kernels.training.data import PackedSamples, group_heads, prepare_samples

#: name -> (attention channels, grid)
VARIANTS: dict[str, tuple[int, bool]] = {
    "mean": (1, False),
    "mean+grid": (1, True),
    "kv": (2, False),
    "kv+grid": (2, True),
    "heads": (4, False),
    "heads+grid": (4, True),
}


def attention_input(row: dict[str, Any], groups: int) -> torch.Tensor:
    """A row's attention input with ``groups`` channels: ``[n]`` for 1 (the head mean, as the
    inference path computes it), else ``[n, groups]``."""
    heads = row["heads"]
    return heads.mean(1) if groups == 1 else group_heads(heads, groups)


def grid_input(row: dict[str, Any]) -> torch.Tensor:
    t, h, w = row["grid"]
    return grid_positions(h, w, t)


def load_rows(*paths: str | Path) -> list[dict[str, Any]]:
    """The rows of ``collect.py`` output files, in order."""
    return [row for path in paths for row in torch.load(path)["rows"]]


def records(rows: list[dict[str, Any]]) -> list[LabelRecord]:
    """The labelled rows (correct answers) as label records with per-head attention and grid."""
    return [
        LabelRecord(row["id"], row["attn"], row["label"], heads=row["heads"], grid=grid_input(row))
        for row in rows
        if "label" in row
    ]


def packed(rows: list[dict[str, Any]], variant: str) -> PackedSamples:
    """The labelled rows with a usable target, packed for ``variant``."""
    groups, with_grid = VARIANTS[variant]
    return prepare_samples(records(rows), groups, with_grid)[0]
