"""``tokenprune explain`` on the project's own shipped model (a Qwen2-VL directory,
tokenprune_kernels/grounded/assets/model) and a few grounded scenes saved as PNG files.

Without torchvision (the CI machine has none) transformers cannot build the Qwen2-VL processor's
video processor, so image-only data runs on the processor built without one; its labels must be
those of the grounded labels pipeline (the model's own in-process processor, the same relevance
through the library). Video records without torchvision: an error naming torchvision.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("PIL", reason="scenes are rendered with Pillow")

from tokenprune_kernels.cli import main
from tokenprune_kernels.explain import cli
from tokenprune_kernels.explain.processor import torchvision_available
from tokenprune_kernels.grounded.labels_pipeline import LABEL_SEED, label_grounded_sample
from tokenprune_kernels.grounded.model import MODEL_DIR, load_model_dir
from tokenprune_kernels.grounded.scenes import make_sample
from tokenprune_kernels.labels import read_labels

SIZE = (224, 224)  # 196 visual tokens: the smallest training size keeps the test quick
INDICES = (0, 1, 2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three train-split scenes of the labels pipeline's seed, as PNG files + a JSONL file."""
    root = tmp_path_factory.mktemp("scenes")
    samples, lines = [], []
    for i in INDICES:
        s = make_sample("train", i, LABEL_SEED, SIZE)
        s.image.save(root / f"scene{i}.png")
        samples.append(s)
        record = {"image": f"scene{i}.png", "question": s.question.text}
        lines.append(json.dumps({"id": f"train-{i}", **record, "answer": s.question.answer}))
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return samples, data


def test_explain_runs_on_the_shipped_model_with_image_data(scenes, tmp_path, capsys):
    samples, data = scenes
    out = tmp_path / "labels"
    argv = ["explain", "--model", str(MODEL_DIR), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seen"] == len(INDICES) and summary["model_type"] == "qwen2_vl"

    # the same samples through the grounded labels pipeline (in-process processor, library calls)
    model, processor = load_model_dir(MODEL_DIR, attn_implementation="eager")
    want = {}
    for s in samples:
        ok, _, record = label_grounded_sample(model, processor, s)
        if ok:
            want[record.sample_id] = record
    assert len(want) >= 2  # the shipped model answers most training scenes right
    got = {r.sample_id: r for r in read_labels(out)}
    assert summary["correct"] == len(got) and set(got) == set(want)
    for sid, rec in got.items():
        assert rec.meta["n_visual"] == want[sid].meta["n_visual"] == 196
        assert rec.meta["prompt_length"] == want[sid].meta["prompt_length"]
        torch.testing.assert_close(rec.attn, want[sid].attn, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(rec.label, want[sid].label, rtol=1e-4, atol=1e-7)


def test_processor_for_image_data_without_torchvision():
    if torchvision_available():
        pytest.skip("torchvision is installed: AutoProcessor builds the full processor")
    _, processor = cli.load_model_and_processor(
        MODEL_DIR, torch.device("cpu"), torch.float32, video=False
    )
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert processor.video_processor is None and processor.chat_template
    assert "Pil" in type(processor.image_processor).__name__


def test_video_data_without_torchvision_names_it(scenes, tmp_path, capsys):
    if torchvision_available():
        pytest.skip("torchvision is installed: video processors load")
    _, data = scenes
    video = data.parent / "video.jsonl"
    record = {"id": "v", "video": ["scene0.png", "scene1.png"], "question": "?", "answer": "red"}
    video.write_text(json.dumps(record) + "\n")
    argv = ["explain", "--model", str(MODEL_DIR), "--data", str(video), "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "for video records" in err and "need torchvision, which is not installed" in err
    assert str(MODEL_DIR) in err


def test_processor_without_video_keeps_the_other_checks():
    """Only a None video processor is let through, on that instance only."""
    from transformers import Qwen2VLProcessor

    from tokenprune_kernels.explain.processor import processor_without_video
    from tokenprune_kernels.grounded.model import build_image_processor, build_tokenizer

    image, tok = build_image_processor(), build_tokenizer()
    with pytest.raises(TypeError, match="argument image_processor"):
        processor_without_video(Qwen2VLProcessor, tok, tok, None)
    processor = processor_without_video(Qwen2VLProcessor, image, tok, "{{ x }}")
    assert processor.video_processor is None and processor.chat_template == "{{ x }}"
    assert "check_argument_for_proper_class" not in vars(processor)
