"""The processor of a local model directory for ``tokenprune explain``, with or without torchvision.

transformers 5.x builds the video processor of a video-capable processor (Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision, ...) whenever it loads the processor, and its video processors need torchvision:
on a machine without torchvision ``AutoProcessor.from_pretrained`` fails even for image-only data.
:func:`load_processor` then builds the processor from the parts an image prompt needs: the image
processor ``AutoImageProcessor`` falls back to without torchvision (the PIL one), the tokenizer,
the chat template and the processor's own settings, with no video processor. Video data without
torchvision gets an error that names torchvision.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

__all__ = ["load_processor", "processor_without_video", "torchvision_available"]

_PROCESSOR_CONFIG = "processor_config.json"
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def torchvision_available() -> bool:
    """Whether torchvision can be imported (transformers' video processors need it)."""
    return importlib.util.find_spec("torchvision") is not None


def processor_without_video(
    processor_class: type, image_processor: Any, tokenizer: Any, chat_template: str | None, **kwargs
) -> Any:
    """An instance of ``processor_class`` (a transformers ``ProcessorMixin``) built from an image
    processor and a tokenizer, its ``video_processor`` (when the class has one) ``None``.

    ``ProcessorMixin`` checks every part's class and rejects ``None`` for a video processor; that
    one check is skipped for this instance only (every other part is checked as usual).

    Args:
        processor_class: e.g. ``Qwen2VLProcessor``.
        image_processor, tokenizer: the parts.
        chat_template: the processor's chat template (or None).
        **kwargs: further arguments of ``processor_class`` (e.g. LLaVA's ``patch_size``).

    Returns:
        The processor; it handles text and images, not videos.
    """
    parts: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
    if "video_processor" in processor_class.get_attributes():
        parts["video_processor"] = None
    processor = processor_class.__new__(processor_class)
    check = processor_class.check_argument_for_proper_class

    def check_parts(name: str, argument: Any) -> Any:
        if name == "video_processor" and argument is None:
            return None
        return check(processor, name, argument)

    processor.check_argument_for_proper_class = check_parts  # this instance only
    try:
        processor.__init__(**parts, chat_template=chat_template, **kwargs)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def _processor_settings(model_dir: Path) -> dict[str, Any]:
    path = model_dir / _PROCESSOR_CONFIG
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template(model_dir: Path, settings: dict[str, Any], tokenizer: Any) -> str | None:
    for name in _TEMPLATE_FILES:
        path = model_dir / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return settings.get("chat_template") or getattr(tokenizer, "chat_template", None)


def _image_only_processor(model_dir: Path, model_type: str) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import (
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )

    settings = _processor_settings(model_dir)
    name = settings.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_class = processor_class_from_name(name) if name else None
    if processor_class is None:
        raise ValueError(f"no processor class known for model type {model_type!r}")
    image_processor = AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    accepted = inspect.signature(processor_class.__init__).parameters
    skip = {"self", "chat_template", *processor_class.get_attributes()}
    extra = {k: v for k, v in settings.items() if k in accepted and k not in skip}
    template = _chat_template(model_dir, settings, tokenizer)
    return processor_without_video(processor_class, image_processor, tokenizer, template, **extra)


def load_processor(model_dir: str | Path, model_type: str, *, video: bool) -> Any:
    """The processor of a local model directory (never the hub).

    ``AutoProcessor`` first; when that fails and torchvision is not installed, image-only data
    (``video=False``) gets the processor built without a video processor (see the module
    docstring), video data a ``ValueError`` naming torchvision.

    Args:
        model_dir: the model directory (processor files beside the weights).
        model_type: its ``config.model_type`` (picks the processor class when the directory's
            ``processor_config.json`` does not name one).
        video: whether the data holds video records.

    Raises:
        ValueError: the processor cannot be loaded (the message says why and names the
            directory; torchvision when it is what is missing).
    """
    from transformers import AutoProcessor

    model_dir = Path(model_dir)
    try:
        return AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        if torchvision_available():
            raise ValueError(f"cannot load the processor from '{model_dir}': {err}") from err
        if video:
            raise ValueError(
                f"cannot load the processor from '{model_dir}' for video records: transformers' "
                "video processors need torchvision, which is not installed (pip install "
                f"torchvision; image-only data works without it). transformers said: {err}"
            ) from err
        try:
            return _image_only_processor(model_dir, model_type)
        except Exception as fallback_err:
            raise ValueError(
                f"cannot load the processor from '{model_dir}': {err}; without torchvision the "
                f"image-only processor could not be built either: {fallback_err}"
            ) from fallback_err
