"""The grounded model's tokenizer, processor, config and save / load round trip, on a tiny random
Qwen2-VL built in-process (the training recipe's batches and forward: test_train*.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded import scenes as S

TINY = dict(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48, num_heads=4)


@pytest.fixture(scope="module")
def tiny():
    return M.build_model(M.build_config(**TINY), seed=1)


def test_vocab_and_tokenizer(processor):
    tok = processor.tokenizer
    assert len(M.VOCAB) == len(set(M.VOCAB)) <= M.VOCAB_SIZE
    for word, i in M.TOKEN_ID.items():
        assert tok.convert_tokens_to_ids(word) == i
    for answer in S.ANSWERS:  # every answer is one token
        assert tok(answer, add_special_tokens=False)["input_ids"] == [M.TOKEN_ID[answer]]
    text = "how many red objects are there ?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert M.TOKEN_ID["<unk>"] not in ids and tok.decode(ids) == text
    assert tok("<|im_start|>assistant red <|im_end|>")["input_ids"] == [
        M.TOKEN_ID["<|im_start|>"], M.TOKEN_ID["assistant"], M.TOKEN_ID["red"], M.TOKEN_ID["<|im_end|>"]
    ]  # fmt: skip


def test_prompt_and_inputs(processor):
    q = "what colour is the circle ?"
    assert M.prompt_text(q, processor) == M.prompt_text(q)
    imgs = [S.make_sample("val", i, size=(224, 288)).image for i in range(2)]
    inputs = M.build_inputs(processor, imgs, [q, "is the red object left of the blue object ?"])
    ids = inputs["input_ids"]
    n_tok = S.visual_tokens((224, 288))
    assert ((ids == M.TOKEN_ID["<|image_pad|>"]).sum(1) == n_tok).all()
    assert torch.equal(inputs["mm_token_type_ids"], (ids == M.TOKEN_ID["<|image_pad|>"]).long())
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 36]] * 2
    assert inputs["pixel_values"].shape == (2 * 28 * 36, 3 * 2 * 8 * 8)
    # left padding: the shorter question is padded at the front; both end in the assistant header
    assert ids[0, 0] == M.TOKEN_ID["<pad>"] and inputs["attention_mask"][0, 0] == 0
    assert ids[:, -2:].tolist() == [[M.TOKEN_ID["<|im_start|>"], M.TOKEN_ID["assistant"]]] * 2
    with pytest.raises(ValueError, match="one length"):
        M.build_inputs(processor, imgs, [q])
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        M.prompt_text("  ")


def test_config_shape_and_errors():
    c = M.build_config()
    assert c.model_type == "qwen2_vl" and c.text_config.num_hidden_layers >= 4
    assert c.vision_config.patch_size * c.vision_config.spatial_merge_size == S.TOKEN_PX
    assert sum(c.text_config.rope_parameters["mrope_section"]) == 128 // 4 // 2
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        M.build_config(num_layers=0)
    with pytest.raises(ValueError, match=r"mrope_section must be .*multiple of 3.*got \[8, 8\]"):
        M.build_config(mrope_section=[8, 8])
    with pytest.raises(ValueError, match="at least one frequency to each of t, h and w"):
        M.build_config(mrope_section=[8, 0, 0, 8, 0, 0])
    with pytest.raises(ValueError, match=r"ints >= 0 summing to half the head dim \(16\)"):
        M.build_config(mrope_section=[8, 4, 5])
    with pytest.raises(ValueError, match="hidden_size"):
        M.build_config(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="vision_dim"):
        M.build_config(vision_dim=20, vision_heads=4)


def test_save_load_round_trip(tmp_path, processor, tiny):
    sample = S.make_sample("test", 4, size=(256, 256))
    inputs = M.build_inputs(processor, [sample.image], [sample.question.text])
    with torch.no_grad():
        want = tiny(**inputs).logits
    path = M.save_model_dir(tiny, processor, tmp_path / "m")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model, proc = M.load_model_dir(path)
    again = M.build_inputs(proc, [sample.image], [sample.question.text])
    assert again.keys() == inputs.keys()
    for k in inputs:
        assert torch.equal(again[k], inputs[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(**again).logits, want, rtol=0, atol=0)
    assert model.generation_config.eos_token_id == M.TOKEN_ID["<|im_end|>"]
    a = M.generate_answers(model, proc, [sample.image], [sample.question.text])
    b = M.generate_answers(tiny, processor, [sample.image], [sample.question.text])
    assert a == b and len(a) == 1
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        M.load_model_dir(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        M.load_processor(tmp_path)


@pytest.mark.parametrize("section", [[2, 7, 7], [1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 7, 0, 0]])
def test_mrope_sections_reach_the_rotary_embedding_as_documented(section):
    """Chunk i of ``mrope_section`` rotates by position component i % 3 (t, h, w) in the
    installed transformers: the interleaved layout is what the model really computes."""
    import torch

    model = M.build_model(M.build_config(mrope_section=section)).eval()
    rotary = model.model.language_model.rotary_emb
    pos = torch.tensor([3.0, 5.0, 11.0]).view(3, 1, 1)  # t, h, w of one token
    x = torch.zeros(1, 1, 32)
    cos, _ = rotary(x, pos.long())
    inv = rotary.inv_freq
    comp = [i % 3 for i, n in enumerate(section) for _ in range(n)]
    want = torch.stack([torch.cos(pos[c, 0, 0] * inv[k]) for k, c in enumerate(comp)])
    torch.testing.assert_close(cos[0, 0, :16], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos[0, 0, 16:], want, rtol=1e-5, atol=1e-6)
