"""One sample from prompt to label: greedy answer, the mapper input, the relevance label.

- :func:`greedy_with_attention`: greedy decoding of the prompt with the model patched by
  ``apply_tokenprune(keep_ratio=1.0)`` (nothing is removed at keep ratio 1, so the model runs the
  same sequence); the patch's prefill computes the layer-0 instruction attention of the visual
  tokens on the PROMPT (default instruction rule, ``torch.ops.tokenprune`` ops, the model's own
  layer-0 norm / q / k / rotary) - exactly what inference scores, so training and inference see
  the same signal. The patch is reverted before returning.
- :func:`label_sample`: builds the prompt, decodes greedily, checks the answer against the
  reference and, when it matches, computes the relevance label with
  :func:`~tokenprune_kernels.explain.relevance.explain_relevance`, teacher-forcing the model's
  own greedy tokens (they decode to the reference, so this is the reference answer as the model
  tokenizes it).

Greedy decoding is plain (``do_sample=False``, one beam, no repetition penalty or other settings
of the checkpoint's generation config), stops at the checkpoint's EOS token(s) or after
``max_new_tokens``, and never emits an image/video placeholder token (they are suppressed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune_kernels.explain.data import ExplainRecord, build_prompt_inputs
from tokenprune_kernels.explain.relevance import (
    explain_relevance,
    model_type_of,
    visual_positions_of,
    visual_token_ids,
)
from tokenprune_kernels.labels import LabelRecord
from tokenprune_kernels.transformers import (
    apply_tokenprune,
    is_tokenprune_applied,
    last_pruned,
    revert_tokenprune,
)

MATCH_MODES: tuple[str, ...] = ("normalized", "exact")


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, trailing ``.``/``!``/``?`` and spaces removed."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".!?").strip()


def answers_match(greedy: str, reference: str, match: str = "normalized") -> bool:
    """Whether the greedy answer is the reference (``match``: ``normalized`` or ``exact``,
    exact = equal after stripping surrounding whitespace)."""
    if match == "exact":
        return greedy.strip() == reference.strip()
    if match == "normalized":
        return normalize_answer(greedy) == normalize_answer(reference)
    raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")


def _eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def to_model(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Move inputs to the model's device; floating tensors (pixels) to the model's dtype."""
    p = next(model.parameters())
    return {
        k: v.to(device=p.device, dtype=p.dtype) if v.is_floating_point() else v.to(p.device)
        for k, v in inputs.items()
    }


def greedy_with_attention(
    model: nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy answer and the layer-0 instruction attention of the visual tokens.

    Args:
        model: a supported transformers model, not patched.
        inputs: one prompt (batch of one) on the model's device.
        max_new_tokens: decoding budget (>= 1).

    Returns:
        ``(answer_ids [n] int64, attn [n_v] float32 >= 0, visual_positions [n_v] int64)``:
        the greedy tokens before the first EOS (EOS excluded; may be empty), the mapper input
        and where the visual tokens sit in the prompt.
    """
    from transformers import GenerationConfig

    model_type_of(model)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if is_tokenprune_applied(model):
        raise ValueError("model is patched by apply_tokenprune: revert_tokenprune(model) first")
    ids = inputs["input_ids"]
    eos = _eos_ids(model)
    pad = getattr(model.generation_config, "pad_token_id", None)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        suppress_tokens=visual_token_ids(model),
    )
    apply_tokenprune(model, keep_ratio=1.0)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=config)
        pruned = last_pruned(model)
    finally:
        revert_tokenprune(model)
    if pruned is None or len(pruned.scores) != 1:
        raise RuntimeError("the pruning prefill did not run (no visual tokens in the prompt?)")
    vis_pos = visual_positions_of(model, ids)
    kept = pruned.kept_visual[0].to(vis_pos.device)
    if kept.numel() != vis_pos.numel() or not torch.equal(kept, vis_pos):
        raise RuntimeError(
            f"the pruning path saw {kept.numel()} visual tokens, the prompt has {vis_pos.numel()}"
        )
    new = out[0, ids.shape[1] :].to(torch.int64)
    if eos:
        stop = torch.isin(new, torch.tensor(eos, device=new.device)).nonzero()
        if stop.numel():
            new = new[: int(stop[0])]
    attn = pruned.scores[0].detach().to(torch.float32)
    return new, attn, vis_pos


@dataclass
class SampleResult:
    """What :func:`label_sample` found.

    Attributes:
        correct: the greedy answer matches the reference.
        greedy_answer: the decoded greedy answer.
        greedy_ids: ``[n]`` int64 greedy tokens (CPU).
        record: the label (CPU tensors) when ``correct``, else None.
    """

    correct: bool
    greedy_answer: str
    greedy_ids: torch.Tensor
    record: LabelRecord | None


def label_sample(
    model: nn.Module,
    processor: Any,
    record: ExplainRecord,
    *,
    max_new_tokens: int = 32,
    target: str = "logit",
    answer_chunk: int = 1,
    match: str = "normalized",
) -> SampleResult:
    """Label one record: greedy answer, correctness, and (if correct) the relevance label.

    Args:
        model: a supported transformers model with eager attention, not patched.
        processor: its processor (chat template, tokenizer, image/video processor).
        record: the sample.
        max_new_tokens, target, answer_chunk, match: see the CLI options.

    Returns:
        :class:`SampleResult`; ``record.attn`` / ``record.label`` are ``[n_v]`` float32 >= 0.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    inputs = to_model(build_prompt_inputs(processor, record), model)
    answer_ids, attn, vis_pos = greedy_with_attention(model, inputs, max_new_tokens)
    tokenizer = getattr(processor, "tokenizer", processor)
    greedy = tokenizer.decode(answer_ids.tolist(), skip_special_tokens=True)
    answer_ids = answer_ids.cpu()
    if answer_ids.numel() == 0 or not answers_match(greedy, record.answer, match):
        return SampleResult(False, greedy, answer_ids, None)
    rel = explain_relevance(model, inputs, answer_ids, target=target, answer_chunk=answer_chunk)
    if not torch.equal(rel.visual_positions.cpu(), vis_pos.cpu()):
        raise RuntimeError("relevance and attention disagree on the visual positions")
    meta = {
        "model_type": model.config.model_type,
        "modality": record.modality,
        "n_visual": int(vis_pos.numel()),
        "prompt_length": int(inputs["input_ids"].shape[1]),
        "n_answer_tokens": int(answer_ids.numel()),
        "question": record.question,
        "answer": record.answer,
        "greedy_answer": greedy,
        "target": target,
        "line": record.line,
        "media": [str(p) for p in (record.images or record.video_frames)]
        or [str(record.video_file)],
    }
    label = LabelRecord(
        sample_id=record.sample_id,
        attn=attn.detach().cpu().float(),
        label=rel.relevance.detach().cpu().float(),
        meta=meta,
    )
    return SampleResult(True, greedy, answer_ids, label)


__all__ = [
    "MATCH_MODES",
    "SampleResult",
    "answers_match",
    "greedy_with_attention",
    "label_sample",
    "normalize_answer",
    "to_model",
]
