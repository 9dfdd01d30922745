"""The training loop on synthetic labels: it learns, it is reproducible, it saves a usable mapper."""

from __future__ import annotations

import json

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels.mapper import MapperConfig, load_mapper
from tokenprune_kernels.testing import make_inputs, simple_layout
from tokenprune_kernels.training import (
    TrainConfig,
    evaluate,
    log_path_for,
    prepare_samples,
    split_indices,
    synthetic_records,
    train_mapper,
)

SMALL = MapperConfig(channels=(8, 16), kernel_size=5)


@pytest.fixture(scope="module")
def samples():
    packed, skipped = prepare_samples(synthetic_records(240, 5, 70, seed=1))
    assert skipped.total == 0
    return packed


def _config(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "val_fraction": 0.2, "mapper": SMALL}
    return TrainConfig(**{**base, **kw})


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_lowers_val_kl_and_saves_best(samples, tmp_path):
    out = tmp_path / "m" / "mapper.safetensors"
    lines = []
    result = train_mapper(
        samples, _config(epochs=6), out=out, log_path=log_path_for(out), printer=lines.append
    )
    kls = [e["val_kl"] for e in result.history]
    assert len(kls) == 6 and result.best_epoch == 1 + kls.index(min(kls))
    assert min(kls) < 0.6 * result.initial["kl"]
    # better than the untrained mapper and than raw attention at keeping the label's top tokens
    for key in ("recall@50%", "recall@25%"):
        assert result.best[f"val_{key}"] > result.initial[key] + 0.2
        assert result.best[f"val_{key}"] > result.baseline[key]
    # the returned model is the best epoch's and is what was saved
    loaded = load_mapper(out)
    assert loaded.config == SMALL and _same_weights(loaded, result.model)
    _, val = split_indices(len(samples), 0.2, seed=0)
    metrics = evaluate(loaded, samples, val)
    assert metrics["kl"] == pytest.approx(result.best["val_kl"], rel=1e-5)
    log = json.loads(log_path_for(out).read_text())
    assert log["best_epoch"] == result.best_epoch and len(log["epochs"]) == 6
    assert log["samples"]["val"] == val.numel() == 48
    assert log["config"]["mapper"]["channels"] == [8, 16]
    assert {"torch", "tokenprune_kernels"} <= set(log["versions"])
    assert len(lines) == 2 + 6 and "val_recall@25%" in lines[-1]
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "mapper.json",
        "mapper.safetensors",
        "mapper.train.json",
    ]


def test_same_seed_same_weights_bitwise(samples):
    a = train_mapper(samples, _config(epochs=2))
    b = train_mapper(samples, _config(epochs=2))
    assert _same_weights(a.model, b.model)
    assert a.history[-1]["val_kl"] == b.history[-1]["val_kl"]
    c = train_mapper(samples, _config(epochs=2, seed=1))
    assert not _same_weights(a.model, c.model)


def test_micro_batches_give_the_same_steps(samples):
    """Splitting a batch by --max-batch-tokens sums the same gradients: same training run up to
    float rounding. (The head bias gets a zero gradient - softmax ignores a shift - so Adam moves it
    by rounding noise; compare the logits up to their per-sample mean instead.)"""
    whole = train_mapper(samples, _config(epochs=1))
    split = train_mapper(samples, _config(epochs=1, max_batch_tokens=150))
    for (name, p), q in zip(whole.model.named_parameters(), split.model.parameters(), strict=True):
        if name != "head.bias":
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
    attn, _, _, lengths = samples.collate(torch.arange(20))
    with torch.no_grad():
        a, b = whole.model(attn, lengths), split.model(attn, lengths)
    valid = torch.arange(attn.shape[1]) < lengths.unsqueeze(1)
    diff = torch.where(valid, a - b, 0.0)
    diff = torch.where(valid, diff - diff.sum(1, keepdim=True) / lengths.unsqueeze(1), 0.0)
    assert diff.abs().max() < 1e-3
    assert whole.history[0]["val_kl"] == pytest.approx(split.history[0]["val_kl"], rel=1e-4)


def test_bucketed_batches_learn(samples):
    result = train_mapper(samples, _config(epochs=3, bucket=True))
    assert result.best["val_kl"] < 0.8 * result.initial["kl"]


def test_divergence_is_reported(samples):
    with pytest.raises(ValueError, match="non-finite loss in epoch 1; lower the learning rate"):
        train_mapper(samples, _config(epochs=1, lr=1e30))


def test_config_errors():
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr must be a finite float > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="max_batch_tokens must be an int >= 1"):
        TrainConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        TrainConfig(device="meta")
    with pytest.raises(TypeError, match="mapper must be a MapperConfig"):
        TrainConfig(mapper=(8, 16))


def test_trained_mapper_plugs_into_the_op(samples, tmp_path):
    out = tmp_path / "mapper.safetensors"
    train_mapper(samples, _config(epochs=1), out=out)
    mapper = load_mapper(out)
    x = make_inputs([simple_layout(37, 5), simple_layout(64, 3)], generator=torch.Generator())
    params = mapper.op_params()
    kept_embeds, _, kept_idx, cu_kept, scores = tp.prune_visual_tokens(
        x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.visual_idx, x.cu_seqlens_v,
        x.visual_embeds, x.visual_position_ids, mapper_params=params,
        mapper_kernel_size=mapper.config.kernel_size, mapper_input_eps=mapper.config.input_eps,
        keep_ratio=0.25,
    )  # fmt: skip
    attn = tp.instruction_attention(
        x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.visual_idx, x.cu_seqlens_v
    )
    with torch.no_grad():
        want_scores = mapper.forward_packed(attn, x.cu_seqlens_v)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    want_idx, _ = tp.select_topk(want_scores, x.cu_seqlens_v, keep_ratio=0.25)
    assert torch.equal(kept_idx, want_idx) and cu_kept.tolist() == [0, 9, 25]
    assert torch.equal(kept_embeds, x.visual_embeds[want_idx])


def test_trained_mapper_loads_in_apply_tokenprune(samples, tmp_path):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from tokenprune_kernels.transformers import apply_tokenprune, last_pruned, revert_tokenprune

    out = tmp_path / "mapper.safetensors"
    train_mapper(samples, _config(epochs=1), out=out)
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=4,
    )  # fmt: skip
    text = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=120, video_token_index=121,
        image_grid_pinpoints=[[16, 16]], attn_implementation="sdpa",
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    input_ids = torch.tensor([[1, 2, 3] + [120] * 36 + [4, 5, 6, 7, 8]])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 2, 3, 16, 16),
        "image_sizes": torch.tensor([[16, 16]]),
    }
    apply_tokenprune(model, keep_ratio=0.5, mapper=out)  # the path, as a user passes it
    with torch.no_grad():
        model(**inputs)
    pruned = last_pruned(model)
    assert pruned.kept_visual[0].numel() == 18
    scores = pruned.scores[0]
    want_idx, _ = tp.select_topk(scores, torch.tensor([0, 36]), keep_ratio=0.5)
    assert torch.equal(pruned.kept_visual[0], 3 + want_idx)
    # the scores are the trained mapper's, not the raw attention of the training-free mode
    apply_tokenprune(model, keep_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    raw = last_pruned(model).scores[0]
    assert torch.all(raw >= 0) and raw.sum() < 1.0 + 1e-5
    assert not torch.allclose(scores, raw)
    apply_tokenprune(model, keep_ratio=0.5, mapper=load_mapper(out))
    with torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(last_pruned(model).scores[0], scores)
    revert_tokenprune(model)


@pytest.mark.cuda
def test_cuda_training_is_reproducible(samples):
    a = train_mapper(samples, _config(epochs=2, device="cuda"))
    b = train_mapper(samples, _config(epochs=2, device="cuda"))
    assert next(a.model.parameters()).is_cuda
    assert _same_weights(a.model, b.model)
    cpu = train_mapper(samples, _config(epochs=2))
    for p, q in zip(a.model.parameters(), cpu.model.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-2, atol=1e-3)
