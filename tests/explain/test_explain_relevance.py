"""Relevance: the row algorithm against the full-matrix recurrence, the hooks against a closed
form (one attention layer), every supported family against the formula computed directly from
``output_attentions`` (tiny random models), planted tokens that cannot influence the answer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tokenprune_kernels.testing_models.llava as LC
import tokenprune_kernels.testing_models.qwen as Q
from tokenprune_kernels.explain import (
    explain_relevance,
    gradient_weighted_relevance,
    head_mean_relu,
    propagate_relevance_rows,
)
from tokenprune_kernels.explain.pipeline import greedy_with_attention
from tokenprune_kernels.testing_models.explain import independent_relevance
from tokenprune_kernels.transformers import apply_tokenprune, revert_tokenprune

# --------------------------------------------------------------------------------------------
# The row algorithm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_rows_equal_full_recurrence(gen, per_row):
    length, n_layers, rows = 13, 3, torch.tensor([12, 5, 0, 9])
    shape = (rows.numel(), length, length) if per_row else (length, length)
    abars = [torch.rand(shape, generator=gen, dtype=torch.float64).tril() for _ in range(n_layers)]
    got = propagate_relevance_rows(abars, rows)
    want = []
    for t, r in enumerate(rows.tolist()):
        full = torch.eye(length, dtype=torch.float64)
        for a in abars:  # R <- R + Abar_l @ R, layers in order
            full = full + (a[t] if per_row else a) @ full
        want.append(full[r])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)
    assert bool((got >= 0).all())


def test_rows_errors():
    a = torch.rand(4, 4)
    with pytest.raises(ValueError, match="at least one layer"):
        propagate_relevance_rows([], [0])
    with pytest.raises(ValueError, match=r"rows must be in \[0, 4\)"):
        propagate_relevance_rows([a], [4])
    with pytest.raises(ValueError, match=r"\[T=2, L, L\]"):
        propagate_relevance_rows([torch.rand(3, 4, 4)], [0, 1])
    with pytest.raises(ValueError, match="same shape"):
        head_mean_relu(torch.rand(2, 4, 4), torch.rand(2, 4, 3))


# --------------------------------------------------------------------------------------------
# The hooks against a closed form: one attention layer written out by hand
# --------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, gen: torch.Generator) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        for name in ("wq", "wk", "wv", "wo"):
            self.register_parameter(name, nn.Parameter(torch.randn(d, d, generator=gen) / d**0.5))
        self.key_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = (
            (x @ w).view(b, n, self.heads, self.dh).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[None, :]
            allowed |= torch.eye(n, dtype=torch.bool)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [B, H, n, n]
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1) @ self.wo
        return out, weights


class _OneLayer(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, gen: torch.Generator) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(vocab, d, generator=gen))
        self.attn = _Attention(d, heads, gen)
        self.unembed = nn.Parameter(torch.randn(d, vocab, generator=gen))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[ids][None]
        return (x + self.attn(x)[0])[0] @ self.unembed  # [n, V]


def _closed_form(model: _OneLayer, ids: torch.Tensor, rows, targets) -> torch.Tensor:
    """Row r of R = I + Abar for one layer; dz_y(r)/dA_h[r, j] = (x_j Wv_h Wo_h) . u_y."""
    with torch.no_grad():
        x = model.embed[ids].double()
        att = model.attn
        _, weights = att(x[None].float())
        weights = weights[0].double()  # [H, n, n]
        n, heads, dh = x.shape[0], att.heads, att.dh
        v = (x @ att.wv.double()).view(n, heads, dh)
        wo = att.wo.double().view(heads, dh, -1)
        out = []
        for r, y in zip(rows, targets, strict=True):
            u = model.unembed.double()[:, y]
            g = torch.einsum("jhd,hde,e->hj", v, wo, u)  # [H, n]: the gradient of row r
            row = (weights[:, r, :] * g).clamp(min=0).mean(0)
            row[r] += 1.0
            out.append(row)
        return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 2])
def test_one_layer_closed_form_and_planted(gen, chunk):
    vocab, n = 11, 9
    model = _OneLayer(vocab, d=12, heads=3, gen=gen)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    rows, targets = [8, 6, 7], [3, 0, 10]
    dead = 2  # planted: no query may attend to key 2, so it cannot influence any output
    model.attn.key_mask = torch.ones(n, dtype=torch.bool)
    model.attn.key_mask[dead] = False

    def forward() -> torch.Tensor:
        logits = model(ids)
        return logits[rows, targets]

    got = gradient_weighted_relevance(forward, [model.attn], rows, answer_chunk=chunk)
    want = _closed_form(model, ids, rows, targets)
    assert got.shape == (3, n) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((got >= 0).all())
    assert bool((got[:, dead] == 0).all())
    assert float(got[:, :dead].sum()) > 0


def test_core_errors(gen):
    model = _OneLayer(7, d=8, heads=2, gen=gen)
    ids = torch.arange(5)

    def forward() -> torch.Tensor:
        return model(ids)[[4], [1]]

    with pytest.raises(ValueError, match="answer_chunk must be an int >= 1"):
        gradient_weighted_relevance(forward, [model.attn], [4], answer_chunk=0)
    with pytest.raises(ValueError, match="1 outputs for 2 rows"):
        gradient_weighted_relevance(forward, [model.attn], [4, 3])
    with pytest.raises(RuntimeError, match="exactly once"):
        gradient_weighted_relevance(forward, [model.attn, nn.Identity()], [4])
    with pytest.raises(ValueError, match=r"rows must be in \[0, 5\)"):
        gradient_weighted_relevance(forward, [model.attn], [5])


# --------------------------------------------------------------------------------------------
# Every supported family against the formula computed directly
# --------------------------------------------------------------------------------------------

QWEN_VISUAL = [Q.IMAGE_ID, Q.VIDEO_ID]
LLAVA_VISUAL = [LC.IMAGE_ID, LC.VIDEO_ID]

CASES = [
    ("qwen2_vl", "image"),
    ("qwen2_vl", "video"),
    ("qwen2_5_vl", "image"),
    ("qwen3_vl", "video"),
    ("llava", "image"),
    ("llava_onevision", "image"),
    ("llava_onevision", "video"),
]


def _case(model_type: str, modality: str, gen: torch.Generator, attn: str = "eager"):
    """(model, prompt inputs, answer ids, visual ids) for one tiny random model."""
    if model_type.startswith("qwen"):
        model = Q.make_model(model_type, attn=attn, seed=1)
        media = ("image", (4, 6)) if modality == "image" else ("video", (2, 4, 4))  # 2 frames
        inputs = Q.build_inputs(model_type, [Q.Sample([("text", 3), media, ("text", 5)])], gen)
        answer = torch.randint(*Q.TEXT_IDS, (4,), generator=gen)
        return model, inputs, answer, QWEN_VISUAL
    model = LC.build_model(model_type, attn=attn, seed=1)
    media = ("image", (16, 32)) if modality == "image" else ("video", 2)
    if model_type == "llava":
        media = ("image", None)
    inputs = LC.build_inputs(model, [LC.Sample([("text", 3), media, ("text", 4)])], gen)
    answer = torch.randint(*LC.TEXT_IDS, (3,), generator=gen)
    return model, inputs, answer, LLAVA_VISUAL


@pytest.mark.parametrize(("model_type", "modality"), CASES, ids=["-".join(c) for c in CASES])
def test_matches_independent_formula(gen, model_type, modality):
    model, inputs, answer, visual_ids = _case(model_type, modality, gen)
    rel = explain_relevance(model, inputs, answer)
    want = independent_relevance(model, inputs, answer, visual_ids)
    ids = inputs["input_ids"][0]
    n_v = int(torch.isin(ids, torch.tensor(visual_ids)).sum())
    prompt_len = ids.numel()
    assert rel.relevance.shape == (n_v,) and rel.relevance.dtype == torch.float32
    assert not rel.per_token.requires_grad
    assert rel.per_token.shape == (answer.numel(), n_v)
    assert rel.rows.tolist() == list(range(prompt_len - 1, prompt_len - 1 + answer.numel()))
    assert torch.equal(
        rel.visual_positions, torch.isin(ids, torch.tensor(visual_ids)).nonzero()[:, 0]
    )
    assert bool((rel.per_token >= 0).all()) and float(rel.relevance.sum()) > 0
    torch.testing.assert_close(rel.relevance.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rel.per_token.mean(0), rel.relevance)


def test_chunks_and_logprob_target(gen):
    model, inputs, _, visual_ids = _case("qwen2_vl", "image", gen)
    answer = torch.randint(*Q.TEXT_IDS, (5,), generator=gen)
    one = explain_relevance(model, inputs, answer, answer_chunk=1)
    for chunk in (2, 5, 8):
        other = explain_relevance(model, inputs, answer, answer_chunk=chunk)
        torch.testing.assert_close(other.per_token, one.per_token, rtol=1e-5, atol=1e-8)
    lp = explain_relevance(model, inputs, answer, target="logprob", answer_chunk=2)
    want = independent_relevance(model, inputs, answer, visual_ids, target="logprob")
    torch.testing.assert_close(lp.relevance.double(), want, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(lp.relevance, one.relevance)


def test_planted_masked_visual_token(gen):
    """A visual token no query may attend to (attention mask 0) cannot influence the answer:
    its relevance is exactly zero; the other visual tokens are still explained."""
    model, inputs, answer, visual_ids = _case("llava", "image", gen)
    vis = torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids)).nonzero()[:, 0]
    dead = int(vis[7])
    inputs["attention_mask"] = inputs["attention_mask"].clone()
    inputs["attention_mask"][0, dead] = 0
    rel = explain_relevance(model, inputs, answer, answer_chunk=2)
    assert bool((rel.per_token[:, 7] == 0).all())
    assert int((rel.relevance > 0).sum()) == vis.numel() - 1
    want = independent_relevance(model, inputs, answer, visual_ids)
    torch.testing.assert_close(rel.relevance.double(), want, rtol=1e-5, atol=1e-7)


def test_model_left_as_it_was(gen):
    model, inputs, answer, _ = _case("qwen2_vl", "image", gen)
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    explain_relevance(model, inputs, answer)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n])
    assert not model.model.language_model._forward_pre_hooks
    assert not model.model.language_model.layers[0].self_attn._forward_hooks


def test_no_state_from_earlier_calls(gen):
    """Qwen keeps rope_deltas from its last call; a generation on another prompt in between
    changes nothing."""
    model, inputs, answer, _ = _case("qwen2_vl", "video", gen)
    first = explain_relevance(model, inputs, answer)
    other = Q.build_inputs("qwen2_vl", [Q.Sample([("image", (2, 4)), ("text", 9)])], gen)
    with torch.no_grad():
        model.generate(**other, max_new_tokens=2, do_sample=False)
    assert model.model.rope_deltas is not None
    again = explain_relevance(model, inputs, answer)
    torch.testing.assert_close(again.per_token, first.per_token, rtol=0, atol=0)


def test_errors(gen):
    model, inputs, answer, _ = _case("qwen2_vl", "image", gen)
    with pytest.raises(ValueError, match="target must be one of"):
        explain_relevance(model, inputs, answer, target="prob")
    with pytest.raises(ValueError, match="at least one token"):
        explain_relevance(model, inputs, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="placeholder ids"):
        explain_relevance(model, inputs, torch.tensor([5, Q.IMAGE_ID]))
    two = {
        k: (torch.cat([v, v]) if k in ("input_ids", "attention_mask") else v)
        for k, v in inputs.items()
    }
    with pytest.raises(ValueError, match=r"\[1, P\] tensor \(one sample\)"):
        explain_relevance(model, two, answer)
    text_only = {"input_ids": torch.randint(*Q.TEXT_IDS, (1, 6), generator=gen)}
    with pytest.raises(ValueError, match="no image/video placeholder"):
        explain_relevance(model, text_only, answer)
    apply_tokenprune(model, keep_ratio=0.5)
    try:
        with pytest.raises(ValueError, match="revert_tokenprune"):
            explain_relevance(model, inputs, answer)
    finally:
        revert_tokenprune(model)
    sdpa, inputs2, answer2, _ = _case("qwen2_vl", "image", gen, attn="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        explain_relevance(sdpa, inputs2, answer2)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = Qwen2ForCausalLM(Qwen2Config(**LC._text_kwargs()))  # a text-only model
    with pytest.raises(ValueError, match="supported: qwen2_vl, qwen2_5_vl, qwen3_vl, llava"):
        explain_relevance(text, inputs, answer)


# --------------------------------------------------------------------------------------------
# The mapper input: layer-0 instruction attention on the prompt, as inference computes it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "modality"), [("qwen2_vl", "video"), ("llava", "image")])
def test_mapper_input_is_layer0_instruction_attention(gen, model_type, modality):
    model, inputs, _, visual_ids = _case(model_type, modality, gen)
    answer, attn, vis_pos = greedy_with_attention(model, inputs, max_new_tokens=4)
    ids = inputs["input_ids"][0]
    want_pos = torch.isin(ids, torch.tensor(visual_ids)).nonzero()[:, 0]
    assert torch.equal(vis_pos, want_pos)
    with torch.no_grad():
        a0 = model(**inputs, output_attentions=True).attentions[0][0].double()  # [H, P, P]
    instruction = torch.arange(int(want_pos.max()) + 1, ids.numel())  # after the last visual
    if model_type.startswith("qwen"):  # but not <|vision_end|>
        instruction = instruction[ids[instruction] != Q.VEND_ID]
    want = a0[:, instruction][:, :, want_pos].mean(dim=(0, 1))
    assert attn.shape == (want_pos.numel(),) and attn.dtype == torch.float32
    torch.testing.assert_close(attn.double(), want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                               suppress_tokens=visual_ids)  # fmt: skip
    assert answer.tolist() == plain[0, ids.numel() :].tolist()
