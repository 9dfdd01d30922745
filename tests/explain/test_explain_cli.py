"""``tokenprune explain`` end to end on a tiny random LLaVA saved to a local directory (model,
word-level tokenizer, CLIP image processor, chat template): shards, correctness filter, summary,
resumption after an interruption, and the errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("PIL", reason="tokenprune explain reads images with Pillow")
from tokenprune_kernels.explain import cli
from tokenprune_kernels.labels import read_labels
from tokenprune_kernels.testing_models.explain import (
    independent_relevance,
    make_dataset,
    save_image,
)
from tokenprune_kernels.testing_models.llava import IMAGE_ID

MAX_NEW = 3
N_VISUAL = 25  # 20x20 CLIP image, patch 4


@pytest.fixture(scope="module")
def loaded(llava_dir):
    return cli.load_model_and_processor(llava_dir, torch.device("cpu"), torch.float32)


def _dataset(tmp_path, gen, loaded, wrong=("s1",), n=3):
    return make_dataset(tmp_path, gen, loaded, MAX_NEW, wrong=wrong, n=n)


def _args(llava_dir, data, out, *extra):
    return ["--model", str(llava_dir), "--data", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_end_to_end(llava_dir, loaded, tmp_path, gen, capsys):
    data, greedy = _dataset(tmp_path, gen, loaded)
    out = tmp_path / "labels"
    assert cli.main(_args(llava_dir, data, out, "--answer-chunk", "2")) == 0
    assert "2 of 3 answered correctly" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seen"] == 3 and summary["correct"] == 2 and summary["incorrect"] == 1
    assert summary["rate"] == pytest.approx(2 / 3)
    assert summary["skipped"] == 0 and summary["computed"] == 3 and summary["finished"]
    assert summary["model_type"] == "llava"
    wrong = [json.loads(line) for line in (out / "incorrect.jsonl").read_text().splitlines()]
    assert [w["id"] for w in wrong] == ["s1"] and wrong[0]["greedy_answer"] == greedy["s1"][0]

    records = read_labels(out)
    assert sorted(r.sample_id for r in records) == ["s0", "s2"]
    model, _ = loaded
    for rec in records:
        text, ids, inputs = greedy[rec.sample_id]
        assert rec.attn.shape == rec.label.shape == (N_VISUAL,)
        assert bool((rec.attn >= 0).all()) and bool((rec.label >= 0).all())
        assert rec.meta["model_type"] == "llava" and rec.meta["modality"] == "image"
        assert rec.meta["n_visual"] == N_VISUAL and rec.meta["greedy_answer"] == text
        assert rec.meta["n_answer_tokens"] == MAX_NEW
        # The label is the relevance of the greedy (= reference) tokens, as the formula gives it.
        want = independent_relevance(model, inputs, ids, [IMAGE_ID])
        torch.testing.assert_close(rec.label.double(), want, rtol=1e-5, atol=1e-7)
        # The mapper input: layer-0 attention of the instruction rows (after the image).
        with torch.no_grad():
            a0 = model(**inputs, output_attentions=True).attentions[0][0].double()
        vis = (inputs["input_ids"][0] == IMAGE_ID).nonzero()[:, 0]
        rows = torch.arange(int(vis.max()) + 1, inputs["input_ids"].shape[1])
        torch.testing.assert_close(
            rec.attn.double(), a0[:, rows][:, :, vis].mean((0, 1)), rtol=1e-5, atol=1e-7
        )

    # A second run finds everything done.
    assert cli.main(_args(llava_dir, data, out)) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["computed"] == 0 and again["skipped"] == 3 and again["correct"] == 2
    assert len(read_labels(out)) == 2


class _Stop(Exception):
    pass


def test_resume_after_interruption(llava_dir, loaded, tmp_path, gen, monkeypatch):
    data, _ = _dataset(tmp_path, gen, loaded, wrong=("s1",), n=4)
    out = tmp_path / "labels"
    calls: list[str] = []
    real = cli.label_sample

    def counting(model, processor, record, **kwargs):
        calls.append(record.sample_id)
        return real(model, processor, record, **kwargs)

    monkeypatch.setattr(cli, "label_sample", counting)

    def stop_after_two(record, result):
        if len(calls) == 2:
            raise _Stop

    kwargs = dict(device="cpu", max_new_tokens=MAX_NEW, progress=False)
    with pytest.raises(_Stop):
        cli.run_explain(llava_dir, data, out, on_sample=stop_after_two, **kwargs)
    assert calls == ["s0", "s1"]
    partial = json.loads((out / "summary.json").read_text())
    assert not partial["finished"] and partial["seen"] == 2 and partial["correct"] == 1
    assert [r.sample_id for r in read_labels(out)] == ["s0"]

    calls.clear()
    summary = cli.run_explain(llava_dir, data, out, **kwargs)
    assert calls == ["s2", "s3"]  # nothing finished before the interruption is redone
    assert summary["skipped"] == 2 and summary["computed"] == 2 and summary["finished"]
    assert summary["seen"] == 4 and summary["correct"] == 3 and summary["rate"] == 0.75
    ids = [r.sample_id for r in read_labels(out)]
    assert sorted(ids) == ["s0", "s2", "s3"] and len(ids) == len(set(ids))

    with pytest.raises(ValueError, match="other settings"):
        cli.run_explain(llava_dir, data, out, **{**kwargs, "target": "logprob"})


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _record(**kw):
    return json.dumps({"question": "w5 w6", "answer": "w7", **kw}) + "\n"


def test_errors_before_loading(tmp_path, gen, capsys):
    save_image(tmp_path / "ok.png", gen)
    good = _write(tmp_path, "good.jsonl", _record(id="a", image="ok.png"))
    model_dir = tmp_path / "text_model"
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=16, num_attention_heads=2).save_pretrained(model_dir)

    def run(data, model=model_dir):
        code = cli.main(
            [
                "--model",
                str(model),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "missing.jsonl")
    assert code == 2 and "data file not found" in err and "missing.jsonl" in err
    bad_json = _write(tmp_path, "bad.jsonl", _record(id="a", image="ok.png") + "{oops\n")
    code, err = run(bad_json)
    assert code == 2 and "line 2: not valid JSON" in err
    no_image = _write(
        tmp_path, "noimg.jsonl", _record(id="a", image="ok.png") + _record(id="b", image="gone.png")
    )
    code, err = run(no_image)
    assert code == 2 and "record 'b'" in err and "image not found" in err and "gone.png" in err
    code, err = run(good)
    assert code == 2 and "model type 'qwen2'" in err
    assert "supported: qwen2_vl, qwen2_5_vl, qwen3_vl, llava, llava_onevision" in err
    code, err = run(good, model=tmp_path / "nowhere")
    assert code == 2 and "model directory not found" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_image(llava_dir, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    data = _write(tmp_path, "d.jsonl", _record(id="x", image="broken.png"))
    code = cli.main(_args(llava_dir, data, tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot read image" in err and "broken.png" in err and "record 'x'" in err


def test_parser_wires_into_a_top_level_cli():
    parser = argparse.ArgumentParser(prog="tokenprune")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_explain_parser(sub)
    args = parser.parse_args(["explain", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    assert args.func is cli.cmd_explain
    assert (args.target, args.answer_chunk, args.max_new_tokens, args.match) == (
        "logit",
        1,
        32,
        "normalized",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "--model", "m", "--data", "d.jsonl"])  # --out is required
    with pytest.raises(ValueError, match="answer_chunk must be an int >= 1"):
        cli.run_explain("m", "d.jsonl", "o", answer_chunk=0)
