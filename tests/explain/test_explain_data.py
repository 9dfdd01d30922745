"""The JSONL records, media loading and prompt building of ``tokenprune explain``."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("PIL", reason="tokenprune explain reads images with Pillow")
from tokenprune_kernels.explain.data import (
    build_prompt_inputs,
    load_image,
    load_video,
    read_records,
)
from tokenprune_kernels.explain.pipeline import answers_match, normalize_answer
from tokenprune_kernels.testing_models.explain import save_image


def _jsonl(path, *objs, raw=""):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs) + raw)
    return path


def test_records(tmp_path, gen):
    (tmp_path / "img").mkdir()
    (tmp_path / "clip").mkdir()
    save_image(tmp_path / "img" / "a.png", gen)
    save_image(tmp_path / "img" / "b.png", gen)
    for name in ("f10.png", "f02.png", "f01.png"):  # sorted by name, not by creation
        save_image(tmp_path / "clip" / name, gen, (6, 5))
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    (tmp_path / "movie.mp4").write_bytes(b"\0" * 8)
    data = _jsonl(
        tmp_path / "d.jsonl",
        {"image": "img/a.png", "question": "q1", "answer": "a1", "source": "x"},
        {
            "id": 7,
            "image": ["img/a.png", str(tmp_path / "img" / "b.png")],
            "question": "q2",
            "answer": "a2",
        },
        {"id": "v", "video": "clip", "question": "q3", "answer": "a3"},
        {"id": "w", "video": ["clip/f02.png", "clip/f01.png"], "question": "q4", "answer": "a4"},
        {"id": "m", "video": "movie.mp4", "question": "q5", "answer": "a5"},
        raw="\n   \n",
    )
    recs = read_records(data)
    assert [r.sample_id for r in recs] == ["1", "7", "v", "w", "m"]
    assert [r.line for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0].images == (tmp_path / "img" / "a.png",) and recs[0].modality == "image"
    assert recs[0].extra == {"source": "x"}
    assert recs[1].images == (tmp_path / "img" / "a.png", tmp_path / "img" / "b.png")
    assert [p.name for p in recs[2].video_frames] == ["f01.png", "f02.png", "f10.png"]
    assert recs[2].modality == "video"
    assert [p.name for p in recs[3].video_frames] == ["f02.png", "f01.png"]
    assert recs[4].video_file == tmp_path / "movie.mp4" and not recs[4].video_frames
    frames = load_video(recs[3])
    assert frames.shape == (2, 6, 5, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[1], np.asarray(load_image(tmp_path / "clip" / "f01.png")))
    with pytest.raises(ValueError, match=r"line 5 \(record 'm'\): cannot decode video"):
        load_video(recs[4])


BAD = [
    ('["a list"]', "line 1: expected a JSON object"),
    ('{"image": "a.png", "answer": "x"}', "'question' must be a non-empty string"),
    ('{"image": "a.png", "question": "q", "answer": " "}', "'answer' must be a non-empty string"),
    ('{"question": "q", "answer": "x"}', "needs exactly one of 'image' and 'video'"),
    ('{"image": "a.png", "video": ["a.png"], "question": "q", "answer": "x"}', "exactly one of"),
    ('{"image": [], "question": "q", "answer": "x"}', "'image' must be a non-empty path"),
    ('{"id": true, "image": "a.png", "question": "q", "answer": "x"}', "'id' must be"),
    (
        '{"id": "r", "video": ["a.png", "f9.png"], "question": "q", "answer": "x"}',
        r"record 'r'\): video frame not found: .*f9.png",
    ),
    (
        '{"id": "r", "video": "clip.mp4", "question": "q", "answer": "x"}',
        r"record 'r'\): video not found",
    ),
    ('{"id": "e", "video": "empty", "question": "q", "answer": "x"}', "holds no frame images"),
    ('{"image": "a.png", "question": "q", "answer": "x"', "line 1: not valid JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_record_errors(tmp_path, gen, line, message):
    save_image(tmp_path / "a.png", gen)
    (tmp_path / "empty").mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_records(data)


def test_file_errors(tmp_path, gen):
    save_image(tmp_path / "a.png", gen)
    rec = {"id": "k", "image": "a.png", "question": "q", "answer": "x"}
    with pytest.raises(
        ValueError, match=r"line 2 \(record 'k'\): duplicate id, first used on line 1"
    ):
        read_records(_jsonl(tmp_path / "dup.jsonl", rec, rec))
    with pytest.raises(ValueError, match="holds no records"):
        read_records(_jsonl(tmp_path / "empty.jsonl", raw="\n"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_records(tmp_path / "none.jsonl")
    save_image(tmp_path / "big.png", gen, (7, 9))
    rec = {"id": "v", "video": ["a.png", "big.png"], "question": "q", "answer": "x"}
    (record,) = read_records(_jsonl(tmp_path / "v.jsonl", rec))
    with pytest.raises(ValueError, match="video frames differ in size"):
        load_video(record)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot read image '.*junk\.png'"):
        load_image(tmp_path / "junk.png")


def test_prompt_puts_the_image_before_the_question(llava_dir, tmp_path, gen):
    from transformers import AutoProcessor

    from tokenprune_kernels.testing_models.llava import IMAGE_ID

    processor = AutoProcessor.from_pretrained(str(llava_dir), local_files_only=True)
    save_image(tmp_path / "a.png", gen)
    rec = {"id": "p", "image": "a.png", "question": "w5 w6 w7", "answer": "x"}
    (record,) = read_records(_jsonl(tmp_path / "p.jsonl", rec))
    inputs = build_prompt_inputs(processor, record)
    ids = inputs["input_ids"][0].tolist()
    assert ids == [IMAGE_ID] * 25 + [5, 6, 7, 3]  # image, question, the template's header (w3)
    assert inputs["pixel_values"].shape == (1, 3, 20, 20)
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt_inputs(processor, record)


def test_answer_matching():
    assert normalize_answer("  A  red\ncar. ") == "a red car"
    assert answers_match("A red car.", "a red car")
    assert not answers_match("A red car.", "a red car", match="exact")
    assert answers_match(" a red car ", "a red car", match="exact")
    assert not answers_match("a red", "a red car")
    with pytest.raises(ValueError, match="match must be one of"):
        answers_match("a", "a", match="fuzzy")
