"""The training recipe's losses (benchmarks/grounded/losses.py): the answer loss, the shape probe
and LLMAux (position probe; answer attention recomputed from hooked layer inputs, checked
against the model's eager attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from benchmarks.grounded import losses as L
from benchmarks.grounded.batches import training_batch
from benchmarks.grounded.loop import training_forward
from tokenprune_kernels.grounded import model as M


def test_answer_loss_reads_the_next_token():
    logits = torch.zeros(1, 4, M.VOCAB_SIZE)
    logits[0, 1, 7] = 50.0  # position 1 predicts label[2] = 7: zero loss there
    labels = torch.tensor([[-100, -100, 7, -100]])
    assert float(L.answer_loss(logits, labels)) < 1e-6
    logits[0, 1, 7] = 0.0  # uniform: ln(V)
    assert float(L.answer_loss(logits, labels)) == pytest.approx(np.log(M.VOCAB_SIZE), rel=1e-6)


def test_shape_probe_loss():
    """Mean cross-entropy over object tokens + a quarter of the mean over background tokens."""
    probe = L.shape_probe(16)
    feats = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    out = probe(feats)
    assert out.shape == (9, 1 + len(L.SHAPES))
    batch = {"token_shape": torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2])}
    loss = L.shape_probe_loss(probe, feats, batch)
    ce = torch.nn.functional.cross_entropy(out, batch["token_shape"], reduction="none")
    obj = batch["token_shape"] > 0
    want = ce[obj].mean() + 0.25 * ce[~obj].mean()
    assert loss.ndim == 0 and loss.item() == pytest.approx(want.item(), rel=1e-6) and loss > 0
    loss.backward()
    assert probe.weight.grad is not None
    with pytest.raises(ValueError, match="token_shape has 9 labels for 8 tokens"):
        L.shape_probe_loss(probe, feats[:8], batch)


def test_fine_probe_loss_gives_few_pixel_tokens_their_own_means():
    """With the fine classes (--fine-probe) the glyph (digit) tokens' mean and the small-object
    tokens' mean are added to the regular objects' mean and a quarter of the background's.
    Without such tokens it is the plain balanced loss."""
    from benchmarks.grounded.batches import FINE_CLASSES

    probe = L.shape_probe(16, FINE_CLASSES)
    feats = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    out = probe(feats)
    digit = 1 + len(L.SHAPES)  # the class of the digit 0
    small = digit + 10  # the class of a small circle
    target = torch.tensor([0, 1, 2, 0, digit + 7, 3, 0, digit, 4, 0, small, small + 3])
    loss = L.shape_probe_loss(probe, feats, {"token_shape": target})
    ce = torch.nn.functional.cross_entropy(out, target, reduction="none")
    glyph = (target >= digit) & (target < small)
    obj = (target > 0) & (target < digit)
    want = ce[obj].mean() + 0.25 * ce[target == 0].mean() + ce[glyph].mean()
    want = want + ce[target >= small].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain = torch.tensor([0, 1, 2, 0, 3, 3, 0, 1, 4, 0, 2, 2])
    loss = L.shape_probe_loss(probe, feats, {"token_shape": plain})
    ce = torch.nn.functional.cross_entropy(out, plain, reduction="none")
    want = ce[plain > 0].mean() + 0.25 * ce[plain == 0].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def _tiny_batch():
    cfg = M.build_config(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48)
    model = M.build_model(cfg, seed=3)
    batch, _, qtypes = training_batch(
        M.build_processor(), 4, 0, 2, 3, sizes=[(128, 160)], scale=1.75
    )
    return model, batch, qtypes


class _Out:
    def __init__(self, hidden_states=None):
        self.hidden_states = hidden_states


def test_llm_aux_position_loss_is_zero_for_exact_positions():
    _, batch, _ = _tiny_batch()
    ids = batch["input_ids"]
    visual = ids == M.TOKEN_ID[M.IMAGE_PAD]
    rows, length = ids.shape
    aux = L.LLMAux(32, pos_weight=1.0, pos_layer=1)
    with torch.no_grad():
        aux.pos.weight.zero_()
        aux.pos.weight[0, 0] = aux.pos.weight[1, 1] = 1.0
        aux.pos.bias.zero_()
    k = torch.arange(8 * 10)
    exact = torch.stack([k // 10, k % 10], 1).float() / L.POS_SCALE  # grid 8 x 10 tokens
    hidden = torch.zeros(rows, length, 32)
    hidden[visual] = torch.cat([exact, torch.zeros(80, 30)], 1).repeat(rows, 1)
    assert aux(_Out([hidden, hidden]), batch)["pos"].item() == pytest.approx(0.0, abs=1e-12)
    swapped = hidden.clone()
    swapped[visual] = torch.cat([exact.flip(1), torch.zeros(80, 30)], 1).repeat(rows, 1)
    loss = aux(_Out([swapped, swapped]), batch)["pos"]
    want = ((exact.flip(1) - exact) ** 2).mean()
    assert loss.item() == pytest.approx(want.item()) and loss > 0


@pytest.mark.parametrize("layer, head", [(-1, 0), (1, 3), (0, 2)])
def test_llm_aux_answer_rows_equal_eager_attention(layer, head):
    model, batch, _ = _tiny_batch()
    aux = L.LLMAux(32, attn_weight=1.0, attn_layer=layer, attn_head=head)
    with pytest.raises(RuntimeError, match="needs attach"):
        aux.answer_probs(batch)
    aux.attach(model)
    model.set_attn_implementation("eager")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():  # each sequence with its image's pixels
        out = model(
            **inputs,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            output_attentions=True,
            use_cache=False,
        )
        rows = aux.answer_probs(batch)
    want = out.attentions[layer][:, head]
    assert len(rows) == len(batch["attn_target"]) == 6
    assert len({row for row, _, _ in rows}) == 2
    for row, col, probs in rows:
        assert batch["input_ids"][row, col] == M.TOKEN_ID["assistant"]
        assert torch.allclose(probs, want[row, col], atol=1e-6)
        assert probs[col + 1 :].abs().sum() == 0
    aux.detach()
    with pytest.raises(RuntimeError, match="needs attach"):
        aux.answer_probs(batch)


def test_llm_aux_bad_layer_or_head():
    model, batch, _ = _tiny_batch()
    with pytest.raises(ValueError, match="attn_layer must index one of the 4 decoder layers"):
        L.LLMAux(32, attn_weight=1.0, attn_layer=4).attach(model)
    with pytest.raises(ValueError, match=r"attn_head must be in \[0, 4\) for 4 heads"):
        L.LLMAux(32, attn_weight=1.0, attn_head=4).attach(model)
    with pytest.raises(ValueError, match="early_layer must index one of the 4 decoder layers"):
        L.LLMAux(32, attn_weight=1.0, early_layer=-5).attach(model)
    with pytest.raises(ValueError, match=r"early_types must be of .*\['x'\]"):
        L.LLMAux(32, attn_weight=1.0, early_types=["extreme", "x"])
    states = [torch.zeros(2, batch["input_ids"].shape[1], 32)] * 5
    with pytest.raises(ValueError, match=r"pos_layer must be in \[1, 4\]"):
        L.LLMAux(32, pos_weight=1.0, pos_layer=5)(_Out(states), batch)


def _want(probs, batch):
    """-log of each answer's attention mass on its target tokens, for targets with a token."""
    visual = batch["input_ids"] == M.TOKEN_ID[M.IMAGE_PAD]
    return [
        -np.log(p[visual[row].nonzero().squeeze(1)[m]].sum().item() + 1e-4)
        for (row, _, p), m in zip(probs, batch["attn_target"], strict=True)
        if m.any()
    ]


def test_llm_aux_attention_loss():
    model, batch, qtypes = _tiny_batch()
    aux = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1)
    aux.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    want = _want(aux.answer_probs(batch), batch)
    loss = aux(_Out(), batch)["attn"]
    assert len(want) >= 4 and loss.item() == pytest.approx(float(np.mean(want)), rel=1e-5)
    aux.detach()
    # spatial questions read head 1 of layer 1, the others head 1 of the last layer
    two = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, early_layer=1)
    two.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    late, early = two.answer_probs(batch), two.answer_probs(batch, layer=1)
    assert batch["qtypes"] == qtypes
    spatial = [t in ("left_of", "extreme") for t in qtypes]
    assert any(spatial) and not all(spatial)
    mixed = [e if f else p for p, e, f in zip(late, early, spatial, strict=True)]
    got = two(_Out(), batch)["attn"].item()
    assert got == pytest.approx(float(np.mean(_want(mixed, batch))), rel=1e-5)
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(late, early, strict=True))
    two.detach()
    # -1 and 3 name the same layer of 4: one hook, the same rows either way
    same = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, early_layer=3)
    same.attach(model)
    assert list(same._attn) == [3]
    with torch.no_grad():
        training_forward(model, batch)
    for a, b in zip(same.answer_probs(batch), same.answer_probs(batch, layer=3), strict=True):
        assert torch.equal(a[2], b[2])
    same.detach()
    aux.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    batch["attn_target"] = batch["attn_target"][:-1]
    with pytest.raises(ValueError, match="6 answers for 5"):
        aux(_Out(), batch)


def test_llm_aux_count_sink_loss():
    """With count_sink the counting questions take KL(target || head), the target putting
    count_target on the visual tokens and the rest on the first token; the others keep -log
    of their mass. Zero where the head attends exactly as the target says."""
    model, _, _ = _tiny_batch()
    batch, _, qtypes = training_batch(
        M.build_processor(), 3, 0, 2, 4, sizes=[(160, 160)], qtypes=["count_small", "read_glyph"]
    )
    assert "count_small" in qtypes and "read_glyph" in qtypes
    aux = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, count_sink=True)
    aux.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    probs = aux.answer_probs(batch)
    visual = batch["input_ids"] == M.TOKEN_ID[M.IMAGE_PAD]
    want = []
    for (row, _, p), m, w in zip(probs, batch["attn_target"], batch["count_target"], strict=True):
        pos = visual[row].nonzero().squeeze(1)
        if w is None:
            want.append(-np.log(p[pos[m]].sum().item() + 1e-4))
            continue
        t = np.concatenate([[1.0 - w.sum().item()], w.numpy()])
        q = np.concatenate([[p[0].item()], p[pos].detach().numpy()])
        nz = t > 0
        want.append(float((t[nz] * (np.log(t[nz]) - np.log(q[nz] + 1e-6))).sum()))
    got = aux(_Out(), batch)["attn"].item()
    assert got == pytest.approx(float(np.mean(want)), rel=1e-5)
    plain = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1)
    plain.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    assert plain(_Out(), batch)["attn"].item() != pytest.approx(got, rel=1e-3)
    # the KL of one row vanishes where the head attends as the target says
    w = torch.tensor([0.25, 0.0, 0.25, 0.25])
    exact = torch.tensor([0.0, 0.25, 0.25, 0.0, 0.25, 0.25])
    kl = L._count_kl(exact, torch.tensor([2, 3, 4, 5]), 1, w)
    assert kl.item() == pytest.approx(0.0, abs=1e-5)
    assert L._count_kl(torch.full((6,), 1 / 6), torch.tensor([2, 3, 4, 5]), 1, w) > 0.1
    for bad in (torch.tensor([0.5, 0.0, 0.5, 0.25]), torch.tensor([0.5, -0.1, 0.2, 0.1])):
        with pytest.raises(ValueError, match="count_target weights must be >= 0 and sum"):
            L._count_kl(exact, torch.tensor([2, 3, 4, 5]), 1, bad)
    # count_head: the counting questions read another head, the others keep attn_head
    other = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, attn_head=1, count_sink=True, count_head=2)
    other.attach(model)
    with torch.no_grad():
        training_forward(model, batch)
    own = other.answer_probs(batch, head=2)
    rows = [
        c if w is not None else p for p, c, w in zip(probs, own, batch["count_target"], strict=True)
    ]
    want2 = []
    for (row, _, p), m, w in zip(rows, batch["attn_target"], batch["count_target"], strict=True):
        pos = visual[row].nonzero().squeeze(1)
        if w is None:
            want2.append(-np.log(p[pos[m]].sum().item() + 1e-4))
        else:
            want2.append(L._count_kl(p, pos, 0, w).item())
    got2 = other(_Out(), batch)["attn"].item()
    assert got2 == pytest.approx(float(np.mean(want2)), rel=1e-5)
    counted = [w is not None for w in batch["count_target"]]
    assert all(a == b for a, b, c in zip(want, want2, counted, strict=True) if not c)
    assert max(abs(a - b) for a, b, c in zip(want, want2, counted, strict=True) if c) > 1e-5
    with pytest.raises(ValueError, match=r"count_head must be in \[0, 4\)"):
        L.LLMAux(32, attn_weight=1.0, count_sink=True, count_head=4).attach(model)
    batch["count_target"] = batch["count_target"][:-1]
    with pytest.raises(ValueError, match="count targets for"):
        aux(_Out(), batch)


def test_llm_aux_query_probe_loss():
    """query: a linear probe on the hooked input of attn_layer at each counting question's
    answer token; cross-entropy of the asked colour plus that of the asked shape (count_colour
    names none)."""
    model, _, _ = _tiny_batch()
    batch, _, qtypes = training_batch(
        M.build_processor(), 1, 0, 2, 4, sizes=[(160, 160)], qtypes=["count_small", "count_colour"]
    )
    assert {"count_small", "count_colour"} <= set(qtypes)
    aux = L.LLMAux(32, attn_weight=1.0, attn_layer=-1, query_weight=1.0)
    aux.attach(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = training_forward(model, batch, None, aux)
    got = out[2]["query"].item()
    # by hand: the last layer's input, through its input norm, at the assistant tokens
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        full = model(
            **inputs,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            output_hidden_states=True,
            use_cache=False,
        )
        layer = model.model.language_model.layers[-1]
        normed = layer.input_layernorm(full.hidden_states[-2])
    ids = batch["input_ids"]
    answers = (ids[:, :-2] == M.TOKEN_ID["assistant"]).nonzero().tolist()
    colour_ce, shape_ce = [], []
    n_col = len(L.COLOURS)
    for (r, c), want in zip(answers, batch["count_query"], strict=True):
        logits = aux.query(normed[r, c]).detach()
        colour_ce.append(-torch.log_softmax(logits[:n_col], 0)[want[0]].item())
        if want[1] >= 0:
            shape_ce.append(-torch.log_softmax(logits[n_col:], 0)[want[1]].item())
    assert shape_ce and len(shape_ce) < len(colour_ce)
    assert got == pytest.approx(np.mean(colour_ce) + np.mean(shape_ce), rel=1e-4)
    no_counts = dict(batch, count_query=[None] * len(batch["count_query"]))
    assert aux._query_loss(no_counts).item() == 0.0
    with pytest.raises(ValueError, match="answers for 3 count queries"):
        aux._query_loss(dict(batch, count_query=batch["count_query"][:3]))
    with pytest.raises(ValueError, match="query_weight > 0 needs the attention hooks"):
        L.LLMAux(32, query_weight=1.0)
    with pytest.raises(RuntimeError, match="query probe needs query_weight > 0, attach"):
        L.LLMAux(32, attn_weight=1.0, query_weight=1.0)._query_loss(batch)
