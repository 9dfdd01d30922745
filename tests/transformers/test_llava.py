"""tokenprune_kernels.transformers.llava: LLaVA and LLaVA-OneVision patched at the merge seam.

Every pruned result is compared with an independent computation
(``tokenprune_kernels.testing_models.llava.oracle``): the unpatched model with eager attention and
``output_attentions=True`` gives the layer-0 attention, the reference selects, and the unpatched
language model runs on the hand-pruned sequence.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper
from tokenprune_kernels.testing_models.llava import (
    FAMILIES,
    IMAGE_ID,
    VIDEO_ID,
    Sample,
    build_inputs,
    build_model,
    generate_position_ids,
    oracle,
    unpatched_logits,
)
from tokenprune_kernels.transformers import (
    TokenPruneConfig,
    apply_tokenprune,
    default_instruction_mask_for,
    is_tokenprune_applied,
    last_pruned,
    prune_inputs,
    revert_tokenprune,
)
from tokenprune_kernels.transformers.llava import layer0_from_text_model
from tokenprune_kernels.transformers.patch import get_patch

ATOL, RTOL = 1e-4, 1e-4


def _two_samples(family: str) -> list[Sample]:
    """Batch of 2: several images in one prompt, different image sizes / counts."""
    if family == "llava":
        return [
            Sample([("text", 4), ("image", None), ("text", 3), ("image", None), ("text", 7)]),
            Sample([("text", 2), ("image", None), ("text", 9)]),
        ]
    return [
        Sample([("text", 4), ("image", (20, 30)), ("text", 3), ("image", (16, 16)), ("text", 7)]),
        Sample([("text", 2), ("image", (30, 14)), ("text", 9)]),
    ]


def _patched(model, inputs: dict, **kwargs):
    """Per-sample real-position logits of a patched model, and its PrunedInputs."""
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    pruned = last_pruned(model)
    assert pruned is not None, "the patched forward did not prune"
    mask = pruned.attention_mask.bool()
    return [out.logits[b][mask[b]] for b in range(out.logits.shape[0])], pruned


def _assert_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for b, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"sample {b}: {tuple(g.shape)} vs {tuple(w.shape)}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=f"sample {b}")


def _assert_kept(pruned, expected) -> None:
    for b, (k, e) in enumerate(zip(pruned.kept_visual, expected.kept, strict=True)):
        assert torch.equal(k.cpu(), e), f"sample {b}: kept {k.tolist()} vs {e.tolist()}"


def _assert_oracle(got: list[torch.Tensor], pruned, expected) -> None:
    """The patched run kept the oracle's visual tokens and gave its logits."""
    _assert_kept(pruned, expected)
    _assert_logits(got, expected.logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_gives_unpatched_logits_and_revert_is_exact(family, attn, gen):
    model = build_model(family, attn)
    inputs = build_inputs(model, _two_samples(family), gen, "left")
    before = unpatched_logits(model, inputs)
    inner, lm = model.model, model.model.language_model
    attrs = (set(vars(model)), set(vars(inner)), set(vars(lm)))
    apply_tokenprune(model, keep_ratio=1.0)
    got, pruned = _patched(model, inputs)
    assert int(pruned.removed.sum()) == 0
    _assert_logits(got, before)
    revert_tokenprune(model)
    assert not is_tokenprune_applied(model)
    assert (set(vars(model)), set(vars(inner)), set(vars(lm))) == attrs
    after = unpatched_logits(model, inputs)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)
    revert_tokenprune(model)  # harmless when not applied


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("keep", [0.5, 0.25])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_match_independent_computation(family, keep, side, gen):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, side)
    expected = oracle(model, inputs, keep_ratio=keep)
    apply_tokenprune(model, keep_ratio=keep)
    got, pruned = _patched(model, inputs)
    assert pruned.padding_side == side
    assert int(pruned.removed.min()) > 0
    _assert_oracle(got, pruned, expected)


@pytest.mark.parametrize("keep", [0.5, 0.25])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_independent_greedy_decode(family, keep, gen):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "left")
    n_new = 8
    expected = oracle(
        model,
        inputs,
        keep_ratio=keep,
        position_ids=generate_position_ids(inputs["attention_mask"]),
        new_tokens=n_new,
    )
    apply_tokenprune(model, keep_ratio=keep)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=n_new)
    pruned = last_pruned(model)
    assert pruned is not None and int(pruned.removed.min()) > 0
    _assert_kept(pruned, expected)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected.tokens)


def test_video_and_image_onevision(gen):
    model = build_model("llava_onevision")
    samples = [
        Sample([("text", 3), ("video", 3), ("text", 2), ("image", (32, 16)), ("text", 6)]),
        Sample([("text", 5), ("video", 3), ("text", 4)]),
    ]
    inputs = build_inputs(model, samples, gen, "left")
    assert "pixel_values_videos" in inputs and "pixel_values" in inputs
    expected = oracle(
        model,
        inputs,
        keep_ratio=0.25,
        position_ids=generate_position_ids(inputs["attention_mask"]),
        new_tokens=8,
    )
    apply_tokenprune(model, keep_ratio=0.25)
    got, pruned = _patched(
        model, inputs, position_ids=generate_position_ids(inputs["attention_mask"])
    )
    _assert_oracle(got, pruned, expected)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_mapper_scores_match_independent_computation(family, gen, tmp_path):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "right")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    mapper = TokenMapper(MapperConfig(channels=(8, 16, 8), kernel_size=3)).eval()
    expected = oracle(model, inputs, keep_ratio=0.5, mapper=mapper)
    raw = oracle(model, inputs, keep_ratio=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(expected.kept, raw.kept, strict=True)), (
        "the mapper should change the selection here"
    )
    path = tmp_path / "mapper.safetensors"
    save_mapper(mapper, path)
    for spec in (mapper, str(path)):
        apply_tokenprune(model, keep_ratio=0.5, mapper=spec)
        got, pruned = _patched(model, inputs)
        _assert_oracle(got, pruned, expected)


MASS = {"keep_mass": 0.6, "min_keep_ratio": 0.05, "max_keep_ratio": 0.8}


@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_mass_matches_independent_computation(family, use_mapper, gen):
    """The adaptive budget: per-sample kept sets, logits and greedy tokens those of the rule
    computed independently in float64 (raw attention normalised per sample, or the mapper's
    softmax) on the unpatched model."""
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "left")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    mapper = TokenMapper(MapperConfig(channels=(8, 16, 8), kernel_size=3)).eval()
    mapper = mapper if use_mapper else None
    n_new = 6
    expected = oracle(model, inputs, mapper=mapper, new_tokens=n_new, **MASS,
                      position_ids=generate_position_ids(inputs["attention_mask"]))  # fmt: skip
    apply_tokenprune(model, mapper=mapper, **MASS)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=n_new)
    _assert_kept(last_pruned(model), expected)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected.tokens)
    n_vis = [(row == IMAGE_ID).sum() for row in inputs["input_ids"]]
    assert all(0.05 <= k.numel() / int(n) <= 0.8 for k, n in zip(expected.kept, n_vis, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_pruned_like_the_sequence(family, gen):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "right")
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == IMAGE_ID) | (inputs["attention_mask"] == 0), -100)
    labels[0, -3] = 7  # a label inside the instruction
    expected = oracle(model, inputs, keep_ratio=0.5, labels=labels)
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        positional = model(inputs["input_ids"], **rest, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(positional.loss, out.loss)
    assert out.logits.shape[1] == last_pruned(model).attention_mask.shape[1]


def test_training_loss_reaches_the_vision_side(gen):
    """With autograd on, the loss of the pruned model backpropagates into the vision side through
    the KEPT visual tokens only (a non-zero gradient at each of them, exactly zero at the removed
    ones), with the gradient of the same loss computed by hand on the hand-pruned sequence."""
    model = build_model("llava")
    inputs = build_inputs(model, _two_samples("llava"), gen, "left")
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    labels = ids.masked_fill(~real, -100)
    visual = ids == IMAGE_ID
    kept = oracle(model, inputs, keep_ratio=0.5).kept

    # By hand: the unpatched model's language model on the hand-pruned (left-padded) sequence.
    keep = real & ~visual
    for b, k in enumerate(kept):
        keep[b, k] = True
    width = int(keep.sum(1).max())
    src = [keep[b].nonzero().flatten() for b in range(2)]

    def hand_prune(_module, args, kwargs):
        e = kwargs["inputs_embeds"]
        pads = [e.new_zeros(width - s.numel(), e.shape[-1]) for s in src]
        kwargs["inputs_embeds"] = torch.stack(
            [torch.cat([p, e[b, s]]) for b, (p, s) in enumerate(zip(pads, src, strict=True))]
        )
        kwargs["attention_mask"] = torch.stack(
            [(torch.arange(width) >= width - s.numel()).long() for s in src]
        )
        kwargs["position_ids"] = torch.stack(
            [torch.cat([torch.zeros(width - s.numel(), dtype=torch.long), s]) for s in src]
        )
        return args, kwargs

    ref = copy.deepcopy(model)
    hook = ref.model.language_model.register_forward_pre_hook(hand_prune, with_kwargs=True)
    logits = ref(**inputs).logits
    hook.remove()
    hand_labels = torch.stack(
        [
            torch.cat([torch.full((width - s.numel(),), -100), labels[b, s]])
            for b, s in enumerate(src)
        ]
    )
    want_loss = ref.loss_function(
        logits=logits, labels=hand_labels, vocab_size=ref.config.text_config.vocab_size
    )
    want_loss.backward()
    want = ref.model.multi_modal_projector.linear_2.weight.grad
    assert want is not None and bool(want.abs().sum() > 0)

    features: dict = {}

    def keep_grad(_module, _args, out):
        out.retain_grad()
        features["out"] = out

    projector = model.model.multi_modal_projector
    hook = projector.register_forward_hook(keep_grad)
    apply_tokenprune(model, keep_ratio=0.5)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    hook.remove()
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    grad = projector.linear_2.weight.grad
    assert grad is not None
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)
    # The features fill the visual positions in row-major order (sample, then position).
    per_token = features["out"].grad.reshape(-1, features["out"].shape[-1]).abs().sum(-1)
    rows = visual.nonzero()
    is_kept = torch.tensor([bool((kept[b] == p).any()) for b, p in rows.tolist()])
    assert 0 < int(is_kept.sum()) < is_kept.numel()
    assert torch.equal(per_token > 0, is_kept)


def test_bfloat16_model_runs_pruned(gen):
    model = build_model("llava_onevision").to(torch.bfloat16)
    inputs = build_inputs(model, _two_samples("llava_onevision"), gen, "left")
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    apply_tokenprune(model, keep_ratio=0.25)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    pruned = last_pruned(model)
    visual = (inputs["input_ids"] == IMAGE_ID).sum(1)
    assert [k.numel() for k in pruned.kept_visual] == [int(n * 0.25 + 0.5) for n in visual]
    assert pruned.inputs_embeds.dtype == torch.bfloat16
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_twice_is_harmless_and_replaces_the_config(family, gen):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "left")
    quarter = oracle(model, inputs, keep_ratio=0.25)
    inner = model.model
    apply_tokenprune(model, keep_ratio=0.5)
    wrapped = (model.forward, inner.forward, inner.language_model.forward)
    apply_tokenprune(model, keep_ratio=0.25)
    assert (model.forward, inner.forward, inner.language_model.forward) == wrapped
    got, pruned = _patched(model, inputs)
    _assert_kept(pruned, quarter)
    _assert_logits(got, quarter.logits)
    revert_tokenprune(model)
    assert "forward" not in vars(model) and "forward" not in vars(inner)
    assert "forward" not in vars(inner.language_model)
    assert "get_placeholder_mask" not in vars(inner)


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_model_without_lm_head(family, gen):
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "left")
    expected = oracle(model, inputs, keep_ratio=0.5)
    apply_tokenprune(model.model, keep_ratio=0.5)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        logits = model.lm_head(hidden)
    mask = last_pruned(model.model).attention_mask.bool()
    _assert_logits([logits[b][mask[b]] for b in range(2)], expected.logits)


def test_no_mask_no_cache_and_manual_decode(gen):
    """Gapped position ids without a mask or cache must not be read as packed sequences; a
    hand-written decode loop without position ids continues at the unpruned length."""
    model = build_model("llava")
    inputs = build_inputs(model, [_two_samples("llava")[0]], gen)
    expected = oracle(model, inputs, keep_ratio=0.25, new_tokens=3)
    apply_tokenprune(model, keep_ratio=0.25)
    bare = {k: v for k, v in inputs.items() if k != "attention_mask"}
    got, _ = _patched(model, bare, use_cache=False)
    _assert_logits(got, expected.logits)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, mask = out.past_key_values, inputs["attention_mask"]
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=cache)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), expected.tokens)


def test_custom_instruction_mask(gen):
    model = build_model("llava_onevision")
    inputs = build_inputs(model, _two_samples("llava_onevision"), gen, "left")
    instr = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    instr[:, -3:] = True  # only the last three tokens ask
    expected = oracle(model, inputs, keep_ratio=0.5, instruction_mask=instr)
    for spec in (instr, lambda ids, visual, mask: ids.new_zeros(ids.shape).bool() | instr):
        apply_tokenprune(model, keep_ratio=0.5, instruction_mask=spec)
        got, pruned = _patched(model, inputs)
        _assert_oracle(got, pruned, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_instruction_is_all_the_text_after_the_image(family, gen):
    """LLaVA / LLaVA-OneVision have no structural token after the visual block (the image
    newlines are visual tokens; the chat template follows the image with text): the default
    instruction is every real token after the last visual one."""
    model = build_model(family)
    inputs = build_inputs(model, _two_samples(family), gen, "right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    pos = torch.arange(ids.shape[1])
    want = (pos > torch.where(visual, pos, -1).amax(1, keepdim=True)) & mask.bool()
    assert torch.equal(default_instruction_mask_for(model, ids, visual, mask), want)


def test_generic_function_for_vila_style_models(gen):
    """A LLaVA-style model without a transformers class calls prune_inputs from its own code
    with the layer-0 modules of its Llama text model (what VILA1.5 does)."""
    model = build_model("llava")
    inputs = build_inputs(model, _two_samples("llava"), gen, "right")
    expected = oracle(model, inputs, keep_ratio=0.25)
    seen: dict = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    embeds, mask = seen["inputs_embeds"], inputs["attention_mask"]
    position_ids = torch.arange(embeds.shape[1]).expand(embeds.shape[:2])
    pruned = prune_inputs(
        embeds,
        inputs["input_ids"] == IMAGE_ID,
        position_ids,
        layer0_from_text_model(lm),
        TokenPruneConfig(keep_ratio=0.25),
        attention_mask=mask,
    )
    with torch.no_grad():
        hidden = lm(
            inputs_embeds=pruned.inputs_embeds,
            position_ids=pruned.position_ids,
            attention_mask=pruned.attention_mask,
        ).last_hidden_state
        logits = model.lm_head(hidden)
    keep = pruned.attention_mask.bool()
    _assert_kept(pruned, expected)
    _assert_logits([logits[b][keep[b]] for b in range(2)], expected.logits)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.25])
def test_bad_keep_ratio(family, keep):
    model = build_model(family)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        apply_tokenprune(model, keep_ratio=keep)
    assert not is_tokenprune_applied(model)


@pytest.mark.parametrize("keep", [np.float32(0.5), torch.tensor(0.5)])
def test_keep_ratio_of_any_real_type(keep, gen):
    """A numpy scalar or a 0-d tensor is a keep ratio like the float it holds."""
    model = build_model("llava")
    inputs = build_inputs(model, _two_samples("llava"), gen, "left")
    expected = oracle(model, inputs, keep_ratio=0.5)
    apply_tokenprune(model, keep_ratio=keep)
    got, pruned = _patched(model, inputs)
    _assert_oracle(got, pruned, expected)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (
            3,
            TypeError,
            r"instruction_mask must be None, a \[B, L\] bool or integer tensor, or a callable .*got int",
        ),
        ("last", TypeError, r"instruction_mask must be None.*got str"),
        (
            torch.ones(2, 5),
            TypeError,
            r"instruction_mask must be a bool or integer tensor, got torch\.float32",
        ),
        (
            torch.ones(5, dtype=torch.bool),
            ValueError,
            r"instruction_mask must be a \[B, L\] tensor, got shape \[5\]",
        ),
    ],
)
def test_bad_instruction_mask_is_refused_at_apply(spec, error, match):
    """The instruction_mask spec is checked when applied, not at the first forward."""
    model = build_model("llava")
    with pytest.raises(error, match=match):
        apply_tokenprune(model, keep_ratio=0.5, instruction_mask=spec)
    assert not is_tokenprune_applied(model)
    apply_tokenprune(model, keep_ratio=0.5)
    with pytest.raises(error, match=match):
        apply_tokenprune(model, keep_ratio=0.25, instruction_mask=spec)
    patch = get_patch(model)  # a refused re-apply changes nothing
    assert patch.instruction_mask is None and patch.config.keep_ratio == 0.5


def test_unsupported_model_type():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=32,
        )
    )
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*llava_onevision"):
        apply_tokenprune(model, keep_ratio=0.5)


@pytest.mark.parametrize("version", ["5.16.2", "5.24.0", "6.0.0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_version_outside_range(family, version, monkeypatch):
    import transformers

    model = build_model(family)
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"supports transformers .*but transformers {version}"):
        apply_tokenprune(model, keep_ratio=0.5)
    assert not is_tokenprune_applied(model)


def test_image_at_the_end_of_the_prompt_has_no_instruction(gen):
    model = build_model("llava")
    inputs = build_inputs(model, [Sample([("text", 5), ("image", None)])], gen)
    apply_tokenprune(model, keep_ratio=0.5)
    with pytest.raises(ValueError, match="no instruction tokens"), torch.no_grad():
        model(**inputs)
    inputs = build_inputs(model, _two_samples("llava"), gen)
    _patched(model, inputs)  # the failed call left nothing behind


def test_visual_tokens_after_a_filled_cache_are_refused(gen):
    model = build_model("llava")
    inputs = build_inputs(model, _two_samples("llava")[:1], gen)
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="non-empty KV cache"):
            model(**inputs, past_key_values=cache)


def test_not_a_llava_model():
    from tokenprune_kernels.transformers import llava

    with pytest.raises(ValueError, match="not a LLaVA-style transformers model"):
        llava.install(torch.nn.Linear(2, 2), TokenPruneConfig(keep_ratio=0.5), None)
    with pytest.raises(ValueError, match=r"text_model must be a Llama/Qwen2-style"):
        layer0_from_text_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_spread_rule_is_refused(family):
    """1-D RoPE carries no (row, col): spread_radius > 0 is refused when applied (nothing is
    patched), and prune_inputs on 1-D position ids refuses it too (VILA's path)."""
    model = build_model(family)
    with pytest.raises(ValueError, match=r"spread_radius=1 is not supported for llava"):
        apply_tokenprune(model, keep_ratio=0.5, spread_radius=1)
    assert not is_tokenprune_applied(model)
    apply_tokenprune(model, keep_ratio=0.5, spread_radius=0)  # the default: fine
    assert is_tokenprune_applied(model)
