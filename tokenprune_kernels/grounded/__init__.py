"""Grounded VQA testbed: procedural scenes whose answers depend on a small image region, and a
small Qwen2-VL trained on them on the CPU (shipped in ``assets/model``).

- :mod:`~tokenprune_kernels.grounded.scenes`: scene generator, questions, seeded splits, sizes.
- :mod:`~tokenprune_kernels.grounded.model`: the Qwen2-VL config, offline tokenizer / processor,
  save / load of a model directory, :func:`~tokenprune_kernels.grounded.model.load_grounded_model`.
- :mod:`~tokenprune_kernels.grounded.methods`, :mod:`~tokenprune_kernels.grounded.evaluate`,
  :mod:`~tokenprune_kernels.grounded.demo`: ``tokenprune eval`` and ``tokenprune demo``;
  :mod:`~tokenprune_kernels.grounded.flops` (analytic prefill FLOPs per method) and
  :mod:`~tokenprune_kernels.grounded.stats` (Wilson, exact McNemar, paired bootstrap) for the eval.
- :mod:`~tokenprune_kernels.grounded.labels_pipeline`: the shipped mapper's labels and training.

The model's training recipe is not part of the package: ``benchmarks/grounded/`` in the
repository (``python3 -m benchmarks.grounded.train``; lab notes in ``docs/grounded_training.md``).
"""
