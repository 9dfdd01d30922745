"""The grounded eval harness and the labels pipeline on a handful of tiny samples (a randomly
initialised model: no accuracy values are asserted, only structure, agreement between paths and
determinism)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tokenprune_kernels.explain import explain_relevance
from tokenprune_kernels.grounded import evaluate as E
from tokenprune_kernels.grounded import labels_pipeline as LP
from tokenprune_kernels.grounded import methods as M
from tokenprune_kernels.grounded.model import (
    TOKEN_ID,
    build_inputs,
    build_model,
    save_model_dir,
)
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.labels import read_labels
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper

SIZES = [(64, 80), (96, 64)]
MODEL_SEED = 1  # the ``model`` and ``eager`` fixtures (conftest.py)
RATIOS = [1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def mapper():
    torch.manual_seed(2)
    m = TokenMapper(MapperConfig(channels=(8, 16), kernel_size=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _run(model, processor, mapper, eager, seeds):
    return E.run_eval(
        model, processor, ratios=RATIOS, seeds=seeds, n_per_size=2, sizes=SIZES,
        mapper=mapper, label_model=eager,
    )  # fmt: skip


@pytest.fixture(scope="module")
def results(model, processor, mapper, eager):
    return _run(model, processor, mapper, eager, [0, 3])


def test_structure_and_path_agreement(results):
    assert results["n"] == {"0": 4, "3": 4}
    assert results["visual_tokens"] == [20, 24]
    assert results["real_path_mismatches"] == {"mapper": 0, "attention": 0}
    assert results["generate_agreement"] == [4, 4]
    for m in E.DEFAULT_METHODS:
        for r in map(str, RATIOS):
            for s in ("0", "3"):
                assert 0.0 <= results["accuracy"][m][r][s] <= 1.0
                assert len(results["predictions"][m][r][s]) == 4
            assert results["prefill_ms"][m][r] > results["select_llm_ms"][m][r] > 0
        # keep ratio 1: every method runs the unpruned prompt
        assert results["predictions"][m]["1.0"] == results["predictions"]["none"]["1.0"]
    for m in ("none", "mapper", "attention"):
        assert results["real_prefill_ms"][m]["0.5"] > 0


def test_accuracy_counts_the_answer_token(model, processor, results):
    """The unpruned accuracy and predictions equal an independent count from the model's own
    forward on each prompt."""
    for seed in (0, 3):
        preds, hits = [], 0
        for s in E.eval_samples(seed, 2, SIZES):
            inputs = build_inputs(processor, [s.image], [s.question.text])
            with torch.no_grad():
                tok = int(model(**inputs).logits[0, -1].argmax())
            preds.append(tok)
            hits += tok == TOKEN_ID[s.question.answer]
        assert results["predictions"]["none"]["1.0"][str(seed)] == preds
        assert results["accuracy"]["none"]["1.0"][str(seed)] == hits / 4


def test_deterministic_for_a_seed(model, processor, mapper, eager, results):
    again = _run(model, processor, mapper, eager, [3])
    for m in E.DEFAULT_METHODS:
        for r in map(str, RATIOS):
            assert again["predictions"][m][r]["3"] == results["predictions"][m][r]["3"]
            assert again["accuracy"][m][r]["3"] == results["accuracy"][m][r]["3"]


def test_pruned_predictions_differ_between_methods(results):
    """At 25% the methods do not all see the same tokens (so they are not all the same run)."""
    p = results["predictions"]
    runs = {m: tuple(p[m]["0.25"]["0"] + p[m]["0.25"]["3"]) for m in E.DEFAULT_METHODS}
    assert len(set(runs.values())) > 1


def test_eval_samples():
    a = E.eval_samples(4, 2, [(224, 224), (64, 80)])
    assert [s.index for s in a] == [0, 1, 28, 29]  # 13 test sizes: (64, 80) gets k = 13 + 1 = 14
    assert [s.scene.size for s in a] == [(224, 224)] * 2 + [(64, 80)] * 2
    b = E.eval_samples(5, 2, [(224, 224)])
    assert a[0].question.text != b[0].question.text or a[0].scene != b[0].scene
    with pytest.raises(ValueError, match="n_per_size"):
        E.eval_samples(0, 0, SIZES)
    with pytest.raises(ValueError, match="size must be"):
        E.eval_samples(0, 1, [(65, 80)])


def test_run_eval_errors(model, processor):
    with pytest.raises(ValueError, match="must include 'none'"):
        E.run_eval(model, processor, methods=["random"], sizes=SIZES)
    with pytest.raises(ValueError, match="methods must be"):
        E.run_eval(model, processor, methods=["none", "bogus"], sizes=SIZES)
    with pytest.raises(ValueError, match="ratios must be"):
        E.run_eval(model, processor, methods=["none"], ratios=[0.0], sizes=SIZES)
    with pytest.raises(ValueError, match="needs mapper"):
        E.run_eval(model, processor, methods=["none", "mapper"], sizes=SIZES)
    with pytest.raises(ValueError, match="needs label_model"):
        E.run_eval(model, processor, methods=["none", "oracle"], sizes=SIZES)


def _fake(acc_ours, acc_other, none=(0.8, 0.8, 0.8)):
    seeds = ["0", "1", "2"]
    acc = {
        "none": {r: dict(zip(seeds, none, strict=True)) for r in ("0.5", "0.25")},
        "mapper": {r: dict(zip(seeds, acc_ours, strict=True)) for r in ("0.5", "0.25")},
        "random": {r: dict(zip(seeds, acc_other, strict=True)) for r in ("0.5", "0.25")},
    }
    rel = {
        m: {r: {s: v / acc["none"][r][s] for s, v in d.items()} for r, d in c.items()}
        for m, c in acc.items()
    }
    return {"accuracy": acc, "relative": rel}


def test_targets():
    met = E.targets(_fake((0.79, 0.80, 0.78), (0.5, 0.55, 0.52)))
    assert any("mapper at 50%" in line and line.endswith(": MET") for line in met)
    assert any("mapper vs random" in line and line.endswith(": MET") for line in met)
    # ours better on average but within the seed spread: not met
    close = E.targets(_fake((0.60, 0.75, 0.70), (0.58, 0.62, 0.66)))
    assert any("mapper vs random" in line and "NOT MET" in line for line in close)
    assert any("mapper at 25%" in line and "NOT MET" in line for line in close)
    # ours worse: the mean difference carries its own sign
    worse = E.targets(_fake((0.50, 0.52, 0.51), (0.60, 0.61, 0.62)))
    line = next(x for x in worse if "mapper vs random" in x)
    assert ": -10.0 points (mean)" in line and line.endswith("NOT MET"), line


def test_report_and_plot(results, tmp_path):
    text = E.format_report(results, {"title": "t", "commit": "abc"}, "tokenprune eval x")
    assert "| mapper (ours) |" in text and "- commit: abc" in text
    assert "`tokenprune eval x`" in text and "## Targets" in text and "chance level" in text
    assert abs(E.chance_accuracy() - (1 / 6 + 1 / 4 + 1 / 4 + 1 / 2 + 1 / 6) / 5) < 1e-12
    for m in E.DEFAULT_METHODS:
        assert f"| {E.METHOD_LABELS[m]} |" in text
    pytest.importorskip("matplotlib")
    assert E.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_outputs(tmp_path, model, processor, mapper, capsys):
    mdir = save_model_dir(model, processor, tmp_path / "m")
    save_mapper(mapper, tmp_path / "mapper.safetensors")
    out = tmp_path / "res" / "g"
    argv = [
        "--model-dir", str(mdir), "--mapper", str(tmp_path / "mapper.safetensors"),
        "--methods", "none", "mapper", "uniform", "--ratios", "1", "0.25", "--seeds", "1",
        "--n-per-size", "1", "--sizes", "train", "--out", str(out),
    ]  # fmt: skip
    assert E.main(argv) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["n"] == {"1": 9} and saved["real_path_mismatches"] == {"mapper": 0}
    assert "predictions" not in saved and len(saved["predictions_sha256"]) == 64
    assert saved["command"].startswith("tokenprune eval --model-dir")
    assert "commit" in saved["header"] and "transformers" in saved["header"]
    assert out.with_suffix(".md").read_text().startswith("# Grounded-VQA")
    assert E.main([*argv[:2], "--methods", "none", "--out", str(out), "--threads", "0"]) == 2
    assert E.main(["--model-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "holds no model" in capsys.readouterr().err


def test_eval_parser_registers():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    E.add_eval_parser(sub)
    args = parser.parse_args(["eval", "--out", "x", "--sizes", "large", "--seeds", "4"])
    assert args.func is E.cmd_eval and args.sizes == "large" and args.seeds == [4]


# --------------------------------------------------------------------------------------------
# Labels pipeline
# --------------------------------------------------------------------------------------------


def test_label_sample_matches_the_inference_signal(eager, processor):
    """A sample the model answers 'correctly' (its reference set to the greedy answer): the
    record's attn is the layer-0 score the harness's selection uses, its label the relevance of
    the greedy tokens. The sample is one whose greedy answer decodes to words (two tokens; most
    of this random model's answers are special tokens that decode to '')."""
    s = make_sample("train", 1, 7, (80, 96))
    ok, greedy, _ = LP.label_grounded_sample(eager, processor, s)
    assert len(greedy.split()) == 2, greedy
    s = dataclasses.replace(s, question=dataclasses.replace(s.question, answer=greedy))
    ok, greedy2, rec = LP.label_grounded_sample(eager, processor, s)
    assert ok and greedy2 == greedy and rec is not None
    inputs = build_inputs(processor, [s.image], [s.question.text])
    prep = M.prepare(eager, inputs)
    _, scores = M.select_layer0(eager, prep, prep.n_visual)
    torch.testing.assert_close(rec.attn, scores.float(), rtol=1e-4, atol=1e-7)
    ids = processor.tokenizer(greedy, add_special_tokens=False)["input_ids"]
    rel = explain_relevance(eager, inputs, torch.tensor(ids)).relevance
    torch.testing.assert_close(rec.label, rel.float(), rtol=1e-5, atol=1e-8)
    assert rec.meta["n_visual"] == prep.n_visual == 30


def test_make_labels_writes_shards_and_summary(eager, processor, tmp_path, monkeypatch):
    """Every sample 'correct' (reference = the greedy text, even when it decodes to ''): the
    shards hold all three, each once; a rerun skips them all."""
    real = LP.make_sample

    def fake(split, i, seed):
        s = real(split, i, seed, (64, 64))
        _, greedy, _ = LP.label_grounded_sample(eager, processor, s)
        return dataclasses.replace(s, question=dataclasses.replace(s.question, answer=greedy))

    monkeypatch.setattr(LP, "make_sample", fake)
    summary = LP.make_labels(eager, processor, tmp_path / "labels", 3, metadata={"m": 1})
    assert summary["seen"] == summary["correct"] == 3 and summary["incorrect"] == 0
    recs = read_labels(tmp_path / "labels")
    assert sorted(r.sample_id for r in recs) == ["train-0", "train-1", "train-2"]
    assert all(r.attn.shape == r.label.shape == (16,) for r in recs)
    again = LP.make_labels(eager, processor, tmp_path / "labels", 3, metadata={"m": 1})
    assert again["skipped"] == 3 and again["seen"] == 0
    assert len(read_labels(tmp_path / "labels")) == 3
    with pytest.raises(ValueError, match="n must be"):
        LP.make_labels(eager, processor, tmp_path / "labels", 0)


def test_relevance_label(eager, processor):
    s = make_sample("test", 1, 2, (64, 96))
    inputs = build_inputs(processor, [s.image], [s.question.text])
    rel = LP.relevance_label(eager, inputs, s.question.answer)
    ref = explain_relevance(eager, inputs, torch.tensor([TOKEN_ID[s.question.answer]]))
    assert rel.shape == (24,) and bool((rel >= 0).all())
    torch.testing.assert_close(rel, ref.relevance.float())
    # an sdpa model with only its language model switched to eager gives the same label
    mixed = E.set_text_eager(build_model(seed=1))
    assert mixed.model.visual.config._attn_implementation == "sdpa"
    torch.testing.assert_close(
        LP.relevance_label(mixed, inputs, s.question.answer), rel, rtol=1e-4, atol=1e-7
    )
