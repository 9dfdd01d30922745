"""``tokenprune demo`` on a tiny randomly initialised model and a random mapper saved to a tmp
dir: the command end to end (report, PNG, JSON), its kept tokens against methods.select, and
its argument errors. No answer is asserted (the model is random)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenprune_kernels import cli
from tokenprune_kernels.grounded import demo as D
from tokenprune_kernels.grounded import methods as M
from tokenprune_kernels.grounded.model import (
    build_inputs,
    build_model,
    build_processor,
    load_model_dir,
    save_model_dir,
)
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper
from tokenprune_kernels.transformers import is_tokenprune_applied

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRINTED = (
    "question",
    "true answer",
    "no pruning",
    "pruned",
    "visual tokens",
    "LLM input length",
    "prefill ms",
    "generate ms",
    "threads",
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random model directory and a random mapper file."""
    root = tmp_path_factory.mktemp("demo_assets")
    save_model_dir(build_model(seed=3), build_processor(), root / "model")
    torch.manual_seed(4)
    m = TokenMapper(MapperConfig(channels=(8, 16), kernel_size=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_mapper(m, root / "mapper.safetensors")
    return root


@pytest.fixture(scope="module")
def loaded(assets):
    return load_model_dir(assets / "model")


def _expected_kept(model, processor, method, mapper, split, index, seed, size, ratio, qtype=None):
    sample = make_sample(split, index, seed, size, qtype)
    inputs = build_inputs(processor, [sample.image], [sample.question.text])
    prep = M.prepare(model, inputs)
    return M.select(method, model, prep, ratio, mapper=mapper), prep.n_visual


def _check_json(r, n_v, ratio):
    k = M.keep_count(n_v, ratio)
    assert r["visual_tokens_before"] == n_v
    assert r["visual_tokens_after"] == k == len(r["kept_positions"]) == len(r["kept_visual_index"])
    assert r["llm_input_after"] == r["llm_input_before"] - (n_v - k)
    assert r["harness_match"] is True
    gh, gw = r["grid"]
    assert gh * gw == n_v == len(r["scores"])
    idx = r["kept_visual_index"]
    assert idx == sorted(set(idx)) and idx[0] >= 0 and idx[-1] < n_v
    # the kept tokens are the top-k of the plotted scores
    scores = torch.tensor(r["scores"])
    kth = torch.topk(scores, k).values[-1]
    assert bool((scores[idx] >= kth).all())
    for key in ("prefill_ms_full", "prefill_ms_pruned", "generate_ms_full", "generate_ms_pruned"):
        assert r[key] > 0
    assert r["threads"] == 1
    assert r["correct_full"] == (r["answer_full"] == r["true_answer"])
    assert r["correct_pruned"] == (r["answer_pruned"] == r["true_answer"])


def test_demo_with_mapper_end_to_end(assets, loaded, tmp_path, capsys):
    from tokenprune_kernels.mapper import load_mapper

    png, js = tmp_path / "d" / "demo.png", tmp_path / "demo.json"
    ratio, size = 0.3, (64, 80)
    rc = D.main(
        ["--model", str(assets / "model"), "--mapper", str(assets / "mapper.safetensors"),
         "--keep-ratio", str(ratio), "--split", "val", "--index", "7", "--seed", "2",
         "--size", "64x80", "--repeats", "1", "--out", str(png), "--json", str(js)]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    for field in PRINTED:
        assert field in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    r = json.loads(js.read_text())
    assert r["method"] == "mapper" and r["split"] == "val" and r["index"] == 7
    assert r["size"] == [64, 80] and r["keep_ratio"] == ratio
    assert r["question"] in out and r["true_answer"] in out
    assert f"{r['visual_tokens_before']} -> {r['visual_tokens_after']}" in out
    assert f"{r['llm_input_before']} -> {r['llm_input_after']}" in out
    model, processor = loaded
    mapper = load_mapper(assets / "mapper.safetensors")
    kept, n_v = _expected_kept(model, processor, "mapper", mapper, "val", 7, 2, size, ratio)
    _check_json(r, n_v, ratio)
    assert r["kept_positions"] == kept.tolist()


def test_demo_no_mapper_through_cli(assets, loaded, tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    ratio, size = 0.125, (96, 64)
    rc = cli.main(
        ["demo", "--model", str(assets / "model"), "--no-mapper", "--keep-ratio", str(ratio),
         "--index", "4", "--size", "96x64", "--question-type", "count_colour", "--repeats", "2",
         "--out", str(png), "--json", str(js)]
    )  # fmt: skip
    assert rc == 0
    assert "layer-0 attention" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    r = json.loads(js.read_text())
    assert r["method"] == "attention" and r["mapper"] is None
    assert r["question_type"] == "count_colour" and r["repeats"] == 2
    assert r["command"].startswith("tokenprune demo --model")
    model, processor = loaded
    kept, n_v = _expected_kept(
        model, processor, "attention", None, "test", 4, 0, size, ratio, "count_colour"
    )
    _check_json(r, n_v, ratio)
    assert r["kept_positions"] == kept.tolist()


def test_run_demo_leaves_model_unpatched(loaded):
    model, processor = loaded
    sample = make_sample("test", 1, 5, (64, 64))
    r = D.run_demo(model, processor, sample, keep_ratio=1.0, repeats=1)
    assert not is_tokenprune_applied(model)
    # keep ratio 1: every token kept, the same answer and input length
    assert r["visual_tokens_after"] == r["visual_tokens_before"] == 16
    assert r["llm_input_after"] == r["llm_input_before"]
    assert r["answer_pruned"] == r["answer_full"]
    with pytest.raises(ValueError, match="keep_ratio"):
        D.run_demo(model, processor, sample, keep_ratio=0.0, repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        D.run_demo(model, processor, sample, repeats=0)
    assert not is_tokenprune_applied(model)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--keep-ratio", "0"], "--keep-ratio"),
        (["--keep-ratio", "1.5"], "--keep-ratio"),
        (["--keep-ratio", "nan"], "--keep-ratio"),
        (["--size", "65x80"], "--size"),
        (["--size", "64"], "--size"),
        (["--size", "48x64"], "--size"),
        (["--index", "-1"], "--index"),
        (["--threads", "0"], "--threads"),
        (["--repeats", "0"], "--repeats"),
        (["--mapper", "nope.safetensors"], "--mapper"),
        (["--mapper", "mapper.pt"], "--mapper"),
        (["--mapper", "MAPPER", "--no-mapper"], "--no-mapper"),
    ],
)
def test_bad_arguments(assets, tmp_path, capsys, extra, needle):
    extra = [str(assets / "mapper.safetensors") if e == "MAPPER" else e for e in extra]
    if "--mapper" not in extra:
        extra += ["--no-mapper"]
    png = tmp_path / "demo.png"
    rc = D.main(["--model", str(assets / "model"), "--out", str(png), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert not png.exists()


def test_missing_model_and_assets(assets, tmp_path, capsys, monkeypatch):
    rc = D.main(["--model", str(tmp_path / "nowhere"), "--no-mapper"])
    assert rc == 2 and "--model" in capsys.readouterr().err
    monkeypatch.setattr(D, "MODEL_DIR", tmp_path / "assets" / "model")
    monkeypatch.setattr(D, "MAPPER_FILE", tmp_path / "assets" / "mapper.safetensors")
    assert D.main([]) == 2
    err = capsys.readouterr().err
    assert "shipped model is missing" in err and "grounded.train" in err and "--model" in err
    assert D.main(["--model", str(assets / "model")]) == 2
    err = capsys.readouterr().err
    assert "shipped mapper is missing" in err and "labels_pipeline" in err
    assert "--no-mapper" in err


def test_bad_choices_exit_from_argparse(capsys):
    with pytest.raises(SystemExit):
        D.main(["--split", "dev"])
    assert "--split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main(["--question-type", "colour"])
    assert "--question-type" in capsys.readouterr().err


def test_parse_size():
    assert D.parse_size(None) is None
    assert D.parse_size("256x320") == (256, 320)
    assert D.parse_size(" 64X80 ") == (64, 80)
    for bad in ("256", "256x", "x320", "256x321", "0x64", "-64x64", "64.0x64"):
        with pytest.raises(ValueError, match="--size"):
            D.parse_size(bad)


def test_highlight_kept(gen):
    import numpy as np
    from PIL import Image

    gh, gw = 5, 7
    arr = torch.randint(0, 256, (gh * 16, gw * 16, 3), generator=gen, dtype=torch.uint8)
    image = Image.fromarray(arr.numpy())
    idx = torch.randperm(gh * gw, generator=gen)[:11].tolist()
    mask = D.kept_mask((gh, gw), idx)
    assert mask.shape == (gh, gw) and int(mask.sum()) == 11
    assert bool(mask.flatten()[idx].all())
    out = D.highlight_kept(image, mask, dim=0.35)
    ref = arr.numpy().astype(np.float32) / 255.0
    for i in range(gh):
        for j in range(gw):
            cell = out[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            src = ref[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            if mask[i, j]:
                np.testing.assert_array_equal(cell, src)
            else:  # grey (R = G = B) and dimmed
                np.testing.assert_allclose(cell[..., 0], cell[..., 1])
                np.testing.assert_allclose(cell[..., 0], cell[..., 2])
                lum = src @ np.array([0.299, 0.587, 0.114], np.float32)
                np.testing.assert_allclose(cell[..., 0], 0.35 * lum, rtol=1e-6)
    with pytest.raises(ValueError, match="token grid"):
        D.highlight_kept(image, torch.zeros(gh + 1, gw, dtype=torch.bool))
