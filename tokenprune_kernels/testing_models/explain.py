"""Helpers of the explain tests and benchmarks: a tiny LLaVA model directory with a processor,
media files and data sets, and the independent relevance computation (the formula, from
``output_attentions``). Pillow and tokenizers are imported where used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tokenprune_kernels.testing_models.llava import (
    IMAGE_ID,
    LLAVA_IMAGE,
    PAD_ID,
    VOCAB,
    build_model,
)

SPECIALS = {PAD_ID: "<pad>", 1: "<unk>", IMAGE_ID: "<image>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<image>{% else %} {{ c.text }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} w3{% endif %}"
)


def word(i: int) -> str:
    """The vocabulary's word of token id ``i``."""
    return SPECIALS.get(i, f"w{i}")


def make_tokenizer():
    """A word-level fast tokenizer over ``VOCAB`` ids, built in-process (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def save_llava_dir(path: Path, model=None, image_size: int = LLAVA_IMAGE) -> Path:
    """Save a tiny random LLaVA (fp32; ``model`` if given, its CLIP tower sized for
    ``image_size``-pixel images) and a matching ``LlavaProcessor`` to ``path``."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = build_model("llava", attn="eager", seed=3) if model is None else model
    model.save_pretrained(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(),
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def save_image(path: Path, gen: torch.Generator, size: tuple[int, int] = (24, 30)) -> Path:
    """A random RGB PNG of ``size`` (height, width)."""
    from PIL import Image

    arr = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def greedy_answers(loaded, data_file: Path, max_new: int) -> dict:
    """The model's greedy answer (text, ids, prompt inputs) for each record of a data file."""
    from tokenprune_kernels.explain.data import build_prompt_inputs, read_records
    from tokenprune_kernels.explain.pipeline import greedy_with_attention, to_model

    model, processor = loaded
    out = {}
    for record in read_records(data_file):
        inputs = to_model(build_prompt_inputs(processor, record), model)
        ids, _, _ = greedy_with_attention(model, inputs, max_new)
        out[record.sample_id] = (
            processor.tokenizer.decode(ids.tolist(), skip_special_tokens=True),
            ids,
            inputs,
        )
    return out


def make_dataset(
    tmp_path: Path, gen: torch.Generator, loaded, max_new: int, wrong=("s1",), n: int = 3
) -> tuple[Path, dict]:
    """Records s0..s{n-1} in ``tmp_path/data.jsonl``; each answer is the model's greedy answer
    (upper case, with a final period: the normalized match ignores both) except those in
    ``wrong``. Returns the data file and :func:`greedy_answers`."""
    recs = []
    for i in range(n):
        save_image(tmp_path / f"im{i}.png", gen, (22 + 3 * i, 31 - i))
        recs.append(
            {"id": f"s{i}", "image": f"im{i}.png", "question": f"w5 w{9 + i} w11", "answer": "?"}
        )
    data = write_jsonl(tmp_path / "data.jsonl", recs)
    greedy = greedy_answers(loaded, data, max_new)
    for r in recs:
        text = greedy[r["id"]][0]
        assert text.strip()
        r["answer"] = "w7 w7 w7" if r["id"] in wrong else text.upper() + "."
        assert r["id"] in wrong or text != r["answer"]
    write_jsonl(data, recs)
    return data, greedy


def extend(inputs: dict, answer: torch.Tensor) -> dict:
    """Prompt + answer[:-1] (teacher forcing), written out by hand."""
    n = answer.numel() - 1
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], answer[None, :n]], dim=1)
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
        if key in inputs:
            extra = torch.full((1, n), fill, dtype=inputs[key].dtype)
            full[key] = torch.cat([inputs[key], extra], dim=1)
    return full


def independent_relevance(
    model, inputs: dict, answer: torch.Tensor, visual_ids: list[int], target: str = "logit"
) -> torch.Tensor:
    """The formula, computed directly in float64: all layers' attention probabilities from
    ``output_attentions=True``, their full gradients per answer token, the FULL matrix
    recurrence ``R <- R + mean_h relu(A * dA) @ R`` from ``R = I``, row ``P - 1 + t``, visual
    columns, mean over the answer tokens. Returns ``[n_v]`` float64."""
    full = extend(inputs, answer)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.enable_grad():
        out = model(**full, output_attentions=True, use_cache=False)
    atts = out.attentions
    n_layers = model.config.text_config.num_hidden_layers
    assert len(atts) == n_layers
    length = full["input_ids"].shape[1]
    vis = torch.isin(full["input_ids"][0], torch.tensor(visual_ids)).nonzero().flatten()
    rows = []
    for t in range(answer.numel()):
        logits = out.logits[0, prompt_len - 1 + t]
        if target == "logprob":
            logits = torch.log_softmax(logits.double(), dim=-1)
        grads = torch.autograd.grad(logits[answer[t]], atts, retain_graph=True)
        relevance = torch.eye(length, dtype=torch.float64)
        for a, g in zip(atts, grads, strict=True):
            abar = (a[0].double() * g[0].double()).clamp(min=0).mean(dim=0)
            relevance = relevance + abar @ relevance
        rows.append(relevance[prompt_len - 1 + t, vis])
    return torch.stack(rows).mean(dim=0)
