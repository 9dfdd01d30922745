"""Explanation labels for mapper training: gradient-weighted attention relevance of visual tokens.

Usage (the ``tokenprune explain`` command)::

    tokenprune explain --model /models/Qwen2-VL-7B-Instruct --data train.jsonl --out labels/qwen2vl

``--model`` is a local model directory (weights, config and processor with a chat template; the
hub is never contacted) of a supported type (qwen2_vl, qwen2_5_vl, qwen3_vl, llava,
llava_onevision). ``--data`` is a JSONL file, one record per line:
``{"id": "q1", "image": "img/1.jpg", "question": "...", "answer": "..."}`` (``image``: a path or a
list; or ``video``: a list of frame images, a directory of frames, or a video file; relative
paths are relative to the data file). Each prompt is decoded greedily; samples whose answer
matches the reference (case, spacing and final punctuation ignored; ``--match exact`` for exact)
are labelled and written to ``--out`` as safetensors shards (``tokenprune_kernels.labels``):
``attn``, the layer-0 instruction attention of the visual tokens on the prompt (the mapper input,
exactly as inference computes it), and ``label``, the gradient-weighted relevance of each visual
token averaged over the answer tokens, plus per-sample metadata. Wrong answers are listed in
``incorrect.jsonl``; ``summary.json`` has ``seen``, ``correct``, ``incorrect``, ``rate``
(correct / seen), ``skipped``, ``oom`` and ``samples_per_s``; ``index.json`` one entry per record.
Rerunning the same command after an interruption skips the finished samples. Under ``torchrun``
or ``srun`` the processes share the samples (each on its own GPU) and the last to finish merges
their parts; ``--merge-only`` merges without computing. Options: ``--device`` (default cuda
when visible; each process's local GPU under torchrun/srun), ``--dtype`` (default bfloat16 on
CUDA, float32 on CPU), ``--target logit|logprob`` (explained output, default the logit),
``--answer-chunk N`` (answer tokens per backward pass; 1 uses the least memory),
``--max-new-tokens`` (default 32), ``--shard-size`` (samples per commit and per merged shard),
``--limit``, ``--no-progress``, ``--merge-only``.

Modules:

- :mod:`~tokenprune_kernels.explain.relevance`: the rule (Chefer et al. 2021) and
  :func:`explain_relevance` for transformers models (eager attention, hooks, teacher forcing).
- :mod:`~tokenprune_kernels.explain.data`: the JSONL records, image/video loading, prompts.
- :mod:`~tokenprune_kernels.explain.pipeline`: one sample: greedy answer, mapper input, label.
- :mod:`~tokenprune_kernels.explain.distributed`: per-process parts, commits, the merge.
- :mod:`~tokenprune_kernels.explain.cli`: the command (``add_explain_parser``, ``run_explain``).
"""

from tokenprune_kernels.explain.relevance import (
    SUPPORTED_MODEL_TYPES,
    TARGETS,
    Relevance,
    explain_relevance,
    gradient_weighted_relevance,
    head_mean_relu,
    propagate_relevance_rows,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TARGETS",
    "Relevance",
    "explain_relevance",
    "gradient_weighted_relevance",
    "head_mean_relu",
    "propagate_relevance_rows",
]
