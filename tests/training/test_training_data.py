"""Targets, top-k masks, the split, batching, padding and the loss, against independent oracles."""

from __future__ import annotations

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels.labels import LabelRecord
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.training import (
    batch_indices,
    keep_count,
    kl_per_sample,
    make_target,
    prepare_samples,
    recall_at,
    split_indices,
    synthetic_records,
    topk_mask,
)


def _oracle_target(label: list[float]) -> list[float] | None:
    """Python oracle: rank by (value desc, index asc), keep ceil(n/2), renormalise."""
    n = len(label)
    order = sorted(range(n), key=lambda i: (-label[i], i))
    keep = set(order[: (n + 1) // 2])
    kept = [label[i] if i in keep else 0.0 for i in range(n)]
    total = sum(kept)
    return None if total == 0 else [v / total for v in kept]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 101])
def test_make_target_matches_oracle_with_ties(n, gen):
    # few distinct values so ties straddle the median
    label = torch.randint(0, 4, (n,), generator=gen).float() * 0.25
    label[0] = 1.0  # never all zero
    want = _oracle_target(label.tolist())
    got = make_target(label)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert int((got > 0).sum()) <= (n + 1) // 2
    assert abs(float(got.double().sum()) - 1.0) < 1e-6


def test_make_target_random_values(gen):
    label = torch.rand(257, generator=gen) * 3
    got = make_target(label)
    torch.testing.assert_close(got, torch.tensor(_oracle_target(label.tolist())))
    # exactly the lowest 128 are zero: nothing below the median survives
    assert int((got == 0).sum()) == 128
    assert float(label[got == 0].max()) < float(label[got > 0].min())


def test_make_target_unusable():
    assert make_target(torch.zeros(5)) is None
    assert make_target(torch.zeros(0)) is None
    with pytest.raises(ValueError, match="label must be 1-D"):
        make_target(torch.ones(2, 3))


def test_topk_mask_and_keep_count_match_select_topk(gen):
    lengths = [1, 2, 5, 13, 31, 64]
    # ties (few distinct values) and signed zeros
    scores = [torch.randint(-2, 3, (n,), generator=gen).float() * 0.5 for n in lengths]
    scores[3][0], scores[3][1] = -0.0, 0.0
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    width = max(lengths)
    padded = torch.stack([torch.cat([s, torch.full((width - len(s),), 9.0)]) for s in scores])
    n = torch.tensor(lengths)
    for ratio in (0.5, 0.25, 0.37, 1.0):
        kept_idx, cu_kept = tp.select_topk(torch.cat(scores), cu, keep_ratio=ratio)
        k = keep_count(n, ratio)
        assert torch.equal(k, cu_kept[1:] - cu_kept[:-1])
        mask = topk_mask(padded, n, k)
        got = torch.cat([mask[b, : lengths[b]] for b in range(len(lengths))]).nonzero().view(-1)
        assert torch.equal(got, kept_idx)


def test_recall_at_by_hand():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    label = torch.tensor([[4.0, 0.0, 3.0, 2.0, 1.0, 0.0], [5.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    lengths = torch.tensor([5, 2])
    # row 0: k=3 (floor(2.5+0.5)), label top {0,2,3}, score top {0,1,2} -> 2/3; row 1: k=1 -> 0
    torch.testing.assert_close(recall_at(scores, label, lengths, 0.5), torch.tensor([2 / 3, 0.0]))
    # k=1 at 25% for both rows: row 0 hit, row 1 miss
    torch.testing.assert_close(recall_at(scores, label, lengths, 0.25), torch.tensor([1.0, 0.0]))


def test_prepare_samples_skips_and_collates(gen):
    recs = synthetic_records(6, 3, 17, seed=3)
    recs.insert(2, LabelRecord("zero", torch.rand(5, generator=gen), torch.zeros(5)))
    recs.insert(4, LabelRecord("empty", torch.zeros(0), torch.zeros(0)))
    samples, skipped = prepare_samples(recs)
    assert (skipped.empty, skipped.all_zero_label, skipped.total) == (1, 1, 2)
    assert samples.ids == [f"syn-{i:05d}" for i in range(6)]
    idx = torch.tensor([4, 0, 5])
    attn, target, label, lengths = samples.collate(idx)
    kept = [r for r in recs if r.sample_id.startswith("syn")]
    assert lengths.tolist() == [kept[i].attn.numel() for i in idx.tolist()]
    assert attn.shape == (3, int(lengths.max()))
    for row, i in enumerate(idx.tolist()):
        n = int(lengths[row])
        assert torch.equal(attn[row, :n], kept[i].attn)
        assert torch.equal(label[row, :n], kept[i].label)
        assert torch.equal(target[row, :n], make_target(kept[i].label))
        assert not attn[row, n:].any() and not target[row, n:].any()
    with pytest.raises(ValueError, match="duplicate sample_id 'syn-00001'"):
        prepare_samples([*recs, recs[1]])


def test_split_is_deterministic_and_checked():
    train, val = split_indices(103, 0.1, seed=7)
    assert val.numel() == 10 and train.numel() == 93
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(103))
    train2, val2 = split_indices(103, 0.1, seed=7)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not torch.equal(val, split_indices(103, 0.1, seed=8)[1])
    assert split_indices(2, 0.01, seed=0)[1].numel() == 1  # at least one validation sample
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
            split_indices(10, bad, seed=0)
    with pytest.raises(ValueError, match="too few samples"):
        split_indices(1, 0.1, seed=0)
    with pytest.raises(ValueError, match="too few samples"):
        split_indices(4, 0.9, seed=0)


@pytest.mark.parametrize("bucket", [False, True])
def test_batch_indices_cover_once(bucket, gen):
    lengths = torch.randint(1, 500, (1000,), generator=gen)
    indices = torch.randperm(1000, generator=gen)[:777]
    batches = batch_indices(indices, 13, torch.Generator().manual_seed(1), lengths, bucket)
    assert all(b.numel() <= 13 for b in batches)
    assert torch.equal(torch.cat(batches).sort().values, indices.sort().values)
    again = batch_indices(indices, 13, torch.Generator().manual_seed(1), lengths, bucket)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    pad = sum(b.numel() * int(lengths[b].max()) for b in batches)
    if bucket:  # bucketing must cut padding well below random batching
        plain = batch_indices(indices, 13, torch.Generator().manual_seed(1))
        assert pad < 0.8 * sum(b.numel() * int(lengths[b].max()) for b in plain)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batch_indices(indices, 0)


def test_padding_does_not_change_logits_or_loss(gen):
    """A sample's logits and KL in a padded batch equal running it alone (no padding)."""
    torch.manual_seed(0)
    model = TokenMapper(MapperConfig(channels=(4, 6), kernel_size=5))
    recs = synthetic_records(5, 1, 40, seed=11)
    samples, _ = prepare_samples(recs)
    attn, target, _, lengths = samples.collate(torch.arange(5))
    attn_poisoned = attn.clone()
    for b, n in enumerate(lengths.tolist()):
        attn_poisoned[b, n:] = float("nan")  # padding content must not matter
    logits = model(attn_poisoned, lengths)
    kl = kl_per_sample(logits, target, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = model(attn[b : b + 1, :n])
        torch.testing.assert_close(logits[b, :n], alone[0], rtol=1e-5, atol=1e-5)
        t = target[b, :n]
        want = torch.nn.functional.kl_div(
            torch.log_softmax(alone[0], 0), t, reduction="sum", log_target=False
        )
        torch.testing.assert_close(kl[b], want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_ignores_zero_targets_even_at_underflow():
    logits = torch.tensor([[3e38, -3e38, 0.0], [1.0, 2.0, 5.0]])  # log_softmax: 0, -inf, ...
    target = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    lengths = torch.tensor([2, 2])  # the 5.0 is padding and must not count
    kl = kl_per_sample(logits, target, lengths)
    log_q = torch.log_softmax(torch.tensor([1.0, 2.0]), 0)
    want1 = float((0.5 * (torch.log(torch.tensor(0.5)) - log_q)).sum())
    torch.testing.assert_close(kl, torch.tensor([0.0, want1]))
