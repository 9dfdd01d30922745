"""Pruning methods of the grounded eval: every selection against an independent computation.

A randomly initialised grounded Qwen2-VL (``build_model``) on tiny images of awkward sizes; no
accuracy values are asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprune_kernels.grounded import methods as M
from tokenprune_kernels.grounded.model import (
    build_inputs,
)
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.reference import spread_select_ref
from tokenprune_kernels.transformers import apply_tokenprune, last_pruned, revert_tokenprune

SIZES = [(80, 112), (64, 144), (112, 80)]  # 35, 36, 35 visual tokens
MODEL_SEED = 3  # the ``model`` and ``eager`` fixtures (conftest.py)


@pytest.fixture(scope="module")
def samples():
    return [make_sample("test", 100 + i, 5, size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def batch(processor, samples):
    return build_inputs(processor, [s.image for s in samples], [s.question.text for s in samples])


@pytest.fixture(scope="module")
def preps(model, batch):
    return [M.prepare(model, one) for one in M.split_batch(batch)]


def _mapper(seed: int) -> TokenMapper:
    torch.manual_seed(seed)
    m = TokenMapper(MapperConfig(channels=(8, 16), kernel_size=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_prepare_and_full_prefill_match_the_model(model, batch, preps, samples):
    ones = M.split_batch(batch)
    assert len(ones) == len(samples)
    for one, prep, s in zip(ones, preps, samples, strict=True):
        h, w = s.scene.size
        assert prep.n_visual == (h // 16) * (w // 16)
        assert prep.grid == (1, h // 16, w // 16)
        assert one["attention_mask"].bool().all()
        with torch.no_grad():
            ref = model(**one).logits[0, -1]
        torch.testing.assert_close(M.pruned_logits(model, prep), ref, rtol=1e-4, atol=1e-5)
        logits, kept = M.fastv_logits(model, prep, prep.n_visual)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(kept, prep.visual_positions)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("use_mapper", [False, True])
def test_ours_equals_the_real_apply_tokenprune_path(model, batch, preps, ratio, use_mapper):
    """Selection and logits on the hand-pruned sequence (original M-RoPE ids) == the patched
    model's prefill."""
    mapper = _mapper(11) if use_mapper else None
    for one, prep in zip(M.split_batch(batch), preps, strict=True):
        kept = M.select("mapper" if use_mapper else "attention", model, prep, ratio, mapper=mapper)
        assert kept.numel() == M.keep_count(prep.n_visual, ratio)
        apply_tokenprune(model, keep_ratio=ratio, mapper=mapper)
        try:
            with torch.no_grad():
                out = model(**one).logits[0, -1]
            real = torch.sort(last_pruned(model).kept_visual[0]).values
        finally:
            revert_tokenprune(model)
        assert torch.equal(real, kept)
        torch.testing.assert_close(M.pruned_logits(model, prep, kept), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", M.LLM_METHODS)
@pytest.mark.parametrize("keep_ratio", [0.5, 0.2])
def test_fastv_scores_are_layer_k_last_token_attention(model, eager, batch, keep_ratio, method):
    """FastV's choice (K = 2 and K = 1) == top-k of the eager model's own layer-K attention
    probabilities (last row, head mean); select() takes the same tokens."""
    layer = M.FASTV_LAYERS[method]
    for one in M.split_batch(batch):
        prep = M.prepare(model, one)
        keep = M.keep_count(prep.n_visual, keep_ratio)
        _, kept = M.fastv_logits(model, prep, keep, layer)
        with torch.no_grad():
            out = eager(**one, output_attentions=True)
        attn = out.attentions[layer][0, :, -1, :].mean(0)[prep.visual_positions]
        ref = prep.visual_positions[torch.sort(torch.topk(attn, keep).indices).values]
        assert torch.equal(kept, ref)
        assert torch.equal(M.select(method, model, prep, keep_ratio), kept)


def test_fastv_logits_equal_a_hooked_model_run(model, preps):
    """Layers >= K on the kept tokens: the same numbers as the text model's own forward
    (its mask, rotary and final norm) run as layers K.. only on the kept rows."""
    prep = preps[1]
    keep = M.keep_count(prep.n_visual, 0.3)
    logits, kept = M.fastv_logits(model, prep, keep)
    idx = M._keep_positions(prep, kept)
    lm = model.model.language_model
    # Reference: layers < K on the full sequence, then the text model's forward with only its
    # layers K.. on the kept rows and their original positions.
    with torch.no_grad():
        h = prep.embeds
        rope = lm.rotary_emb(h, prep.position_ids)
        for i in range(M.FASTV_LAYER):
            h = lm.layers[i](h, attention_mask=None, position_embeddings=rope)
        saved = lm.layers[: M.FASTV_LAYER]
        lm.layers = lm.layers[M.FASTV_LAYER :]
        try:
            out = lm(inputs_embeds=h[:, idx], position_ids=prep.position_ids[:, :, idx])
        finally:
            lm.layers = torch.nn.ModuleList([*saved, *lm.layers])
        ref = model.lm_head(out.last_hidden_state[:, -1])[0]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("t", "h", "w", "keep"),
    [(1, 4, 4, 4), (1, 7, 5, 9), (1, 14, 14, 49), (1, 3, 11, 1), (1, 6, 9, 54), (2, 5, 3, 7)],
)
def test_uniform_grid(t, h, w, keep):
    idx = M.uniform_grid_indices(t, h, w, keep)
    assert idx.numel() == keep == torch.unique(idx).numel()
    assert bool((idx >= 0).all()) and int(idx.max()) < t * h * w
    assert torch.equal(idx, torch.sort(idx).values)
    if (h, w, keep) == (4, 4, 4):
        assert idx.tolist() == [5, 7, 13, 15]  # the centres of the four 2x2 blocks
    if keep == h * w * t:
        assert idx.tolist() == list(range(t * h * w))
    if t == 1 and keep >= 4:  # rows and columns both spread over the grid
        rows, cols = idx // w, idx % w
        assert int(rows.max() - rows.min()) >= h // 2 and int(cols.max() - cols.min()) >= w // 2


def test_uniform_grid_errors():
    with pytest.raises(ValueError, match="keep must be in"):
        M.uniform_grid_indices(1, 3, 3, 10)


def _naive_divprune(x: np.ndarray, keep: int) -> list[int]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - u @ u.T
    chosen = [int(np.argmax(d.mean(1)))]
    while len(chosen) < keep:
        best, best_v = -1, -np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            v = min(d[i, j] for j in chosen)
            if v > best_v:
                best, best_v = i, v
        chosen.append(best)
    return sorted(chosen)


def _naive_dart(x: np.ndarray, keep: int, pivots: int) -> list[int]:
    norms = np.linalg.norm(x, axis=1)
    p = min(pivots, keep)
    piv = sorted(range(len(x)), key=lambda i: (-norms[i], i))[:p]
    u = x / norms[:, None]
    sim = (u @ u[piv].T).max(1)
    rest = sorted((i for i in range(len(x)) if i not in piv), key=lambda i: (sim[i], i))
    return sorted(piv + rest[: keep - p])


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.06])
def test_divprune_and_dart_against_naive(preps, ratio):
    for prep in preps:
        keep = M.keep_count(prep.n_visual, ratio)
        x = prep.visual_embeds.double().numpy()
        vp = prep.visual_positions
        assert M.select_divprune(prep, keep).tolist() == vp[_naive_divprune(x, keep)].tolist()
        want = vp[_naive_dart(x, keep, M.DART_PIVOTS)].tolist()
        assert M.select_dart(prep, keep).tolist() == want


def test_oracle_picks_the_top_labels(preps, gen):
    prep = preps[0]
    label = torch.rand(prep.n_visual, generator=gen)
    kept = M.select("oracle", None, prep, 0.25, label=label)
    k = M.keep_count(prep.n_visual, 0.25)
    assert kept.tolist() == prep.visual_positions[torch.sort(label.topk(k).indices).values].tolist()


def test_random_is_seeded(preps):
    prep = preps[2]
    a = M.select("random", None, prep, 0.3, seed=4)
    assert torch.equal(a, M.select("random", None, prep, 0.3, seed=4))
    assert not torch.equal(a, M.select("random", None, prep, 0.3, seed=5))
    assert a.numel() == torch.unique(a).numel() == M.keep_count(prep.n_visual, 0.3)
    assert bool(torch.isin(a, prep.visual_positions).all())


def test_select_batch_handles_left_padding(model, processor, samples, preps):
    """Questions of different lengths: the batch is left-padded; per-sample selections equal
    those of the unpadded prompts."""
    qs = [samples[0].question.text, "what colour is the leftmost object ?", "how many ?"]
    batch = build_inputs(processor, [s.image for s in samples], qs)
    assert not bool(batch["attention_mask"].bool().all())
    got = M.select_batch("attention", model, batch, 0.5)
    for s, q, kept in zip(samples, qs, got, strict=True):
        one = build_inputs(processor, [s.image], [q])
        prep = M.prepare(model, one)
        assert torch.equal(kept, M.select("attention", model, prep, 0.5))


def test_keep_count_and_errors(model, preps):
    assert M.keep_count(35, 0.5) == 18 and M.keep_count(35, 0.125) == 4
    assert M.keep_count(3, 0.01) == 1 and M.keep_count(7, 1.0) == 7
    prep = preps[0]
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        M.select("random", model, prep, 1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        M.select("fast", model, prep, 0.5)
    with pytest.raises(ValueError, match="needs label"):
        M.select("oracle", model, prep, 0.5)
    with pytest.raises(ValueError, match="needs mapper"):
        M.select("mapper", model, prep, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        M.select_scores(prep, torch.ones(3), 2)
    with pytest.raises(ValueError, match="layer must be"):
        M.fastv_logits(model, prep, 3, layer=9)
    with pytest.raises(ValueError, match="Qwen2-VL"):
        M.prepare(torch.nn.Linear(2, 2), {})


# --------------------------------------------------------------------------------------------
# Spread rule (mapper v2)
# --------------------------------------------------------------------------------------------


def _greedy_spread(scores: list[float], grid, keep: int, radius: int) -> list[int]:
    """The spread rule restated on a grid: take tokens by score (ties: lower index), passing
    over a token next to one already taken; the passed-over ones follow in the same order."""
    t, h, w = grid
    where = [(i // (h * w), i // w % h, i % w) for i in range(t * h * w)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    taken: list[int] = []
    for i in order:
        f, r, c = where[i]
        near = any(
            where[j][0] == f and max(abs(where[j][1] - r), abs(where[j][2] - c)) <= radius
            for j in taken
        )
        if not near:
            taken.append(i)
    rest = [i for i in order if i not in taken]
    return sorted((taken + rest)[:keep])


@pytest.mark.parametrize("grid", [(1, 5, 7), (2, 3, 4), (1, 1, 9), (3, 2, 1)])
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_spread_keep_equals_the_reference(grid, radius):
    t, h, w = grid
    n = t * h * w
    coords = torch.tensor([[f, r, c] for f in range(t) for r in range(h) for c in range(w)])
    assert torch.equal(M.grid_coords(grid), coords)
    g = torch.Generator().manual_seed(100 * n + radius)
    scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties
    scores[int(torch.randint(0, n, (1,), generator=g))] = float("nan")
    cu = torch.tensor([0, n])
    for keep in sorted({1, max(1, n // 5), max(1, n // 2), n - 1 or 1, n}):
        kept = M.spread_keep(scores, grid, keep, radius)
        ref, cu_kept = spread_select_ref(scores, cu, torch.tensor([keep]), coords, radius)
        assert kept.dtype == torch.int64 and torch.equal(kept, ref) and int(cu_kept[1]) == keep
        clean = torch.nan_to_num(scores, nan=-1.0).tolist()  # NaN ranks below every score
        assert kept.tolist() == _greedy_spread(clean, grid, keep, radius)
    # radius 0 suppresses nothing: the plain top-k
    plain = torch.topk(torch.nan_to_num(scores, nan=-1.0) - 1e-3 * torch.arange(n), 3).indices
    assert M.spread_keep(scores, grid, 3, 0).tolist() == sorted(plain.tolist())


def test_spread_keep_errors():
    with pytest.raises(ValueError, match="scores must be"):
        M.spread_keep(torch.ones(5), (1, 2, 3), 2)
    with pytest.raises(ValueError, match="keep must be"):
        M.spread_keep(torch.ones(6), (1, 2, 3), 0)
    with pytest.raises(ValueError, match="radius must be"):
        M.spread_keep(torch.ones(6), (1, 2, 3), 2, -1)
    with pytest.raises(ValueError, match="grid must be"):
        M.grid_coords((1, 0, 3))


def test_spread_methods_select_from_the_plain_scores(model, preps):
    """mapper_spread / attention_spread: the scores of mapper / attention (select_layer0),
    kept by spread_keep on the prompt's merged grid at SPREAD_RADIUS."""
    mapper = _mapper(11)
    assert M.SPREAD_RADIUS == 1 and M.SPREAD_METHODS == {
        "mapper_spread": "mapper",
        "attention_spread": "attention",
    }
    for prep in preps:
        keep = M.keep_count(prep.n_visual, 0.25)
        for method, use in (("mapper_spread", mapper), ("attention_spread", None)):
            _, scores = M.select_layer0(model, prep, keep, use)
            kept = M.select(method, model, prep, 0.25, mapper=mapper)
            idx = _greedy_spread(scores.tolist(), prep.grid, keep, M.SPREAD_RADIUS)
            assert torch.equal(kept, prep.visual_positions[idx])
            assert torch.equal(kept, M.select_spread(prep, scores, keep))
    with pytest.raises(ValueError, match="needs mapper"):
        M.select("mapper_spread", model, preps[0], 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        M.select_spread(preps[0], torch.ones(3), 2)
