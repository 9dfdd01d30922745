"""The grounded-VQA model: a small Qwen2-VL (real transformers classes), its offline word-level
tokenizer and Qwen2-VL processor built in-process, and save / load of a local model directory.

- :func:`build_config` - :class:`transformers.Qwen2VLConfig`: vision tower (patch 8, 2x2 merge,
  depth 2, width 64), PatchMerger, language model (4 layers, hidden 128, 4 heads, 2 kv heads,
  M-RoPE). ~1M parameters.
- :func:`build_tokenizer` / :func:`build_processor` - a ``PreTrainedTokenizerFast`` over
  :data:`VOCAB` (one token per word; special tokens of Qwen2-VL) and a ``Qwen2VLProcessor`` with
  the PIL image processor and a chat template. No files, no hub.
- :func:`save_model_dir` / :func:`load_model_dir` - ``save_pretrained(safe_serialization=True)``
  + processor files; loading is local only.
- :func:`load_grounded_model` - the shipped model in ``tokenprune_kernels/grounded/assets/model``.
- :func:`prompt_text`, :func:`build_inputs`, :func:`generate_answers` - the prompt format and
  greedy answers through ``model.generate`` (the real model, pixel inputs from the processor).

Prompt (one user turn, image first, then the question; answer = one word then ``<|im_end|>``)::

    <|im_start|>user <|vision_start|><|image_pad|><|vision_end|> what colour is the circle ?
    <|im_end|> <|im_start|>assistant red <|im_end|>

transformers 5.x builds a Qwen2-VL processor's video processor, which needs torchvision;
:func:`build_processor` and :func:`load_processor` build it without one (images only; see
:func:`tokenprune_kernels.explain.processor.processor_without_video`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune_kernels.explain.processor import processor_without_video
from tokenprune_kernels.grounded.scenes import (
    ANSWERS,
    COLOURS,
    EXTRA_ANSWERS,
    EXTRA_QUESTION_WORDS,
    QUESTION_WORDS,
    SHAPES,
    TOKEN_PX,
)

PAD = "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    "<|endoftext|>",
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)


def _vocab_words() -> tuple[str, ...]:
    words: list[str] = [*SPECIAL_TOKENS, "user", "assistant", "<unk>"]
    for w in (*QUESTION_WORDS, *COLOURS, *SHAPES, *ANSWERS):
        if w not in words:
            words.append(w)
    shipped = len(words)
    words += [w for w in (*EXTRA_QUESTION_WORDS, *EXTRA_ANSWERS) if w not in words]
    return tuple(words), shipped


VOCAB, SHIPPED_VOCAB_LEN = _vocab_words()
"""Every token, in id order (id = position). The first ``SHIPPED_VOCAB_LEN`` (45) are the
shipped model's; the words of the opt-in question types follow in rows the shipped model
left spare (it never saw them: its tokenizer files map them to ``<unk>``, its outputs are
unchanged)."""
VOCAB_SIZE = 64
"""Embedding rows (>= len(VOCAB); the spare rows are never produced by the tokenizer)."""
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 8, 2, 2
MIN_PIXELS, MAX_PIXELS = 64 * 64, 1024 * 1024
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS_DIR / "model"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} "
    "{% if m.content is string %}{{ m.content }} {% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c.type == 'text' %}{{ c.text }} {% endif %}{% endfor %}{% endif %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
"""Chat template: ``<|im_start|>role content <|im_end|>`` per message, images as
``<|vision_start|><|image_pad|><|vision_end|>``, then ``<|im_start|>assistant`` to generate."""

assert TOKEN_PX == PATCH_SIZE * MERGE_SIZE and len(VOCAB) <= VOCAB_SIZE


def check_mrope_section(section: Sequence[int], half: int) -> str | None:
    """Why ``section`` is not a valid M-RoPE section list for ``half`` rotary frequencies, or None.

    Valid: ints >= 0, a length that is a multiple of 3 (chunk ``i`` goes to component
    ``i % 3``: t, h, w), summing to ``half``, with at least one frequency for each of t, h, w.
    """
    vals = list(section)
    not_int = any(isinstance(v, bool) or not isinstance(v, int) for v in vals)
    if not vals or len(vals) % 3 or not_int:
        return "must be a list of ints whose length is a multiple of 3 (t, h, w chunks in turn)"
    if min(vals) < 0 or sum(vals) != half:
        return f"must be ints >= 0 summing to half the head dim ({half})"
    if any(sum(vals[c::3]) < 1 for c in range(3)):
        return "must give at least one frequency to each of t, h and w"
    return None


#: The special token ids of a Qwen-VL config: image, video, vision start, vision end.
QWEN_TOKEN_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)
#: Their values in :data:`VOCAB`.
QWEN_TOKEN_IDS = tuple(TOKEN_ID[t] for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END))


def qwen_vl_config(
    config_class: type, text: dict, vision: dict, token_ids: Sequence[int], **extra: Any
) -> Any:
    """A Qwen-VL config: ``config_class`` (``Qwen2VLConfig``, ``Qwen2_5_VLConfig`` or
    ``Qwen3VLConfig``) of the ``text`` and ``vision`` sub-config dicts, the special ``token_ids``
    in :data:`QWEN_TOKEN_FIELDS`'s order and ``extra`` top-level options. The one builder of the
    tiny Qwen configs (here, :mod:`tokenprune_kernels.testing_models`)."""
    ids = dict(zip(QWEN_TOKEN_FIELDS, token_ids, strict=True))
    return config_class(text_config=text, vision_config=vision, **ids, **extra)


def build_config(
    *,
    vision_depth: int = 2,
    vision_dim: int = 64,
    vision_heads: int = 4,
    vision_mlp_ratio: int = 4,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 100.0,
    initializer_range: float = 0.08,
    mrope_section: Sequence[int] | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """A small :class:`transformers.Qwen2VLConfig` over :data:`VOCAB`.

    The language model's head dim is ``hidden_size // num_heads``; its M-RoPE sections split the
    rotary half-dim over (t, h, w) as ``[half/8, rest/2, rest/2]`` (``[2, 7, 7]`` at head
    dim 32): images have one frame, so the frequencies go to rows and columns. ``mrope_section``
    (summing to half the head dim) overrides that split: ``[t, h, w]``, or a longer list whose
    chunks of consecutive frequencies go to ``t, h, w, t, h, w, ...`` in turn (transformers
    assigns chunk ``i`` to component ``i % 3``; a length that is a multiple of 3 keeps that true
    in every transformers version; zero-size chunks are allowed) - an interleaved layout like
    Qwen3-VL's, so that rows and columns both get fast and slow frequencies. With ``[t, h, w]``
    the ``w`` (column) section gets the slowest frequencies. Text-to-image attention that
    matches content needs slow frequencies whatever their section: every visual token of an
    image sits at the same ``t``, but the text query's own position changes with the turn and
    the image size (measured: at base 30 no content question was learnt; see
    ``docs/grounded_training.md``).

    ``initializer_range`` (std of the initial weights, vision tower and language model) is
    0.08 (about ``1 / sqrt(hidden_size)``) rather than the 0.02 of the big checkpoints: at this
    width 0.02 leaves the attention logits flat and training on the CPU budget stalls (measured:
    one-object colour question learnt in ~75 steps at 0.08, lr 1e-3; not in 250 at 0.02, lr 3e-3).

    Raises:
        ValueError: sizes that do not divide (hidden by heads, heads by kv heads, odd head dim).
    """
    from transformers import Qwen2VLConfig

    for name, v in (
        ("vision_depth", vision_depth),
        ("vision_dim", vision_dim),
        ("vision_heads", vision_heads),
        ("vision_mlp_ratio", vision_mlp_ratio),
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 4:
        raise ValueError(
            f"hidden_size ({hidden_size}) must split into num_heads ({num_heads}) heads of a "
            f"dim divisible by 4, and num_heads by num_kv_heads ({num_kv_heads})"
        )
    if vision_dim % vision_heads or (vision_dim // vision_heads) % 4:
        raise ValueError(
            f"vision_dim ({vision_dim}) must split into vision_heads ({vision_heads}) heads of a "
            "dim divisible by 4 (2-D rotary)"
        )
    half = hidden_size // num_heads // 2
    t_sec = max(1, half // 8)
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    if mrope_section is not None:
        err = check_mrope_section(mrope_section, half)
        if err:
            raise ValueError(f"mrope_section {err}, got {list(mrope_section)!r}")
        mrope = [int(v) for v in mrope_section]
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        pad_token_id=TOKEN_ID[PAD],
        bos_token_id=None,
        eos_token_id=TOKEN_ID[IM_END],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
    )
    vision = dict(
        depth=vision_depth,
        embed_dim=vision_dim,
        hidden_size=hidden_size,
        num_heads=vision_heads,
        mlp_ratio=vision_mlp_ratio,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        initializer_range=initializer_range,
    )
    config = qwen_vl_config(
        Qwen2VLConfig,
        text,
        vision,
        QWEN_TOKEN_IDS,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    config._attn_implementation = attn_implementation
    return config


def build_model(config: Any | None = None, seed: int = 0) -> Any:
    """A freshly initialised :class:`transformers.Qwen2VLForConditionalGeneration` (fp32, eval
    mode, weights from ``torch.manual_seed(seed)``) with greedy generation settings."""
    from transformers import Qwen2VLForConditionalGeneration

    config = build_config() if config is None else config
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    set_generation_defaults(model)
    return model


def set_generation_defaults(model: Any) -> None:
    """Greedy decoding that stops at ``<|im_end|>`` (pad ``<pad>``), at most 2 new tokens."""
    gc = model.generation_config
    gc.eos_token_id = TOKEN_ID[IM_END]
    gc.pad_token_id = TOKEN_ID[PAD]
    gc.bos_token_id = None
    gc.do_sample = False
    gc.max_new_tokens = 2
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(gc, name):
            setattr(gc, name, None)


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` (whitespace / punctuation
    pre-tokenizer; the Qwen2-VL special tokens are matched whole). Built in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token="<unk>",
        eos_token=IM_END,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, IM_END)],
    )


def _image_processor_class() -> Any:
    try:  # transformers >= 5.x: the PIL (torchvision-free) class
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil
    except ImportError:  # pragma: no cover - older layouts
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor


def build_image_processor() -> Any:
    """The Qwen2-VL image processor: patch 8, temporal patch 2, 2x2 merge, 64^2 - 1024^2 pixels
    (sizes that are multiples of 16 px are never resized)."""
    return _image_processor_class()(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )


def _make_processor(image_processor: Any, tokenizer: Any, chat_template: str) -> Any:
    from transformers import Qwen2VLProcessor

    return processor_without_video(Qwen2VLProcessor, image_processor, tokenizer, chat_template)


def build_processor() -> Any:
    """A ``Qwen2VLProcessor`` (images only) with :func:`build_tokenizer`,
    :func:`build_image_processor` and :data:`CHAT_TEMPLATE`."""
    return _make_processor(build_image_processor(), build_tokenizer(), CHAT_TEMPLATE)


def save_model_dir(model: Any, processor: Any, path: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``processor`` (tokenizer, image processor, chat
    template) to the directory ``path`` (created). Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    # ProcessorMixin.save_pretrained needs every attribute (a video processor): save the parts.
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    config = {"processor_class": type(processor).__name__}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_processor(path: str | Path) -> Any:
    """The processor saved in the local directory ``path`` (never the hub).

    Raises:
        FileNotFoundError: ``path`` is not a directory with tokenizer files.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"'{path}' holds no tokenizer.json: not a grounded model directory")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    image_processor = _image_processor_class().from_pretrained(str(path), local_files_only=True)
    template = CHAT_TEMPLATE
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.is_file():
            text = f.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return _make_processor(image_processor, tokenizer, template)


def load_model_dir(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """``(model, processor)`` from a local directory written by :func:`save_model_dir`
    (``local_files_only``; the model in eval mode with greedy generation defaults).

    Raises:
        FileNotFoundError: no such directory, or no ``config.json`` / tokenizer in it.
    """
    from transformers import Qwen2VLForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' holds no config.json: not a model directory")
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    model = model.to(device).eval()
    set_generation_defaults(model)
    return model, load_processor(path)


def load_grounded_model(
    *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """The shipped grounded-VQA model and its processor (``assets/model``), offline, on CPU.

    Raises:
        FileNotFoundError: the assets are missing (a source checkout without them).
    """
    return load_model_dir(MODEL_DIR, dtype=dtype, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------------------------
# Prompts and answers
# --------------------------------------------------------------------------------------------


def prompt_text(question: str, processor: Any | None = None) -> str:
    """The chat prompt of one image + ``question`` with the generation prompt (one
    ``<|image_pad|>`` placeholder: the processor expands it)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if processor is None:
        from jinja2 import Template

        return Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return out[0] if isinstance(out, list) else out


def build_inputs(processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict:
    """Processor inputs for a batch of (image, question) prompts, left-padded for generation.

    Args:
        processor: from :func:`build_processor` / :func:`load_processor`.
        images: RGB ``PIL.Image`` s (any sizes that are multiples of 16 px).
        questions: one question per image.

    Returns:
        ``input_ids [B, L]`` int64, ``attention_mask [B, L]``, ``mm_token_type_ids [B, L]``,
        ``pixel_values [sum patches, 384]`` fp32, ``image_grid_thw [B, 3]`` int64.
    """
    if len(images) != len(questions) or not images:
        raise ValueError(
            f"images and questions must be non-empty and of one length, got {len(images)} "
            f"and {len(questions)}"
        )
    texts = [prompt_text(q, processor) for q in questions]
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        out = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    max_new_tokens: int = 2,
) -> list[str]:
    """Greedy answers of ``model.generate`` for a batch of (image, question) prompts: the
    decoded new tokens up to ``<|im_end|>`` (special tokens dropped, stripped)."""
    inputs = build_inputs(processor, images, questions)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


__all__ = [
    "ASSETS_DIR",
    "CHAT_TEMPLATE",
    "MODEL_DIR",
    "QWEN_TOKEN_FIELDS",
    "QWEN_TOKEN_IDS",
    "SPECIAL_TOKENS",
    "TOKEN_ID",
    "VOCAB",
    "VOCAB_SIZE",
    "build_config",
    "build_image_processor",
    "build_inputs",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "generate_answers",
    "load_grounded_model",
    "load_model_dir",
    "load_processor",
    "prompt_text",
    "qwen_vl_config",
    "save_model_dir",
    "set_generation_defaults",
]
