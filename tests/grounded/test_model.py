"""The grounded model's tokenizer, processor, save / load round trip and training forward, on a
tiny random Qwen2-VL built in-process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded import scenes as S
from tokenprune_kernels.grounded.train import (
    answer_loss,
    encode_training_batch,
    training_batch,
    training_logits,
    training_scenes,
)

TINY = dict(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48, num_heads=4)


@pytest.fixture(scope="module")
def processor():
    return M.build_processor()


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


@pytest.mark.parametrize("multi_turn", [False, True], ids=["single", "multi"])
def test_training_batch_matches_processor(processor, multi_turn):
    kw = dict(scale=1.5, aug_prob=0.5, aug_max=2.0)
    batch, size, qtypes = training_batch(processor, 3, 0, 2, 3, multi_turn, **kw)
    size2, scenes = training_scenes(3, 0, 2, 3, **kw)
    assert size == size2 and [q.qtype for _, qs in scenes for q in qs] == qtypes
    n_seq = 2 if multi_turn else len(qtypes)
    assert batch["input_ids"].shape[0] == batch["image_index"].numel() == n_seq
    assert batch["image_grid_thw"].shape[0] == 2
    assert int((batch["labels"] != -100).sum()) == 2 * len(qtypes)  # answer + <|im_end|> each
    # sequence 0 starts with exactly the evaluation prompt of its image + answer + <|im_end|>
    scene, qs = scenes[0]
    image = S.render_scene(scene)
    ref = M.build_inputs(processor, [image], [qs[0].text])
    prompt_len = ref["input_ids"].shape[1]
    assert batch["input_ids"][0, :prompt_len].tolist() == ref["input_ids"][0].tolist()
    ans = [M.TOKEN_ID[qs[0].answer], M.TOKEN_ID["<|im_end|>"]]
    assert batch["input_ids"][0, prompt_len : prompt_len + 2].tolist() == ans
    assert batch["labels"][0, prompt_len : prompt_len + 2].tolist() == ans
    assert (batch["labels"][0, :prompt_len] == -100).all()
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    words = processor.tokenizer.decode(row).split()
    if multi_turn:  # later turns: each question then its answer, in order
        for q in qs[1:]:
            turn = f"<|im_start|> user {q.text} <|im_end|> <|im_start|> assistant {q.answer} <|im_end|>"
            assert turn in " ".join(words)
        labelled = batch["labels"][0][batch["labels"][0] != -100][0::2].tolist()
        assert labelled == [M.TOKEN_ID[q.answer] for q in qs]
    else:
        assert words[-2:] == [qs[0].answer, "<|im_end|>"]
    patches = int(batch["image_grid_thw"][0].prod())
    assert torch.equal(batch["pixel_values"][:patches], ref["pixel_values"])
    with pytest.raises(ValueError, match="one size"):
        encode_training_batch(
            processor,
            [image, S.make_sample("val", 0, size=(224, 224)).image],
            [["a ?"], ["b ?"]],
            [["red"], ["red"]],
        )
    with pytest.raises(ValueError, match="one known word"):
        encode_training_batch(processor, [image], [["what colour is it ?"]], [["red blue"]])


def test_training_logits_equal_standard_forward(processor, tiny):
    batch, _, _ = training_batch(processor, step=5, seed=2, n_images=2, n_questions=3)
    with torch.no_grad():
        got = training_logits(tiny, batch)
    grid, idx = batch["image_grid_thw"], batch["image_index"]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(1).cumsum(0)])
    for s in range(batch["input_ids"].shape[0]):
        i = int(idx[s])
        n = int(batch["attention_mask"][s].sum())
        with torch.no_grad():
            want = tiny(
                input_ids=batch["input_ids"][s : s + 1, :n],
                mm_token_type_ids=batch["mm_token_type_ids"][s : s + 1, :n],
                pixel_values=batch["pixel_values"][starts[i] : starts[i + 1]],
                image_grid_thw=grid[i : i + 1],
            ).logits
        torch.testing.assert_close(got[s, :n], want[0], rtol=1e-5, atol=1e-5)
    # the loss sees exactly the answer and <|im_end|> positions; it backpropagates to the tower
    loss = answer_loss(training_logits(tiny, batch), batch["labels"])
    loss.backward()
    assert tiny.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)
    logits = torch.zeros(1, 4, M.VOCAB_SIZE)
    logits[0, 1, 7] = 50.0  # position 1 predicts label[2] = 7: zero loss there
    labels = torch.tensor([[-100, -100, 7, -100]])
    assert float(answer_loss(logits, labels)) < 1e-6


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
