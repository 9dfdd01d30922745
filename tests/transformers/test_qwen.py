"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL patches against the unpatched model and the independent
oracle of ``tokenprune_kernels.testing_models.qwen`` (tiny random configs built in-process, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tokenprune_kernels.mapper import TokenMapper, save_mapper
from tokenprune_kernels.testing_models.qwen import (
    IMAGE_ID,
    QWEN_TYPES,
    VEND_ID,
    VIDEO_ID,
    Sample,
    build_inputs,
    capture_lm_inputs,
    eager_copy,
    hand_prune,
    oracle_greedy,
    oracle_kept,
    oracle_logits,
    real_rows,
)
from tokenprune_kernels.transformers import (
    apply_tokenprune,
    default_instruction_mask_for,
    is_tokenprune_applied,
    last_pruned,
    revert_tokenprune,
)
from tokenprune_kernels.transformers.core import get_patch

ATOL, RTOL = 1e-4, 1e-4

# Two prompts, different image sizes (24 and 48 patches -> 6 and 12 visual tokens).
TWO_SIZES = [
    Sample([("text", 3), ("image", (4, 6)), ("text", 5)]),
    Sample([("text", 2), ("image", (6, 8)), ("text", 4)]),
]
# Several visual inputs per prompt: two images in one, a video (2 frames) in the other.
MIXED = [
    Sample([("text", 2), ("image", (4, 4)), ("text", 2), ("image", (4, 8)), ("text", 4)]),
    Sample([("text", 3), ("video", (2, 4, 6)), ("text", 3)]),
]


def _expected(model, inputs, side, keep_ratio=None, keep_count=None, mapper=None, instr=None,
              **mass):  # fmt: skip
    """Oracle kept sets, the hand-pruned batch and its logits (unpatched model, eager scores;
    ``mass``: the adaptive rule's keep_mass, min_keep_ratio, max_keep_ratio)."""
    assert not is_tokenprune_applied(model)
    kept = oracle_kept(
        eager_copy(model), inputs, keep_ratio=keep_ratio, keep_count=keep_count, mapper=mapper,
        instruction=instr, **mass,
    )  # fmt: skip
    hp = hand_prune(capture_lm_inputs(model, inputs), inputs, kept, side)
    return kept, hp, oracle_logits(model, hp)


def _assert_rows(got, got_mask, want, want_mask):
    for b, (g, w) in enumerate(
        zip(real_rows(got, got_mask), real_rows(want, want_mask), strict=True)
    ):
        assert g.shape == w.shape, f"sample {b}: {tuple(g.shape)} vs {tuple(w.shape)}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=f"sample {b}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_keep_all_equals_unpatched(make_qwen, gen, model_type, attn):
    model = make_qwen(model_type, attn)
    inputs = build_inputs(model_type, TWO_SIZES, gen, "left")
    with torch.no_grad():
        want = model(**inputs).logits
    apply_tokenprune(model, keep_ratio=1.0)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert pruned.removed.tolist() == [0, 0]
    _assert_rows(got, pruned.attention_mask, want, inputs["attention_mask"])
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize(("keep", "side"), [(0.5, "left"), (0.25, "right")])
@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_logits_match_oracle(make_qwen, gen, model_type, keep, side):
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, TWO_SIZES, gen, side)
    kept, hp, want = _expected(model, inputs, side, keep_ratio=keep)
    apply_tokenprune(model, keep_ratio=keep)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    for b in range(2):
        assert torch.equal(pruned.kept_visual[b], kept[b]), f"sample {b}"
        assert torch.equal(pruned.keep_mask[b].nonzero().flatten(), hp.keep[b])
    n_vis = ((inputs["input_ids"] == IMAGE_ID) | (inputs["input_ids"] == VIDEO_ID)).sum(1)
    assert pruned.removed.tolist() == [int(n) - k.numel() for n, k in zip(n_vis, kept, strict=True)]
    assert pruned.padding_side == side
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_generate_matches_oracle(make_qwen, gen, model_type):
    """Batched generate (left padding, different image sizes) = greedy by hand on the unpatched
    language model with the hand-pruned cache and the unpruned decode positions."""
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, TWO_SIZES, gen, "left")
    _, hp, _ = _expected(model, inputs, "left", keep_ratio=0.5)
    want = oracle_greedy(model, hp, 8)
    apply_tokenprune(model, keep_ratio=0.5)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], want)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_several_images_and_a_video(make_qwen, gen, model_type):
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, MIXED, gen, "left")
    kept, hp, want = _expected(model, inputs, "left", keep_ratio=0.25)
    greedy = oracle_greedy(model, hp, 8)
    apply_tokenprune(model, keep_ratio=0.25)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert [k.tolist() for k in pruned.kept_visual] == [k.tolist() for k in kept]
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], greedy)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_manual_decode_without_masks_or_positions(make_qwen, gen, model_type):
    """A hand-written decode loop that passes neither attention_mask nor position_ids: positions
    come from rope_deltas and the pruned cache length, and continue as unpruned."""
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, TWO_SIZES[:1], gen, "left")
    del inputs["attention_mask"]
    kept = oracle_kept(eager_copy(model), inputs, keep_count=2)
    hp = hand_prune(capture_lm_inputs(model, inputs), inputs, kept, "left")
    want = oracle_greedy(model, hp, 8)
    apply_tokenprune(model, keep_count=2)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        tok = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        toks = [tok]
        for _ in range(7):
            out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            toks.append(tok)
    assert torch.equal(torch.stack(toks, 1), want)


def _check_mapper_file(model, model_type, gen, mapper, tmp_path) -> None:
    """``mapper`` saved to a file and applied by path at keep 0.5: kept tokens and logits equal
    the oracle's."""
    path = tmp_path / "mapper.safetensors"
    save_mapper(mapper, path)
    inputs = build_inputs(model_type, TWO_SIZES, gen, "left")
    kept, hp, want = _expected(model, inputs, "left", keep_ratio=0.5, mapper=mapper)
    apply_tokenprune(model, keep_ratio=0.5, mapper=str(path))
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert [k.tolist() for k in pruned.kept_visual] == [k.tolist() for k in kept]
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl"])
def test_mapper_from_safetensors(make_qwen, gen, model_type, tmp_path):
    model = make_qwen(model_type)
    torch.manual_seed(3)
    _check_mapper_file(model, model_type, gen, TokenMapper().eval(), tmp_path)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        apply_tokenprune(model, keep_ratio=0.5, mapper=str(tmp_path / "mapper.pt"))


MASS = {"keep_mass": 0.5, "min_keep_ratio": 0.1, "max_keep_ratio": 0.9}


@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_keep_mass_matches_oracle(make_qwen, gen, model_type, use_mapper):
    """The adaptive budget: per-sample kept counts (and sets, logits, greedy tokens) those of the
    rule computed independently in float64 on the unpatched model's layer-0 attention (raw,
    normalised per sample) or the mapper's softmax."""
    model = make_qwen(model_type)
    torch.manual_seed(5)
    mapper = TokenMapper().eval() if use_mapper else None
    inputs = build_inputs(model_type, MIXED, gen, "left")
    kept, hp, want = _expected(model, inputs, "left", mapper=mapper, **MASS)
    greedy = oracle_greedy(model, hp, 6)
    apply_tokenprune(model, mapper=mapper, **MASS)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert [k.tolist() for k in pruned.kept_visual] == [k.tolist() for k in kept]
    n_vis = ((inputs["input_ids"] == IMAGE_ID) | (inputs["input_ids"] == VIDEO_ID)).sum(1)
    fractions = [k.numel() / int(n) for k, n in zip(kept, n_vis, strict=True)]
    assert all(0.1 <= f <= 0.9 for f in fractions)
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], greedy)


def test_instruction_mask_callable(make_qwen, gen):
    """Callers choose the query tokens: here only the 3 tokens right after the image."""
    model = make_qwen("qwen2_vl")
    inputs = build_inputs("qwen2_vl", TWO_SIZES, gen, "right")
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    last_vis = torch.where(ids == IMAGE_ID, pos, -1).amax(1, keepdim=True)
    instr = (pos > last_vis) & (pos <= last_vis + 3)  # <vision_end> and two text tokens
    kept, hp, want = _expected(model, inputs, "right", keep_ratio=0.5, instr=instr)
    seen = []

    def rule(input_ids, visual_mask, attention_mask):
        seen.append(input_ids)
        return instr

    apply_tokenprune(model, keep_ratio=0.5, instruction_mask=rule)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert torch.equal(seen[0], ids)
    assert [k.tolist() for k in pruned.kept_visual] == [k.tolist() for k in kept]
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)


def test_labels_are_pruned_with_the_tokens(make_qwen, gen):
    model = make_qwen("qwen3_vl")
    inputs = build_inputs("qwen3_vl", TWO_SIZES, gen, "left")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    _, hp, want = _expected(model, inputs, "left", keep_ratio=0.5)
    hand_labels = torch.full_like(hp.attention_mask, -100)
    for b, k in enumerate(hp.keep):
        hand_labels[b, hand_labels.shape[1] - k.numel() :] = labels[b, k]
    want_loss = F.cross_entropy(
        want[:, :-1].reshape(-1, want.shape[-1]), hand_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, want_loss, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == hp.attention_mask.shape[1]


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_apply_twice_and_revert(make_qwen, gen, model_type):
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, TWO_SIZES, gen, "left")
    before = {id(m): dict(vars(m)) for m in (model, model.model, model.model.language_model)}
    with torch.no_grad():
        want = model(**inputs).logits
    kept, _, _ = _expected(model, inputs, "left", keep_ratio=0.25)
    apply_tokenprune(model, keep_ratio=0.5)
    patch = get_patch(model)
    apply_tokenprune(model, keep_ratio=0.25)  # replaces the config, never patches twice
    assert get_patch(model) is patch and patch.config.keep_ratio == 0.25
    assert len(patch._saved) == 4
    with torch.no_grad():
        model(**inputs)
    assert [k.tolist() for k in last_pruned(model).kept_visual] == [k.tolist() for k in kept]
    revert_tokenprune(model)
    revert_tokenprune(model)  # harmless
    assert not is_tokenprune_applied(model)
    for m in (model, model.model, model.model.language_model):
        assert vars(m).keys() == before[id(m)].keys()
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bare_model_and_other_instances_untouched(make_qwen, gen):
    """Patching the bare Qwen2VLModel works; a second instance of the class is unaffected."""
    model, other = make_qwen("qwen2_vl"), make_qwen("qwen2_vl")
    inputs = build_inputs("qwen2_vl", TWO_SIZES, gen, "left")
    apply_tokenprune(model.model, keep_ratio=0.5)
    with torch.no_grad():
        pruned_len = model.model(**inputs).last_hidden_state.shape[1]
        full_len = other.model(**inputs).last_hidden_state.shape[1]
    assert full_len == inputs["input_ids"].shape[1] > pruned_len
    revert_tokenprune(model.model)


def test_bad_input(make_qwen, gen, monkeypatch):
    model = make_qwen("qwen2_vl")
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        apply_tokenprune(model, keep_ratio=0)
    with pytest.raises(ValueError, match="exactly one of keep_ratio, keep_count and keep_mass"):
        apply_tokenprune(model, keep_ratio=0.5, keep_count=3)
    assert not is_tokenprune_applied(model)
    # A prompt that ends with its image has no instruction tokens under the default rule.
    inputs = build_inputs("qwen2_vl", [Sample([("text", 2), ("image", (4, 4))])], gen, "left")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        inputs[key] = inputs[key][:, :-1]  # drop <vision_end>: the prompt ends with the image
    apply_tokenprune(model, keep_ratio=0.5)
    with pytest.raises(ValueError, match="no instruction tokens"), torch.no_grad():
        model(**inputs)
    revert_tokenprune(model)
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.16.0")
    with pytest.raises(RuntimeError, match=r"but transformers 5\.16\.0 is installed"):
        apply_tokenprune(model, keep_ratio=0.5)


def test_visual_tokens_after_a_filled_cache_are_refused(make_qwen, gen):
    """Pruning needs the whole prompt in one call: a new image with a filled cache is an error,
    with the prefill's own cache as with another one."""
    model = make_qwen("qwen2_vl")
    inputs = build_inputs("qwen2_vl", TWO_SIZES[:1], gen, "left")
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="non-empty KV cache"):
            model(**inputs, past_key_values=cache)
        other = DynamicCache(config=model.config.text_config)
        model(input_ids=inputs["input_ids"][:, :2], use_cache=True, past_key_values=other)
        with pytest.raises(NotImplementedError, match="non-empty KV cache"):
            model(**inputs, past_key_values=other)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_vision_end_is_not_an_instruction(make_qwen, gen, model_type):
    """``<image><|vision_end|>`` with no text after it has no instruction: the clear error, from
    input_ids or (inputs_embeds only) from the token's embedding. With text after it, the
    default instruction is that text without <|vision_end|>, as the oracle takes it."""
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, [Sample([("text", 3), ("image", (4, 4))])], gen, "left")
    assert inputs["input_ids"][0, -1] == VEND_ID
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    no_ids = {k: v for k, v in inputs.items() if k != "input_ids"}
    apply_tokenprune(model, keep_ratio=0.5)
    for call in (inputs, {**no_ids, "inputs_embeds": embeds}):
        with (
            pytest.raises(ValueError, match="have visual tokens but no instruction tokens"),
            torch.no_grad(),
        ):
            model(**call)

    inputs = build_inputs(model_type, TWO_SIZES, gen, "left")
    ids = inputs["input_ids"]
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    pos = torch.arange(ids.shape[1])
    after = pos > torch.where(visual, pos, -1).amax(1, keepdim=True)
    want = after & inputs["attention_mask"].bool() & (ids != VEND_ID)
    got = default_instruction_mask_for(model, ids, visual, inputs["attention_mask"])
    assert torch.equal(got, want) and int(got.sum()) == 5 + 4
    revert_tokenprune(model)
    kept = oracle_kept(eager_copy(model), inputs, keep_ratio=0.5)
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    assert [k.tolist() for k in last_pruned(model).kept_visual] == [k.tolist() for k in kept]


def test_unsupported_model_type():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type 'qwen2' is not supported"):
        apply_tokenprune(model, keep_ratio=0.5)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_flash_attention_sees_one_sequence(make_qwen, gen, model_type):
    """FlashAttention (batch 1, no pads) reads the decoder layers' ``position_ids`` to find packed
    sequences; the gaps left by pruning must not look like sequence boundaries. Checked with
    transformers' own test on what the decoder layers receive, prefill of generate() included."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    model = make_qwen(model_type)
    inputs = build_inputs(model_type, TWO_SIZES[1:], gen, "left")
    seen = []

    def hook(_module, args, kwargs):
        seen.append((args[0].shape[1], kwargs.get("position_ids")))

    apply_tokenprune(model, keep_ratio=0.25)
    handle = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    n_pruned = last_pruned(model).attention_mask.shape[1]
    prefills = [pos for length, pos in seen if length == n_pruned]
    assert len(prefills) == 2 and n_pruned < inputs["input_ids"].shape[1]
    for pos in prefills:
        assert pos is None or not _is_packed_sequence(pos, 1)
    assert any(pos is not None for pos in prefills)  # generate() passes a text row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keep_all_equals_unpatched(make_qwen, gen, dtype):
    model = make_qwen("qwen2_5_vl").to(dtype)
    inputs = build_inputs("qwen2_5_vl", MIXED, gen, "left")
    for key in ("pixel_values", "pixel_values_videos"):
        inputs[key] = inputs[key].to(dtype)
    with torch.no_grad():
        want = model(**inputs).logits
    apply_tokenprune(model, keep_ratio=1.0)
    with torch.no_grad():
        got = model(**inputs).logits
    assert got.dtype == dtype
    _assert_rows(got, last_pruned(model).attention_mask, want, inputs["attention_mask"])


@pytest.mark.parametrize(
    ("model_type", "groups", "grid"),
    [("qwen2_vl", 2, False), ("qwen2_5_vl", 4, True), ("qwen3_vl", 2, True)],
)
def test_mapper_v2_inputs(make_qwen, gen, model_type, groups, grid, tmp_path):
    """A mapper on per-head-group attention (and grid positions): apply_tokenprune picks its input
    from the file's config; kept tokens and logits equal the oracle's (eager attention per head,
    grid from image_grid_thw)."""
    from tokenprune_kernels.mapper import MapperConfig

    model = make_qwen(model_type)
    torch.manual_seed(4)
    mapper = TokenMapper(MapperConfig(channels=(8, 16), attention_channels=groups, grid=grid))
    _check_mapper_file(model, model_type, gen, mapper.eval(), tmp_path)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_spread_rule_matches_oracle(make_qwen, gen, model_type):
    """``spread_radius``: the kept tokens are the spread rule's (``spread_select_ref``) on the
    unpatched model's own layer-0 attention, with each image / video frame's (row, col) taken
    from image_grid_thw / video_grid_thw (not from the M-RoPE ids the patch reads); the logits
    those of the hand-pruned batch; and the rule changed what is kept."""
    model = make_qwen(model_type)
    inputs = build_inputs(model_type, MIXED, gen, "left")
    kept = oracle_kept(eager_copy(model), inputs, keep_ratio=0.4, spread_radius=1)
    plain = oracle_kept(eager_copy(model), inputs, keep_ratio=0.4)
    assert [k.tolist() for k in kept] != [k.tolist() for k in plain]
    hp = hand_prune(capture_lm_inputs(model, inputs), inputs, kept, "left")
    want = oracle_logits(model, hp)
    apply_tokenprune(model, keep_ratio=0.4, spread_radius=1)
    with torch.no_grad():
        got = model(**inputs).logits
    pruned = last_pruned(model)
    assert [k.tolist() for k in pruned.kept_visual] == [k.tolist() for k in kept]
    _assert_rows(got, pruned.attention_mask, want, hp.attention_mask)


def test_spread_radius_is_checked(make_qwen):
    model = make_qwen("qwen2_vl")
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(ValueError, match=r"spread_radius must be an int in \[0, 64\]"):
            apply_tokenprune(model, keep_ratio=0.5, spread_radius=bad)
    assert not is_tokenprune_applied(model)
