"""One sample through the pipeline with the real Qwen2-VL processor (chat template, image
processor, ``mm_token_type_ids``, ``image_grid_thw``): correctness filter, label, mapper input."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

import tokenprune_kernels.testing_models.qwen as Q

pytest.importorskip("PIL", reason="tokenprune explain reads images with Pillow")
from tokenprune_kernels.explain.data import build_prompt_inputs, read_records
from tokenprune_kernels.explain.pipeline import label_sample
from tokenprune_kernels.testing_models.explain import independent_relevance, save_image

SPECIALS = {
    Q.PAD_ID: "<pad>",
    Q.IMAGE_ID: "<|image_pad|>",
    Q.VIDEO_ID: "<|video_pad|>",
    Q.VSTART_ID: "<|vision_start|>",
    Q.VEND_ID: "<|vision_end|>",
    124: "<|im_start|>",
    125: "<|im_end|>",
    126: "user",
    127: "assistant",
}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %} {{ c.text }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def _qwen_processor():
    """A real ``Qwen2VLProcessor`` (word-level tokenizer, PIL image processor, no video
    processor). transformers 5.23 refuses to construct it without torchvision (its class check
    looks up the video processor classes), so that check is bypassed while constructing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    vocab = {SPECIALS.get(i, f"w{i}"): i for i in range(Q.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        additional_special_tokens=[v for k, v in SPECIALS.items() if v.startswith("<|")],
    )
    images = Qwen2VLImageProcessorPil(
        patch_size=Q.PATCH,
        temporal_patch_size=Q.TPATCH,
        merge_size=Q.MERGE,
        min_pixels=16,
        max_pixels=12 * 12,
    )
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
        return Qwen2VLProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=TEMPLATE,
        )


def test_label_sample_qwen2_vl(tmp_path, gen):
    processor = _qwen_processor()
    model = Q.make_model("qwen2_vl", attn="eager", seed=2)
    save_image(tmp_path / "a.png", gen, (12, 8))
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "image": "a.png", "question": "w5 w9 w40", "answer": "w3 w3 w3 w3"}\n'
    )
    (record,) = read_records(tmp_path / "d.jsonl")
    inputs = build_prompt_inputs(processor, record)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 4]]  # 12x8 px, patch 2 -> 6 tokens
    ids = inputs["input_ids"][0].tolist()
    assert ids == [124, 126, Q.VSTART_ID, *[Q.IMAGE_ID] * 6, Q.VEND_ID, 5, 9, 40, 125, 124, 127]
    assert inputs["mm_token_type_ids"][0].tolist() == [0, 0, 0, *[1] * 6, 0, 0, 0, 0, 0, 0, 0]

    wrong = label_sample(model, processor, record, max_new_tokens=4)
    assert not wrong.correct and wrong.record is None and wrong.greedy_ids.numel() == 4
    right = dataclasses.replace(record, answer=wrong.greedy_answer)
    result = label_sample(model, processor, right, max_new_tokens=4, target="logprob")
    assert result.correct and torch.equal(result.greedy_ids, wrong.greedy_ids)
    rec = result.record
    assert rec.sample_id == "a" and rec.attn.shape == rec.label.shape == (6,)
    assert rec.meta["model_type"] == "qwen2_vl" and rec.meta["prompt_length"] == len(ids)
    want = independent_relevance(
        model, inputs, result.greedy_ids, [Q.IMAGE_ID, Q.VIDEO_ID], target="logprob"
    )
    torch.testing.assert_close(rec.label.double(), want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        a0 = model(**inputs, output_attentions=True).attentions[0][0].double()
    vis = torch.arange(3, 9)
    want_attn = a0[:, 10:][:, :, vis].mean((0, 1))  # instruction: after <|vision_end|>
    torch.testing.assert_close(rec.attn.double(), want_attn, rtol=1e-5, atol=1e-7)
