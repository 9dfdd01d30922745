"""The grounded benchmark's training recipe (beside the package, not installed with it).

Run from the repository root: ``python3 -m benchmarks.grounded.train --out runs/grounded``.

- :mod:`~benchmarks.grounded.batches`: seeded training scenes, chat sequences, per-token targets.
- :mod:`~benchmarks.grounded.losses`: the answer loss and the training-only auxiliary losses
  (shape probe, :class:`~benchmarks.grounded.losses.LLMAux`).
- :mod:`~benchmarks.grounded.loop`: forward, schedules, validation / test, the training loop.
- :mod:`~benchmarks.grounded.train`: the command line (defaults: the shipped recipe).

The lab notes (which runs learnt what, on which CPU) are in ``docs/grounded_training.md``.
"""
