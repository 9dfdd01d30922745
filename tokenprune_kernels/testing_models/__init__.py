"""Tiny random multimodal models built in-process (nothing is downloaded), their inputs, and
independent oracles of the pruned model - for tests and benchmarks.

- :mod:`tokenprune_kernels.testing_models.qwen`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL;
- :mod:`tokenprune_kernels.testing_models.llava`: LLaVA / LLaVA-OneVision.

They live in the package (beside :mod:`tokenprune_kernels.testing`) so that every test folder and
every script imports them by name from a clean checkout or an installed wheel, with no
``sys.path`` edits. Nothing here imports ``tokenprune_kernels.transformers``: each oracle runs the
UNPATCHED model (eager attention, ``output_attentions=True`` for the layer-0 rows), selects with
``tokenprune_kernels.reference`` and runs the unpatched language model on the hand-pruned
sequence. Importing a submodule imports transformers.
"""
