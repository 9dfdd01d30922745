"""The mapper-width validation (benchmarks/mapper_v2/width.py) on one validation scene of the
shipped model: its FLOPs shares against the analytic formulas written out here, its recall and
accuracy against a separate computation, and the CLI's checks."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from benchmarks.mapper_v2 import width as W
from tokenprune_kernels.grounded.labels_pipeline import label_grounded_sample
from tokenprune_kernels.grounded.methods import keep_count, prepare, pruned_logits, select_layer0
from tokenprune_kernels.grounded.model import (
    ASSETS_DIR,
    MODEL_DIR,
    TOKEN_ID,
    build_inputs,
    load_grounded_model,
)
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, load_mapper, save_mapper

SCENE = 0


@pytest.fixture(scope="module")
def setup():
    model, processor = load_grounded_model()
    labeller, _ = load_grounded_model(attn_implementation="eager")
    torch.manual_seed(3)
    narrow = TokenMapper(MapperConfig(channels=(4, 8), kernel_size=3)).eval()
    mappers = {"big": load_mapper(ASSETS_DIR / "mapper.safetensors"), "narrow": narrow}
    out = W.scene_outcomes(model.eval(), labeller.eval(), processor, mappers, SCENE)
    return model, labeller, processor, mappers, out


def _layer(h, i, hq, hk, d, n):
    return (
        2 * n * h * (hq + 2 * hk) * d
        + 2 * n * hq * d * h
        + 2 * hq * d * n * (n + 1)
        + 6 * n * h * i
    )


def test_flops_per_visual_token():
    # channels (4, 8), kernel 3, one input channel: (2*1*3 + 2*1*4) + (2*4*3 + 2*4*8) + 2*8
    m = TokenMapper(MapperConfig(channels=(4, 8), kernel_size=3))
    assert W.per_token_flops(m) == 14 + 88 + 16
    big = load_mapper(ASSETS_DIR / "mapper.safetensors")
    assert W.per_token_flops(big) == 354058


def test_flops_shares_follow_the_formulas(setup):
    model, _, processor, mappers, out = setup
    c = model.config.text_config
    h, i, hq, hk, L = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.num_hidden_layers,
    )
    d = h // hq
    sample = make_sample("val", SCENE, W.SEED)
    prep = prepare(model, build_inputs(processor, [sample.image], [sample.question.text]))
    n, nv = int(prep.inputs["input_ids"].shape[1]), prep.n_visual
    full = L * _layer(h, i, hq, hk, d, n)
    for r in W.RATIOS:
        k = keep_count(nv, r)
        pruned = L * _layer(h, i, hq, hk, d, n - nv + k)
        att = out["flops"]["att_top"][str(r)] * full - pruned
        assert att > 0  # the layer-0 rows
        for name, m in mappers.items():
            got = out["flops"][f"{name}_top"][str(r)] * full - pruned
            assert got - att == pytest.approx(nv * W.per_token_flops(m), rel=1e-9)
            assert out["flops"][f"{name}_spread1"][str(r)] == out["flops"][f"{name}_top"][str(r)]
    assert out["flops"]["narrow_top"]["0.0625"] < out["flops"]["big_top"]["0.0625"]


def test_outcomes_match_a_separate_computation(setup):
    model, labeller, processor, mappers, out = setup
    sample = make_sample("val", SCENE, W.SEED)
    _, _, record = label_grounded_sample(labeller, processor, sample)
    assert out["labelled"] == (record is not None) and record is not None
    with torch.no_grad():
        prep = prepare(model, build_inputs(processor, [sample.image], [sample.question.text]))
        target = TOKEN_ID[sample.question.answer]
        assert out["unpruned"] == (int(pruned_logits(model, prep).argmax()) == target)
        scores = select_layer0(model, prep, 1, mappers["narrow"])[1]
        n = prep.n_visual
        s = scores.tolist()
        lab = record.label.tolist()
        for r in W.RATIOS:
            k = keep_count(n, r)
            top = sorted(range(n), key=lambda j: (-s[j], j))[:k]
            want_label = set(sorted(range(n), key=lambda j: (-lab[j], j))[:k])
            assert out["recall"]["narrow_top"][str(r)] == len(set(top) & want_label) / k
            pos = prep.visual_positions[torch.tensor(sorted(top))]
            ok = int(pruned_logits(model, prep, pos).argmax()) == target
            assert out["correct"]["narrow_top"][str(r)] == ok
    rules = {f"{src}_{rule}" for src in ("att", "big", "narrow") for rule in ("top", "spread1")}
    assert set(out["correct"]) == set(out["flops"]) == set(out["recall"]) == rules


def test_cli(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_mapper(TokenMapper(MapperConfig(channels=(4, 8), kernel_size=3)), path)
    out = tmp_path / "w.json"
    argv = ["width", "--model-dir", str(MODEL_DIR), "--mappers", str(ASSETS_DIR / "mapper.safetensors"),
            str(path), "--n", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert W.main() == 0
    got = json.loads(out.read_text())
    assert got["split"] == "val" and got["scenes"] == 1 and got["commit"]
    assert got["mappers"]["m"]["channels"] == [4, 8]
    assert set(got["mcnemar_p"]["m_top"]) == {"mapper_top", "att_top"}
    assert got["mcnemar_p"]["att_top"] == {"mapper_top": got["mcnemar_p"]["mapper_top"]["att_top"]}
    capsys.readouterr()
    for bad, match in (
        (["--n", "0"], "--n must be >= 1"),
        (["--mappers", str(path), str(path)], "--mappers need distinct file stems"),
    ):
        monkeypatch.setattr(sys, "argv", [*argv, *bad])
        with pytest.raises(SystemExit):
            W.main()
        assert match in capsys.readouterr().err
