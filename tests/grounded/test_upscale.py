"""Depth up-scaling (benchmarks/grounded/upscale.py): the deeper model computes exactly what the
source did, its trained layers sit where layer_placement says, new layers are zero-output
blocks, and ``--init-from`` trains from it."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from benchmarks.grounded import loop
from benchmarks.grounded import train as T
from benchmarks.grounded.upscale import ZEROED, check_placement, depth_upscaled, layer_placement
from tokenprune_kernels.grounded import model as M
from tokenprune_kernels.grounded import scenes as S

TINY = dict(vision_dim=16, vision_heads=2, hidden_size=32, intermediate_size=48, num_heads=4)


def test_layer_placement():
    assert layer_placement(4, 14) == [0, 4, 9, 13]
    assert layer_placement(4, 4) == [0, 1, 2, 3]
    assert layer_placement(1, 5) == [0]
    assert layer_placement(3, 12) == [0, 6, 11]
    for old in range(1, 8):
        for new in range(old, 30):
            p = layer_placement(old, new)
            assert p[0] == 0 and p == sorted(set(p)) and len(p) == old
            assert old == 1 or p[-1] == new - 1
    with pytest.raises(ValueError, match="old=5, new=4"):
        layer_placement(5, 4)
    with pytest.raises(ValueError, match="old=0"):
        layer_placement(0, 4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "model"
    model = M.build_model(M.build_config(**TINY, num_layers=3), seed=5)
    with torch.no_grad():  # a trained-looking source: no zero output projections anywhere
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    M.save_model_dir(model, M.build_processor(), path)
    return path


def test_deeper_model_computes_the_source(source):
    old, processor = M.load_model_dir(source)
    new, _, placement = depth_upscaled(source, 7, seed=3)
    assert placement == [0, 3, 6] and new.config.text_config.num_hidden_layers == 7
    assert len(new.config.text_config.layer_types) == 7
    old_layers = old.model.language_model.layers
    new_layers = new.model.language_model.layers
    for i, j in enumerate(placement):
        a, b = old_layers[i].state_dict(), new_layers[j].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    for j in set(range(7)) - set(placement):
        sd = new_layers[j].state_dict()
        for k, v in sd.items():  # fresh weights (biases start at 0), zero output projections
            if v.dim() >= 2:
                assert bool(v.abs().sum() == 0) == (k in ZEROED), k
        assert all(k in sd for k in ZEROED)
    samples = [S.make_sample("test", 5, 0, (64, 80)), S.make_sample("test", 6, 0, (80, 64))]
    inputs = M.build_inputs(
        processor, [s.image for s in samples], [s.question.text for s in samples]
    )
    with torch.no_grad():
        want = old(**inputs).logits
        got = new(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    other, _, _ = depth_upscaled(source, 7, seed=4)  # the seed draws the new layers
    assert not torch.equal(
        other.model.language_model.layers[1].self_attn.q_proj.weight,
        new_layers[1].self_attn.q_proj.weight,
    )


def test_chosen_placement(source, capsys):
    """A chosen placement (the source's first layers kept first, so that FastV-like pruning
    after layer 1 reads a trained layer's attention) computes the source too."""
    assert check_placement((0, 1, 5), 3, 7) == [0, 1, 5]
    for bad in ((0, 1), (0, 0, 3), (1, 0, 3), (0, 1, 7), (-1, 1, 3)):
        with pytest.raises(ValueError, match="strictly increasing layer indices in"):
            check_placement(bad, 3, 7)
    old, processor = M.load_model_dir(source)
    new, _, placement = depth_upscaled(source, 7, seed=3, placement=[0, 1, 5])
    assert placement == [0, 1, 5]
    a = old.model.language_model.layers[2].state_dict()
    b = new.model.language_model.layers[5].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = S.make_sample("test", 7, 0, (80, 64))
    inputs = M.build_inputs(processor, [s.image], [s.question.text])
    with torch.no_grad():
        torch.testing.assert_close(new(**inputs).logits, old(**inputs).logits, rtol=0, atol=1e-6)
    args = T.parse_args(["--out", "x", "--init-from", str(source), "--layers", "7",
                         "--init-placement", "0,1,5"])  # fmt: skip
    assert args.init_placement == [0, 1, 5]
    for extra in (["--init-from", str(source), "--layers", "7", "--init-placement", "0,2"],
                  ["--init-placement", "0,1,5"]):  # fmt: skip
        with pytest.raises(SystemExit):
            T.parse_args(["--out", "x", *extra])
    err = capsys.readouterr().err
    assert (
        "--init-placement: placement must be 3" in err
        and "--init-placement needs --init-from" in err
    )


def test_shallower_target_is_refused(source):
    with pytest.raises(ValueError, match="old=3, new=2"):
        depth_upscaled(source, 2)


def test_init_from_trains(source, tmp_path, capsys):
    args = T.parse_args(
        ["--out", str(tmp_path / "run"), "--init-from", str(source), "--layers", "5",
         "--images", "2", "--questions", "2", "--sizes", "64x80", "--warm", "0",
         "--steps", "2", "--log-every", "1", "--val-per-size", "0", "--test-per-size", "0"]
    )  # fmt: skip
    log = loop.train(args, "test")
    assert log["init_from"] == {"model": str(source), "placement": [0, 2, 4]}
    saved = json.loads((tmp_path / "run" / loop.LOG_FILE).read_text())
    assert saved["init_from"]["placement"] == [0, 2, 4]
    model, _ = M.load_model_dir(tmp_path / "run" / "model")
    assert model.config.text_config.num_hidden_layers == 5
    assert model.config.text_config.hidden_size == 32  # the source's, not the option default
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", "--init-from", str(source), "--layers", "2"])
    assert "must be >= the --init-from model's 3 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "x", "--init-from", str(tmp_path / "none")])
    assert "--init-from must be a model directory" in capsys.readouterr().err


def test_update_ratios_and_without_layers(source):
    """New layers of an unfine-tuned up-scaled model add exactly nothing; removing trained
    layers changes the output; the model passed in is left as it was."""
    from benchmarks.grounded.layer_use import update_ratios, without_layers

    model, processor, placement = depth_upscaled(source, 6, seed=1)
    samples = [S.make_sample("test", 2, 0, (64, 80))]
    inputs = M.build_inputs(processor, [samples[0].image], [samples[0].question.text])
    ratios = update_ratios(model, inputs)
    assert len(ratios) == 6
    assert all((r == 0.0) == (i not in placement) for i, r in enumerate(ratios)), ratios
    new = [i for i in range(6) if i not in placement]
    with torch.no_grad():
        base = model(**inputs).logits
        same = without_layers(model, new)(**inputs).logits
        cut = without_layers(model, [placement[1]])(**inputs).logits
    assert torch.equal(same, base)
    assert not torch.allclose(cut, base)
    assert update_ratios(model, inputs) == ratios  # the copy, not the model, was changed


def test_layer_use_cli(source, tmp_path):
    from benchmarks.grounded import layer_use

    args = T.parse_args(
        ["--out", str(tmp_path / "run"), "--init-from", str(source), "--layers", "4",
         "--images", "2", "--questions", "2", "--sizes", "64x80", "--warm", "0",
         "--steps", "1", "--val-per-size", "0", "--test-per-size", "0",
         "--question-types", "extreme,read_glyph"]
    )  # fmt: skip
    loop.train(args, "test")
    out = tmp_path / "use.json"
    assert (
        layer_use.main(["--run", str(tmp_path / "run"), "--out", str(out), "--n-per-size", "1"])
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n"] == len(S.SPLIT_SIZES["test"]) and res["placement"] == [0, 2, 3]
    assert set(res["by_type"]) == {"extreme", "read_glyph"}
    assert sum(v["n"] for v in res["by_type"].values()) == res["n"]
    assert [u["new"] for u in res["update_ratio"]] == [False, True, False, False]
    assert 0.0 <= res["mcnemar_p"] <= 1.0 and res["commit"]
    with pytest.raises(SystemExit):
        layer_use.main(["--run", str(source.parent), "--out", str(out)])


def test_committed_deep_model():
    """The 14-layer model of benchmarks/results/grounded14_eval.md: loadable, 14 layers, the
    recorded placement, a mapper that loads."""
    from pathlib import Path

    from tokenprune_kernels.mapper import load_mapper

    d = Path(__file__).resolve().parents[2] / "benchmarks" / "grounded" / "models" / "grounded14up"
    model, _ = M.load_model_dir(d / "model")
    assert model.config.text_config.num_hidden_layers == 14
    log = json.loads((d / "train_log.json").read_text())
    assert log["init_from"]["placement"] == [0, 1, 7, 13] == log["args"]["init_placement"]
    assert log["test"]["n"] == 260
    load_mapper(d / "mapper.safetensors")
    import hashlib

    results = d.parents[2] / "results"
    header = json.loads((results / "grounded14_eval.json").read_text())["header"]
    for key, f in (("model_sha256", d / "model" / "model.safetensors"),
                   ("mapper_sha256", d / "mapper.safetensors")):  # fmt: skip
        assert header[key] == hashlib.sha256(f.read_bytes()).hexdigest(), key
    # the narrow mapper chosen on validation (grounded14_mapper_width.json) and its evaluation
    narrow = load_mapper(d / "mapper_narrow.safetensors")
    assert narrow.config.channels == (8, 16, 32, 64) and narrow.config.kernel_size == 5
    header = json.loads((results / "grounded14_narrow_eval.json").read_text())["header"]
    for key, f in (("model_sha256", d / "model" / "model.safetensors"),
                   ("mapper_sha256", d / "mapper_narrow.safetensors")):  # fmt: skip
        assert header[key] == hashlib.sha256(f.read_bytes()).hexdigest(), key
    width = json.loads((results / "grounded14_mapper_width.json").read_text())
    assert width["mappers"]["e80_8_16_32_64"]["channels"] == [8, 16, 32, 64]
    assert width["mappers"]["e80_8_16_32_64"]["parameters"] == sum(
        t.numel() for t in narrow.parameters()
    )


def test_committed_narrow_mapper_of_the_shipped_model():
    """benchmarks/grounded/models/grounded4_narrow: the mapper of grounded_narrow_eval.md, chosen
    in grounded_mapper_width.json, evaluated on the shipped model."""
    import hashlib
    from pathlib import Path

    from tokenprune_kernels.grounded.model import MODEL_DIR
    from tokenprune_kernels.mapper import load_mapper

    root = Path(__file__).resolve().parents[2]
    path = (
        root
        / "benchmarks"
        / "grounded"
        / "models"
        / "grounded4_narrow"
        / "mapper_narrow.safetensors"
    )
    narrow = load_mapper(path)
    assert narrow.config.channels == (8, 16, 32, 64)
    results = root / "benchmarks" / "results"
    header = json.loads((results / "grounded_narrow_eval.json").read_text())["header"]
    for key, f in (("model_sha256", MODEL_DIR / "model.safetensors"), ("mapper_sha256", path)):
        assert header[key] == hashlib.sha256(f.read_bytes()).hexdigest(), key
    width = json.loads((results / "grounded_mapper_width.json").read_text())
    assert width["mappers"]["e80_8_16_32_64"]["channels"] == [8, 16, 32, 64]
