"""Records of ``tokenprune explain``: the JSONL data file, image/video loading, prompt building.

One JSON object per line (blank lines are skipped)::

    {"id": "q1", "image": "images/cat.jpg", "question": "What animal is this?", "answer": "A cat"}
    {"id": "q2", "image": ["a.png", "b.png"], "question": "...", "answer": "..."}
    {"id": "v1", "video": ["f000.jpg", "f001.jpg", "f002.jpg", "f003.jpg"], "question": "...",
     "answer": "..."}
    {"id": "v2", "video": "frames/clip7/", "question": "...", "answer": "..."}

- ``id``: optional, unique; default: the line number (1-based) as a string.
- ``image``: a path or a list of paths. ``video``: a list of frame images (in order), a
  directory of frame images (sorted by name) or a video file (decoded by transformers'
  ``load_video``, which needs a video backend such as PyAV or decord). Exactly one of the two.
  Relative paths are relative to the data file's directory.
- ``question``, ``answer``: non-empty strings; ``answer`` is the reference answer.

The prompt is one user turn whose content is the image(s) or the video FIRST, then the question
(``processor.apply_chat_template(..., add_generation_prompt=True)``): the default instruction rule
of the pruning path takes the tokens after the last visual token (the question and the assistant
header) as the instruction, so the question must come after the visual content.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)


@dataclass(frozen=True)
class ExplainRecord:
    """One sample of the data file.

    Attributes:
        sample_id: unique id (the record's ``id`` or its line number).
        line: 1-based line number in the data file.
        question: the user's question.
        answer: the reference answer.
        images: image paths (resolved), empty for a video record.
        video_frames: frame image paths (resolved, in order), empty otherwise.
        video_file: a video file path (resolved), or None.
    """

    sample_id: str
    line: int
    question: str
    answer: str
    images: tuple[Path, ...] = ()
    video_frames: tuple[Path, ...] = ()
    video_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def modality(self) -> str:
        """``"image"`` or ``"video"``."""
        return "image" if self.images else "video"

    def where(self) -> str:
        """``line N (record 'id')`` for error messages."""
        return f"line {self.line} (record {self.sample_id!r})"


def _paths(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"{where}: {key!r} must be a non-empty path or a list of paths, got {value!r}")


def _resolve(base: Path, p: str) -> Path:
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else base / path


def read_records(path: str | os.PathLike[str]) -> list[ExplainRecord]:
    """Parse and check a JSONL data file (every referenced file must exist).

    Args:
        path: the ``.jsonl`` file.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: the data file, an image, a frame or a video is missing (the message
            names the line, the record and the path).
        ValueError: a line that is not a JSON object, a missing/invalid field, a duplicate id,
            an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: '{path}'")
    base = path.resolve().parent
    records: list[ExplainRecord] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            at = f"{path}, line {lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{at}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{at}: expected a JSON object, got {type(obj).__name__}")
            raw_id = obj.get("id", lineno)
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
                raise ValueError(f"{at}: 'id' must be a non-empty string or an integer")
            sid = str(raw_id)
            at = f"{path}, line {lineno} (record {sid!r})"
            if sid in seen:
                raise ValueError(f"{at}: duplicate id, first used on line {seen[sid]}")
            seen[sid] = lineno
            for key in ("question", "answer"):
                value = obj.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{at}: {key!r} must be a non-empty string, got {value!r}")
            image = obj.get("image", obj.get("images"))
            video = obj.get("video")
            if (image is None) == (video is None):
                raise ValueError(f"{at}: needs exactly one of 'image' and 'video'")
            images: tuple[Path, ...] = ()
            frames: tuple[Path, ...] = ()
            video_file = None
            if image is not None:
                images = tuple(_resolve(base, p) for p in _paths(image, "image", at))
                for p in images:
                    if not p.is_file():
                        raise FileNotFoundError(f"{at}: image not found: '{p}'")
            else:
                specs = _paths(video, "video", at)
                if len(specs) == 1 and _resolve(base, specs[0]).is_dir():
                    d = _resolve(base, specs[0])
                    frames = tuple(
                        sorted(
                            (c for c in d.iterdir() if c.suffix.lower() in IMAGE_EXTENSIONS),
                            key=lambda c: c.name,
                        )
                    )
                    if not frames:
                        raise ValueError(f"{at}: video directory '{d}' holds no frame images")
                elif len(specs) == 1 and Path(specs[0]).suffix.lower() not in IMAGE_EXTENSIONS:
                    video_file = _resolve(base, specs[0])
                    if not video_file.is_file():
                        raise FileNotFoundError(f"{at}: video not found: '{video_file}'")
                else:
                    frames = tuple(_resolve(base, p) for p in specs)
                    for p in frames:
                        if not p.is_file():
                            raise FileNotFoundError(f"{at}: video frame not found: '{p}'")
            records.append(
                ExplainRecord(
                    sample_id=sid,
                    line=lineno,
                    question=obj["question"],
                    answer=obj["answer"],
                    images=images,
                    video_frames=frames,
                    video_file=video_file,
                    extra={k: v for k, v in obj.items() if k not in _KNOWN_KEYS},
                )
            )
    if not records:
        raise ValueError(f"data file '{path}' holds no records")
    return records


_KNOWN_KEYS = frozenset({"id", "image", "images", "video", "question", "answer"})


def load_image(path: str | os.PathLike[str]) -> Any:
    """Open an image file as an RGB ``PIL.Image`` (decoded now, so errors surface here).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a readable image (the message names it).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover - Pillow is a dependency of the explain step
        raise ImportError(
            "tokenprune explain needs Pillow to read images: pip install pillow"
        ) from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: '{path}'")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read image '{path}': {err}") from err


def load_video(record: ExplainRecord) -> np.ndarray:
    """The video of a record as ``[T, H, W, 3]`` uint8 frames.

    Raises:
        ValueError: unreadable frames, frames of different sizes, or an undecodable video file
            (the message names the file).
    """
    if record.video_file is not None:
        try:
            from transformers.video_utils import load_video as hf_load_video

            frames, _ = hf_load_video(str(record.video_file))
        except Exception as err:
            raise ValueError(
                f"{record.where()}: cannot decode video '{record.video_file}' ({err}); give the "
                "frames as image files instead, or install a video backend (PyAV, decord)"
            ) from err
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"{record.where()}: video '{record.video_file}' decoded to shape {frames.shape}, "
                "expected [T, H, W, 3]"
            )
        return frames.astype(np.uint8, copy=False)
    if not record.video_frames:
        raise ValueError(f"{record.where()}: not a video record")
    arrays = [np.asarray(load_image(p)) for p in record.video_frames]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(
            f"{record.where()}: video frames differ in size: {sorted(sizes)}; resize them to one "
            "size"
        )
    return np.stack(arrays)


def _has_chat_template(processor: Any) -> bool:
    if getattr(processor, "chat_template", None):
        return True
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(tok, "chat_template", None))


def build_prompt_inputs(processor: Any, record: ExplainRecord) -> dict[str, torch.Tensor]:
    """The processor's model inputs for the record's prompt (without the answer).

    The user turn is ``[image(s) | video, question]`` formatted by the processor's chat template
    with the generation prompt appended.

    Args:
        processor: a transformers multimodal processor with a chat template.
        record: the sample.

    Returns:
        Dict of CPU tensors, batch of one: ``input_ids [1, P]``, ``attention_mask [1, P]`` and
        the model's pixel inputs.

    Raises:
        ValueError: no chat template, unreadable media, a video record for a processor without
            a video processor.
    """
    if not _has_chat_template(processor):
        raise ValueError(
            "the processor has no chat template; tokenprune explain formats prompts with it"
        )
    kwargs: dict[str, Any] = {}
    if record.images:
        images = []
        for p in record.images:
            try:
                images.append(load_image(p))
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"{record.where()}: {err}") from err
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        kwargs["images"] = images
    else:
        if getattr(processor, "video_processor", True) is None:
            raise ValueError(
                f"{record.where()}: a video record, but the processor has no video processor "
                "(built for image-only data: transformers' video processors need torchvision, "
                "pip install torchvision)"
            )
        kwargs["videos"] = [load_video(record)]
        content = [{"type": "video"}]
    content.append({"type": "text", "text": record.question})
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, list):
        prompt = prompt[0]
    features = processor(text=[prompt], return_tensors="pt", **kwargs)
    return {k: v for k, v in dict(features).items() if isinstance(v, torch.Tensor)}


__all__ = [
    "IMAGE_EXTENSIONS",
    "ExplainRecord",
    "build_prompt_inputs",
    "load_image",
    "load_video",
    "read_records",
]
