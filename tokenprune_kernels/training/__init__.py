"""Mapper training (offline): targets, batching, the training loop and ``tokenprune train-mapper``.

- :mod:`.data`: :func:`make_target` (label with its lowest 50% zeroed, renormalised),
  :func:`prepare_samples`, :func:`split_indices`, :func:`batch_indices`, padded collation.
- :mod:`.train`: :class:`TrainConfig`, :func:`train_mapper`, :func:`train_mapper_from_labels`,
  :func:`evaluate` (validation KL and top-k recall at 50% / 25%).
- :mod:`.cli`: ``add_train_parser(subparsers)`` for the ``tokenprune`` command.
- :mod:`.synthetic`: learnable synthetic labels for tests and demos.
"""

from .data import (
    PackedSamples,
    SkipCounts,
    batch_indices,
    keep_count,
    make_target,
    prepare_samples,
    split_indices,
    topk_mask,
)
from .synthetic import synthetic_record, synthetic_records
from .train import (
    TrainConfig,
    TrainResult,
    attention_baseline,
    evaluate,
    kl_per_sample,
    log_path_for,
    recall_at,
    train_mapper,
    train_mapper_from_labels,
)

__all__ = [
    "PackedSamples",
    "SkipCounts",
    "TrainConfig",
    "TrainResult",
    "attention_baseline",
    "batch_indices",
    "evaluate",
    "keep_count",
    "kl_per_sample",
    "log_path_for",
    "make_target",
    "prepare_samples",
    "recall_at",
    "split_indices",
    "synthetic_record",
    "synthetic_records",
    "topk_mask",
    "train_mapper",
    "train_mapper_from_labels",
]
