"""Label recall of the selection rules (benchmarks/mapper_v2/selection.py) against a separate
computation on one validation scene of the shipped model, and ``evaluate.kept_recall``'s checks."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from benchmarks.mapper_v2 import selection as S
from benchmarks.mapper_v2.evaluate import kept_recall, recall
from tokenprune_kernels.grounded.labels_pipeline import label_grounded_sample
from tokenprune_kernels.grounded.methods import (
    grid_coords,
    keep_count,
    prepare,
    select_divprune,
    select_layer0,
)
from tokenprune_kernels.grounded.model import ASSETS_DIR, build_inputs, load_grounded_model
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import load_mapper
from tokenprune_kernels.reference import spread_select_ref

SCENE = 0  # a validation scene the shipped model answers right (checked below)


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_grounded_model()
    labeller, _ = load_grounded_model(attn_implementation="eager")
    return model.eval(), labeller.eval(), processor, load_mapper(ASSETS_DIR / "mapper.safetensors")


@pytest.fixture(scope="module")
def outcome(shipped):
    return S.scene_outcomes(*shipped, SCENE)


def _label_top(label: torch.Tensor, k: int) -> set[int]:
    """The label's k highest, ties to the lower index, by a plain Python sort."""
    values = label.tolist()
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def test_recall_matches_a_separate_computation(shipped, outcome):
    model, labeller, processor, mapper = shipped
    sample = make_sample("val", SCENE, S.SEED)
    _, _, record = label_grounded_sample(labeller, processor, sample)
    assert record is not None and outcome["labelled"]
    label = record.label
    with torch.no_grad():
        prep = prepare(model, build_inputs(processor, [sample.image], [sample.question.text]))
        scores = select_layer0(model, prep, 1, mapper)[1]
    n = prep.n_visual
    assert label.numel() == n
    positions = prep.visual_positions.tolist()
    seen = set()
    for r in S.RATIOS:
        k = keep_count(n, r)
        want = _label_top(label, k)
        s = scores.tolist()
        kept = {
            "top": set(sorted(range(n), key=lambda i: (-s[i], i))[:k]),
            "spread1": set(
                spread_select_ref(
                    scores, torch.tensor([0, n]), torch.tensor([k]), grid_coords(prep.grid), 1
                )[0].tolist()
            ),
            "divprune": {positions.index(p) for p in select_divprune(prep, k).tolist()},
        }
        for name, idx in kept.items():
            assert len(idx) == k
            got = outcome["recall"][name][str(r)]
            assert got == len(idx & want) / k, (name, r)
            seen.add(got)
        # the score rule's recall is evaluate.py's recall of those scores
        assert outcome["recall"]["top"][str(r)] == recall(scores, label, r)
    assert len(seen) > 1  # the rules' recalls differ on this scene: not a constant
    assert set(outcome["recall"]) == set(outcome["correct"])  # every rule, every ratio


def test_main_writes_recall_beside_accuracy(shipped, outcome, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sel.json"
    monkeypatch.setattr(sys, "argv", ["selection", "--n", "1", "--out", str(out)])
    assert S.main() == 0
    summary = json.loads(out.read_text())
    assert summary["labelled"] == 1
    for key in ("accuracy", "mcnemar_p", "unpruned_accuracy"):
        assert key in summary
    assert summary["recall"] == outcome["recall"]
    assert summary["accuracy"] == {
        m: {r: float(ok) for r, ok in by.items()} for m, by in outcome["correct"].items()
    }
    assert "label recall" in capsys.readouterr().out


def test_kept_recall_counts_and_checks():
    label = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.0, 0.2, 0.3, 0.4])  # n = 8
    # ratio 0.5: k = 4, label top-4 = {1, 2, 3, 7} (the tie 2/3 both in)
    assert kept_recall(torch.tensor([1, 2, 0, 4]), label, 0.5) == 0.5
    assert kept_recall(torch.tensor([7, 3, 2, 1]), label, 0.5) == 1.0
    # ratio 0.125: k = 1, label top-1 = {1}
    assert kept_recall(torch.tensor([2]), label, 0.125) == 0.0
    # ties break to the lower index: label top-1 of [1, 1] is index 0
    assert kept_recall(torch.tensor([0]), torch.ones(2), 0.5) == 1.0
    assert kept_recall(torch.tensor([1]), torch.ones(2), 0.5) == 0.0
    with pytest.raises(ValueError, match="kept must be"):
        kept_recall(torch.tensor([1, 2, 3]), label, 0.5)
    with pytest.raises(ValueError, match="kept must be"):
        kept_recall(torch.tensor([1.0, 2.0, 3.0, 4.0]), label, 0.5)
    with pytest.raises(ValueError, match="distinct"):
        kept_recall(torch.tensor([1, 1, 2, 3]), label, 0.5)
    with pytest.raises(ValueError, match="distinct"):
        kept_recall(torch.tensor([1, 2, 3, 8]), label, 0.5)
    with pytest.raises(ValueError, match="label must be"):
        kept_recall(torch.tensor([0]), label[None], 0.5)
