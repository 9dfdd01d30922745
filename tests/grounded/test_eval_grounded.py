"""The grounded eval harness and the labels pipeline on a handful of tiny samples (a randomly
initialised model: no accuracy values are asserted, only structure, agreement between paths,
the FLOPs bookkeeping, the paired statistics and determinism)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tokenprune_kernels.explain import explain_relevance
from tokenprune_kernels.grounded import evaluate as E
from tokenprune_kernels.grounded import labels_pipeline as LP
from tokenprune_kernels.grounded import methods as M
from tokenprune_kernels.grounded.flops import (
    LMShape,
    fastv_flops,
    fastv_keep_for_budget,
    prefill_flops,
)
from tokenprune_kernels.grounded.model import (
    MODEL_DIR,
    TOKEN_ID,
    build_config,
    build_inputs,
    build_model,
    save_model_dir,
)
from tokenprune_kernels.grounded.scenes import QUESTION_TYPES, make_sample
from tokenprune_kernels.labels import read_labels
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper

SIZES = [(64, 80), (96, 64)]
MODEL_SEED = 1  # the ``model`` and ``eager`` fixtures (conftest.py)
RATIOS = [1.0, 0.5, 0.25]
THRESHOLDS = [0.3, 0.9]
N_PER_SIZE = 3


@pytest.fixture(scope="module")
def mapper():
    torch.manual_seed(2)
    m = TokenMapper(MapperConfig(channels=(8, 16), kernel_size=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _run(model, processor, mapper, eager, samples, **kw):
    return E.run_eval(
        model, processor, samples, ratios=RATIOS, mapper=mapper, label_model=eager,
        thresholds=THRESHOLDS, adaptive_bounds=(0.1, 0.8), time_samples=4, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def samples():
    return E.eval_samples(0, N_PER_SIZE, SIZES)


@pytest.fixture(scope="module")
def raw(model, processor, mapper, eager, samples):
    return _run(model, processor, mapper, eager, samples)


@pytest.fixture(scope="module")
def summary(raw):
    return E.summarize(raw, n_boot=300)


def test_structure_and_path_agreement(raw, summary):
    n = 2 * N_PER_SIZE
    assert len(raw["target"]) == summary["n"] == n
    assert summary["visual_tokens"] == [20, 24]
    assert raw["real_path_mismatches"] == {
        "mapper": 0,
        "attention": 0,
        "mapper_spread": 0,
        "attention_spread": 0,
    }
    assert raw["generate_agreement"] == [4, 4]
    assert raw["eq_keys"] == ["fastv_eq", "fastv1_eq"]
    for k in [*E.DEFAULT_METHODS, *raw["eq_keys"]]:
        for r in map(str, RATIOS):
            assert len(raw["pred"][k][r]) == len(raw["flops"][k][r]) == n
        # keep ratio 1: every run is the unpruned prompt
        assert raw["pred"][k]["1.0"] == raw["pred"]["none"]["1.0"]
    for m in E.DEFAULT_METHODS:
        for r in map(str, RATIOS):
            e = summary["accuracy"][m][r]
            assert 0.0 <= e["ci"][0] <= e["acc"] <= e["ci"][1] <= 1.0
            assert summary["prefill_ms"][m][r] > summary["select_llm_ms"][m][r] > 0
    for m in ("none", "mapper", "attention"):
        assert summary["real_prefill_ms"][m]["0.5"] > 0


def test_accuracy_counts_the_answer_token(model, processor, samples, raw, summary):
    """The unpruned predictions and accuracy equal an independent count from the model's own
    forward on each prompt, and the stored outcome string is that count per question."""
    preds, hits = [], []
    for s in samples:
        inputs = build_inputs(processor, [s.image], [s.question.text])
        with torch.no_grad():
            tok = int(model(**inputs).logits[0, -1].argmax())
        preds.append(tok)
        hits.append(tok == TOKEN_ID[s.question.answer])
    assert raw["pred"]["none"]["1.0"] == preds
    assert summary["accuracy"]["none"]["1.0"]["acc"] == sum(hits) / len(hits)
    assert summary["correct"]["none"]["0.5"] == "".join("01"[h] for h in hits)


def test_flops_columns(model, raw, summary):
    """Unpruned = 1.0; an input method at keep k = its pruned prefill + overhead, relative to the
    sample's unpruned prefill; FastV never below its K / L share; equal-compute runs within the
    mapper's budget (or unreachable, with the minimum above the budget)."""
    shape = LMShape.from_config(model.config)
    assert all(v == 1.0 for r in map(str, RATIOS) for v in raw["flops"]["none"][r])
    assert summary["flops"]["none"]["0.25"] == 1.0 and summary["overhead"]["random"]["0.25"] == 0
    for i, (n, nv) in enumerate(zip(raw["seq_len"], raw["n_visual"], strict=True)):
        full = prefill_flops(shape, n)
        k = M.keep_count(nv, 0.25)
        assert raw["keep"]["random"]["0.25"][i] == k
        assert raw["flops"]["random"]["0.25"][i] == pytest.approx(
            prefill_flops(shape, n, nv, k) / full
        )
        mapper = raw["flops"]["mapper"]["0.25"][i]
        assert mapper > raw["flops"]["attention"]["0.25"][i] > raw["flops"]["random"]["0.25"][i]
        for m, layer in M.FASTV_LAYERS.items():
            for r in ("0.5", "0.25"):
                assert raw["flops"][m][r][i] >= layer / shape.layers
            k_eq = raw["keep"][m + "_eq"]["0.25"][i]
            if k_eq is None:
                assert raw["fastv_min_flops"][m][i] > mapper
            else:
                assert raw["flops"][m + "_eq"]["0.25"][i] <= mapper + 1e-12
                assert k_eq == fastv_keep_for_budget(shape, n, nv, mapper * full, layer)


def test_adaptive_runs(raw, summary):
    lo = [M.keep_count(nv, 0.1) for nv in raw["n_visual"]]
    hi = [M.keep_count(nv, 0.8) for nv in raw["n_visual"]]
    ks = {t: raw["adaptive"][str(t)]["keep"] for t in THRESHOLDS}
    for t in THRESHOLDS:
        assert all(a <= k <= b for a, k, b in zip(lo, ks[t], hi, strict=True))
    # a larger mass never keeps fewer tokens
    assert all(a <= b for a, b in zip(ks[0.3], ks[0.9], strict=True))
    e = summary["adaptive"]["0.9"]
    assert e["tokens"] == sum(ks[0.9]) / len(ks[0.9]) and 0 < e["flops"] < 1.5


def test_paired_statistics_follow_the_outcomes(summary):
    for pair, d in summary["paired"].items():
        a, b = pair.split("|")
        for r, e in d.items():
            if e is None:
                assert summary["accuracy"][b][r] is None
                continue
            ca, cb = summary["correct"][a][r], summary["correct"][b][r]
            assert e["b"] == sum(x == "1" and y == "0" for x, y in zip(ca, cb, strict=True))
            assert e["c"] == sum(x == "0" and y == "1" for x, y in zip(ca, cb, strict=True))
            assert e["p"] == E.S.mcnemar_exact(e["b"], e["c"])
            n = len(ca)
            assert e["diff"] == pytest.approx((e["b"] - e["c"]) / n)
            assert e["ci"][0] <= e["diff"] + 1e-12 and e["diff"] - 1e-12 <= e["ci"][1]


def test_deterministic(model, processor, mapper, eager, samples, raw):
    again = _run(model, processor, mapper, eager, samples[:2], real_path=False)
    for f in ("pred", "keep", "flops"):
        for k, d in again[f].items():
            for r, v in d.items():
                assert v == raw[f][k][r][:2]


def test_shards_merge_into_the_unsharded_run(model, processor, mapper, eager, samples, raw):
    parts = []
    for i in range(2):
        part = _run(model, processor, mapper, eager, samples[i::2], real_path=False)
        part["shard"] = [i, 2]
        parts.append(part)
    merged = E.merge_shards(parts[::-1])
    for f in ("target", "n_visual", "seq_len", "pred", "keep", "flops", "adaptive", "eq_min"):
        assert merged[f] == raw[f], f
    with pytest.raises(ValueError, match=r"shards 0\.\.1"):
        E.merge_shards(parts[:1])
    parts[1]["ratios"] = [1.0]
    with pytest.raises(ValueError, match="differ in 'ratios'"):
        E.merge_shards(parts)


def test_at_least_equal_compute(model, raw, summary):
    """Where the mapper's budget is unreachable, the in-LLM method also runs at one kept token
    (more FLOPs than the mapper's); "given at least the mapper's compute" joins those runs with
    the equal-compute ones and is compared question by question."""
    shape = LMShape.from_config(model.config)
    target = raw["target"]
    seen_unreachable = 0
    for key in raw["eq_keys"]:
        m = key[: -len(E.EQ_SUFFIX)]
        for r in map(str, RATIOS):
            keep, pm, fm = (
                raw["keep"][key][r],
                raw["eq_min"]["pred"][key][r],
                raw["eq_min"]["flops"][key][r],
            )
            joined = []
            for i, (n, nv) in enumerate(zip(raw["seq_len"], raw["n_visual"], strict=True)):
                assert (keep[i] is None) == (pm[i] is not None) == (fm[i] is not None)
                if keep[i] is None:
                    full = prefill_flops(shape, n)
                    want = fastv_flops(shape, n, nv, 1, M.FASTV_LAYERS[m]) / full
                    assert fm[i] == pytest.approx(want)
                    assert fm[i] > raw["flops"]["mapper"][r][i]
                    joined.append(pm[i] == target[i])
                else:
                    joined.append(raw["pred"][key][r][i] == target[i])
            entry = summary["at_least"][key][r]
            unreachable = sum(k is None for k in keep)
            if not unreachable:
                assert entry is None
                continue
            seen_unreachable += 1
            assert entry["unreachable"] == unreachable
            assert entry["acc"] == pytest.approx(sum(joined) / len(joined))
            assert entry["flops"] >= summary["flops"]["mapper"][r]
            ours = [c == "1" for c in summary["correct"]["mapper_spread"][r]]
            pair = summary["paired_at_least"][f"mapper_spread|{key}"][r]
            assert pair["diff"] == pytest.approx((sum(ours) - sum(joined)) / len(joined))
            assert pair["b"] + pair["c"] == sum(a != b for a, b in zip(ours, joined, strict=True))
    assert seen_unreachable > 0  # the tiny 4-layer model cannot run FastV K=2 at the budgets


def test_spread_methods(raw, summary):
    """mapper v2 / attention + spread: the plain method's keep counts and FLOPs to the last bit,
    valid accuracies, the paired comparisons issue 21's targets need, a real-path run each."""
    assert raw["lm_layers"] == 4 and summary["lm_layers"] == 4
    for spread, plain in (("mapper_spread", "mapper"), ("attention_spread", "attention")):
        for r in map(str, RATIOS):
            for f in ("keep", "flops", "overhead"):
                assert raw[f][spread][r] == raw[f][plain][r], (spread, f, r)
            e = summary["accuracy"][spread][r]
            assert 0.0 <= e["ci"][0] <= e["acc"] <= e["ci"][1] <= 1.0
            assert summary["correct"][spread][r] is not None
    for other in ("attention", "divprune", "mapper", "oracle", "fastv_eq", "fastv1_eq"):
        assert set(summary["paired"][f"mapper_spread|{other}"]) == set(map(str, RATIOS))
    assert "attention_spread|attention" in summary["paired"]
    assert set(raw["real_path_mismatches"]) == set(E.OURS)
    assert set(raw["times_s"]["real_prefill"]) == {"none", *E.OURS}


def test_equal_compute_follows_mapper_v2_alone(model, processor, mapper, samples):
    """Without the plain mapper, the equal-compute budget is mapper v2's (the same FLOPs)."""
    methods = ["none", "mapper_spread", "fastv1"]
    assert E.eq_base(methods) == "mapper_spread" and E.eq_keys(methods) == ["fastv1_eq"]
    assert E.eq_base(["none", "mapper", "mapper_spread"]) == "mapper"
    assert E.eq_keys(["none", "attention_spread", "fastv"]) == []
    got = E.run_eval(model, processor, samples[:2], methods=methods, ratios=[0.25],
                     mapper=mapper, thresholds=[], time_samples=0)  # fmt: skip
    for i, k in enumerate(got["keep"]["fastv1_eq"]["0.25"]):
        if k is not None:
            assert got["flops"]["fastv1_eq"]["0.25"][i] <= got["flops"]["mapper_spread"]["0.25"][i]
    with pytest.raises(ValueError, match="'mapper_spread' needs mapper"):
        E.run_eval(model, processor, samples[:1], methods=methods, thresholds=[])


def test_question_types_change_the_test_set():
    """Default: the five default types, the same samples as make_sample without qtypes (the
    test set of earlier reports); named opt-in types change it."""
    default = E.eval_samples(0, 2, [(224, 224), (64, 80)])
    for s in default:
        old = make_sample("test", s.index, 0, s.scene.size)
        assert s.question == old.question and s.image.tobytes() == old.image.tobytes()
    named = E.eval_samples(0, 2, [(224, 224), (64, 80)], QUESTION_TYPES)
    assert [s.question for s in named] == [s.question for s in default]
    extra = E.eval_samples(0, 2, [(224, 224), (64, 80)], ["count_small", "read_glyph"])
    assert [s.question.qtype for s in extra] == ["count_small", "read_glyph"] * 2
    assert [s.index for s in extra] == [s.index for s in default]
    with pytest.raises(ValueError, match="qtypes must be"):
        E.eval_samples(0, 1, [(64, 80)], ["bogus"])


def test_cli_opt_in_question_types_and_depth(tmp_path, mapper, capsys):
    """--question-types with a model directory whose vocabulary has the opt-in words, a 3-layer
    model: the test set, its record, the depth-aware labels and the targets paragraph; a
    tokenizer without those words is refused."""
    from tokenprune_kernels.grounded.model import build_processor

    mdir = save_model_dir(build_model(build_config(num_layers=3), seed=5), build_processor(),
                          tmp_path / "m")  # fmt: skip
    save_mapper(mapper, tmp_path / "mapper.safetensors")
    out = tmp_path / "q"
    types = "count_small,read_glyph"
    argv = [
        "--model-dir", str(mdir), "--mapper", str(tmp_path / "mapper.safetensors"),
        "--methods", "mapper", "attention", "mapper_spread", "divprune", "fastv",
        "--ratios", "1", "0.125", "0.0625", "0.03125", "--n-per-size", "1", "--thresholds",
        "--bootstrap", "20", "--time-samples", "0", "--no-real-path", "--question-types", types,
    ]  # fmt: skip
    assert E.main([*argv, "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["test_set"]["question_types"] == ["count_small", "read_glyph"]
    samples = E.eval_samples(0, 1, E.SIZE_SETS["train"], ["count_small", "read_glyph"])
    assert saved["target"] == [TOKEN_ID[s.question.answer] for s in samples]
    assert saved["lm_layers"] == 3
    text = out.with_suffix(".md").read_text()
    assert "question types count_small, read_glyph" in text
    assert "| FastV-like (K=2 of 3 layers, in-LLM) |" in text
    assert "FastV K=2 prunes after 2 of 3 layers (67% of depth)" in text
    assert "## Targets (issue 21)" in text and "- mapper_spread at 12.5%" in text
    assert "- mapper_spread vs divprune at 3.125%" in text
    if (MODEL_DIR / "tokenizer.json").is_file():  # the shipped tokenizer predates these words
        assert E.main([*argv[2:], "--out", str(out)]) == 2
        assert "does not know the words" in capsys.readouterr().err
    parser = __import__("argparse").ArgumentParser()
    E.add_eval_parser(parser.add_subparsers())
    assert parser.parse_args(["eval", "--out", "x"]).question_types == list(QUESTION_TYPES)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--out", "x", "--question-types", "left_of,bogus"])


def test_pruned_predictions_differ_between_methods(raw):
    """At 25% the methods do not all see the same tokens (so they are not all the same run)."""
    runs = {m: tuple(raw["pred"][m]["0.25"]) for m in E.DEFAULT_METHODS}
    assert len(set(runs.values())) > 1


def test_eval_samples():
    a = E.eval_samples(4, 2, [(224, 224), (64, 80)])
    assert [s.index for s in a] == [0, 1, 28, 29]  # 13 test sizes: (64, 80) gets k = 13 + 1 = 14
    assert [s.scene.size for s in a] == [(224, 224)] * 2 + [(64, 80)] * 2
    b = E.eval_samples(5, 2, [(224, 224)])
    assert a[0].question.text != b[0].question.text or a[0].scene != b[0].scene
    assert [s.question.text for s in E.eval_samples(4, 2, [(224, 224)])] == [
        s.question.text for s in a[:2]
    ]
    with pytest.raises(ValueError, match="n_per_size"):
        E.eval_samples(0, 0, SIZES)
    with pytest.raises(ValueError, match="size must be"):
        E.eval_samples(0, 1, [(65, 80)])


def test_run_eval_errors(model, processor, samples):
    s = samples[:1]
    with pytest.raises(ValueError, match="must include 'none'"):
        E.run_eval(model, processor, s, methods=["random"], thresholds=[])
    with pytest.raises(ValueError, match="methods must be"):
        E.run_eval(model, processor, s, methods=["none", "bogus"], thresholds=[])
    with pytest.raises(ValueError, match="ratios must be"):
        E.run_eval(model, processor, s, methods=["none"], ratios=[0.0], thresholds=[])
    with pytest.raises(ValueError, match="need 'mapper'"):
        E.run_eval(model, processor, s, methods=["none"], thresholds=[0.5])
    with pytest.raises(ValueError, match="thresholds must be"):
        E.run_eval(model, processor, s, methods=["none", "mapper"], thresholds=[1.5])
    with pytest.raises(ValueError, match="needs mapper"):
        E.run_eval(model, processor, s, methods=["none", "mapper"])
    with pytest.raises(ValueError, match="needs label_model"):
        E.run_eval(model, processor, s, methods=["none", "oracle"], thresholds=[])
    with pytest.raises(ValueError, match="samples must"):
        E.run_eval(model, processor, [], methods=["none"], thresholds=[])


def test_adaptive_counts():
    # softmax probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary)
    logits = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))
    assert E.adaptive_counts(logits, 0.5, 0.25, 1.0).tolist() == [1]
    assert E.adaptive_counts(logits, 0.75, 0.25, 1.0).tolist() == [2]
    assert E.adaptive_counts(logits, 0.76, 0.25, 1.0).tolist() == [3]
    assert E.adaptive_counts(logits, 1.0, 0.25, 1.0).tolist() == [4]
    assert E.adaptive_counts(logits, 0.5, 0.5, 1.0).tolist() == [2]  # min ratio: 2 of 4
    assert E.adaptive_counts(logits, 1.0, 0.25, 0.5).tolist() == [2]  # max ratio: 2 of 4
    batch = torch.stack([logits, torch.zeros(4)])  # the second one uniform: 1/4 each
    assert E.adaptive_counts(batch, 0.75, 0.25, 1.0).tolist() == [2, 3]
    for bad, match in (((logits, 0.0, 0.25, 1.0), "threshold"), ((logits, 0.5, 0.6, 0.5), "min_ratio"),
                       ((logits[None, None], 0.5, 0.25, 1.0), "logits")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            E.adaptive_counts(*bad)


def _summary_for_targets(diff_att, p_att):
    pair = {
        "diff": diff_att,
        "ci": [diff_att - 0.02, diff_att + 0.02],
        "b": 30,
        "c": 10,
        "p": p_att,
    }
    acc = {"acc": 0.9, "ci": [0.88, 0.92], "rel": 0.985, "rel_ci": [0.97, 1.0]}
    return {
        "paired": {
            "mapper|attention": {"0.0625": pair, "0.03125": pair},
            "mapper|fastv_eq": {"0.0625": None, "0.03125": None},
            "mapper|oracle": {"0.0625": {**pair, "diff": -0.05}},
        },
        "min_flops": {"fastv": 0.52},
        "flops": {"mapper": {"0.0625": 0.2, "0.03125": 0.17}},
        "accuracy": {"mapper": {"0.125": acc}},
    }


def pair_v2():
    return {"diff": 0.04, "ci": [0.02, 0.06], "b": 30, "c": 10, "p": 0.001}


def _summary_for_v2(closed):
    """mapper v2 at 3.125%: plain mapper 80%, oracle 90%, v2 at 80% + ``closed`` points."""
    pair = {"diff": 0.04, "ci": [0.02, 0.06], "b": 30, "c": 10, "p": 0.001}
    r = "0.03125"

    def acc(a):
        return {"acc": a, "ci": [a - 0.02, a + 0.02], "rel": a / 0.92, "rel_ci": [0.9, 1.0]}

    return {
        "n": 1503,
        "lm_layers": 14,
        "paired": {
            "mapper_spread|attention": {"0.0625": pair, r: pair},
            "mapper_spread|divprune": {"0.0625": {**pair, "p": 0.3}, r: pair},
            "mapper_spread|fastv1_eq": {"0.0625": pair, r: None},
            "mapper_spread|mapper": {r: {**pair, "diff": closed}},
        },
        "reachable": {"fastv1_eq": {r: 1400}},
        "min_flops": {"fastv1": 0.3},
        "flops": {"mapper_spread": {"0.0625": 0.2, r: 0.17}},
        "accuracy": {
            "mapper": {r: acc(0.8)},
            "oracle": {r: acc(0.9)},
            "mapper_spread": {r: acc(0.8 + closed), "0.125": acc(0.91)},
        },
    }


def test_targets_of_mapper_v2():
    met = E.targets(_summary_for_v2(0.06))
    assert E.targets(_summary_for_v2(0.06), "mapper_spread") == met
    line = next(x for x in met if x.startswith("- mapper_spread vs attention at 3.125%"))
    assert "+4.0 points [2.0, 6.0], McNemar p = 0.001" in line and line.endswith(": MET")
    line = next(x for x in met if x.startswith("- mapper_spread vs divprune at 6.250%"))
    assert line.endswith("NOT MET")  # p = 0.3
    line = next(x for x in met if "fastv1_eq at 3.125%" in x)
    assert "K=1 of 14 layers" in line and "on 103/1503 samples" in line and "30.0%" in line
    assert "unreachable" in line
    assert not any("given at least" in x for x in met)  # no runs at the minimum: no line
    v2 = _summary_for_v2(0.06)
    v2["at_least"] = {"fastv1_eq": {"0.03125": {"unreachable": 103, "flops": 0.18}}}
    v2["paired_at_least"] = {"mapper_spread|fastv1_eq": {"0.03125": {**pair_v2(), "p": 0.01}}}
    line = next(x for x in E.targets(v2) if "given at least" in x)
    assert "on the 103 samples above" in line and "mean FLOPs 18.0% vs the mapper's 17.0%" in line
    assert "+4.0 points [2.0, 6.0], McNemar p = 0.01" in line and line.endswith(": MET")
    v2["paired_at_least"]["mapper_spread|fastv1_eq"]["0.03125"]["p"] = 0.2
    assert next(x for x in E.targets(v2) if "given at least" in x).endswith("NOT MET")
    gap = next(x for x in met if "oracle labels 90.0%" in x)
    assert "plain mapper 80.0%" in gap and "86.0%" in gap and "60% of the gap closed" in gap
    assert gap.endswith("at least half: MET")
    gap = next(x for x in E.targets(_summary_for_v2(0.04)) if "of the gap closed" in x)
    assert "40% of the gap closed" in gap and gap.endswith("NOT MET")
    line = next(x for x in met if "at 12.5% keeps" in x)
    assert line.startswith("- mapper_spread at 12.5% keeps 98.9%") and line.endswith(": MET")


def test_targets():
    met = E.targets(_summary_for_targets(0.04, 0.001))
    line = next(x for x in met if "mapper vs attention at 6.250%" in x)
    assert "+4.0 points [2.0, 6.0]" in line and line.endswith(": MET"), line
    assert any("fastv_eq at 3.125%" in x and "unreachable" in x and "52.0%" in x for x in met)
    assert any("oracle labels at 6.250%: -5.0 points" in x for x in met)
    assert any("mapper at 12.5% keeps 98.5%" in x and x.endswith(": MET") for x in met)
    # ahead but not significant, or behind: not met
    for diff, p in ((0.04, 0.2), (-0.04, 0.001)):
        line = next(x for x in E.targets(_summary_for_targets(diff, p)) if "attention at 6.25" in x)
        assert line.endswith("NOT MET"), line


def test_report_and_plot(raw, summary, tmp_path):
    raw = {**raw, "test_set": {"seed": 0, "n_per_size": N_PER_SIZE, "sizes": SIZES}}
    text = E.format_report(summary, raw, {"title": "t", "commit": "abc"}, "tokenprune eval x")
    assert "| mapper (ours) |" in text and "- commit: abc" in text
    assert "`tokenprune eval x`" in text and "chance level" in text
    assert "## LLM prefill FLOPs" in text and "## Paired comparisons" in text
    assert "## Equal LLM compute" in text and "## Adaptive mapper" in text
    assert abs(E.chance_accuracy() - (1 / 6 + 1 / 4 + 1 / 4 + 1 / 2 + 1 / 6) / 5) < 1e-12
    for m in [*E.DEFAULT_METHODS, *raw["eq_keys"]]:
        assert f"| {E.method_label(m, 4)} |" in text
    assert "| FastV-like (K=2 of 4 layers, in-LLM) |" in text
    assert "FastV K=1 prunes after 1 of 4 layers (25% of depth)" in text
    pytest.importorskip("matplotlib")
    assert E.plot(summary, raw, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_report_splits_accuracy_by_question_type(raw, summary):
    """With several question types the report adds one table per type, computed from the
    ordered 0/1 record (scene i has type i mod count); a single type gets no such section."""
    qtypes = ["count_small", "read_glyph"]
    ts = {"seed": 0, "n_per_size": N_PER_SIZE, "sizes": SIZES, "question_types": qtypes}
    text = E.format_report(summary, {**raw, "test_set": ts}, {"title": "t"}, "x")
    assert "## Accuracy by question type (%) [Wilson 95%]" in text
    n = summary["n"]
    r = str(raw["ratios"][-1])
    for t, qtype in enumerate(qtypes):
        bits = summary["correct"]["mapper"][r][t::2]
        assert len(bits) == len(range(t, n, 2))
        block = text.split(f"**{qtype}** ({len(bits)} questions)")[1].split("\n\n**")[0]
        row = next(x for x in block.splitlines() if x.startswith("| mapper (ours) |"))
        want = 100 * bits.count("1") / len(bits)
        assert row.split(" | ")[-1].startswith(f"{want:.1f} ["), (row, want)
    one = {**ts, "question_types": ["read_glyph"]}
    assert "by question type" not in E.format_report(summary, {**raw, "test_set": one}, {}, "x")


def test_cli_writes_outputs_and_merges_shards(tmp_path, model, processor, mapper, capsys):
    mdir = save_model_dir(model, processor, tmp_path / "m")
    save_mapper(mapper, tmp_path / "mapper.safetensors")
    out = tmp_path / "res" / "g"
    argv = [
        "--model-dir", str(mdir), "--mapper", str(tmp_path / "mapper.safetensors"),
        "--methods", "none", "mapper", "uniform", "fastv", "--ratios", "1", "0.25",
        "--n-per-size", "1", "--sizes", "train", "--thresholds", "0.5", "--bootstrap", "50",
        "--time-samples", "1",
    ]  # fmt: skip
    assert E.main([*argv, "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["summary"]["n"] == 9 and saved["real_path_mismatches"] == {"mapper": 0}
    assert "pred" not in saved and len(saved["predictions_sha256"]) == 64
    assert saved["command"].startswith("tokenprune eval --model-dir")
    assert "commit" in saved["header"] and "transformers" in saved["header"]
    assert saved["test_set"]["n_per_size"] == 1
    assert out.with_suffix(".md").read_text().startswith("# Grounded-VQA")
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, s in enumerate(shards):
        assert E.main([*argv, "--shard", f"{i}/2", "--out", str(s)]) == 0
    merged = tmp_path / "merged"
    files = [str(s.with_suffix(".json")) for s in shards]
    assert E.main(["--merge", *files, "--bootstrap", "50", "--out", str(merged)]) == 0
    again = json.loads(merged.with_suffix(".json").read_text())
    assert again["predictions_sha256"] == saved["predictions_sha256"]
    assert again["summary"]["accuracy"] == saved["summary"]["accuracy"]
    assert E.main([*argv[:2], "--methods", "none", "--out", str(out), "--threads", "0"]) == 2
    assert E.main(["--merge", files[0], "--out", str(out)]) == 2
    assert E.main(["--model-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "holds no model" in capsys.readouterr().err


def test_eval_parser_registers():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    E.add_eval_parser(sub)
    args = parser.parse_args(
        ["eval", "--out", "x", "--sizes", "large", "--seed", "4", "--shard", "1/2"]
    )
    assert args.func is E.cmd_eval and args.sizes == "large" and args.seed == 4
    assert args.shard == (1, 2) and args.n_per_size == E.DEFAULT_N_PER_SIZE
    assert args.ratios == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--out", "x", "--shard", "2/2"])


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
    asked = []

    def fake(split, i, seed, qtypes):
        asked.append(tuple(qtypes))
        s = real(split, i, seed, (64, 64), qtypes=qtypes)
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
    assert set(asked) == {tuple(QUESTION_TYPES)}
    with pytest.raises(ValueError, match="n must be"):
        LP.make_labels(eager, processor, tmp_path / "labels", 0)
    # Another range and the opt-in types: its own summary file, the types reach make_sample.
    more = LP.make_labels(
        eager, processor, tmp_path / "labels", 2, start=3, qtypes=["read_glyph"], metadata={"m": 1}
    )
    assert more["seen"] == 2 and asked[-2:] == [("read_glyph",)] * 2
    assert (tmp_path / "labels" / "summary-3.json").exists()
    assert len(read_labels(tmp_path / "labels")) == 5
    with pytest.raises(ValueError, match="qtypes must be"):
        LP.make_labels(eager, processor, tmp_path / "labels", 1, qtypes=["nope"])


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
