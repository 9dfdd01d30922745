"""Random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints saved to a directory that a server
loads (vLLM: ``LLM(path)`` / ``vllm serve path``), with the offline word-level tokenizer and the
image (and video) processor of :mod:`tokenprune_kernels.grounded.model`; prompts, images and
videos for them. Used by tests/vllm and benchmarks/bench_vllm.py. Saving the video processor
needs torchvision (the vLLM venv has it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenprune_kernels.grounded.model import (
    IM_END,
    IMAGE_PAD,
    QWEN_TOKEN_IDS,
    TOKEN_ID,
    build_config,
    build_model,
    build_processor,
    qwen_vl_config,
    save_model_dir,
)

TALL = (48, 128)  # (width, height) px -> 16 x 6 patches -> 24 visual tokens
WIDE = (128, 48)
QUESTIONS = (
    "what colour is the circle ?",
    "how many objects are there ?",
)


def prompt(question: str, images: int = 1, videos: int = 0) -> str:
    """One user turn: the images and videos, then the question; then the assistant header."""
    vis = "<|vision_start|><|image_pad|><|vision_end|> " * images
    vis += "<|vision_start|><|video_pad|><|vision_end|> " * videos
    return f"<|im_start|>user {vis}{question} {IM_END} <|im_start|>assistant "


def video(frames: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8 random frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size[1], size[0], 3), dtype=np.uint8)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save_qwen_dir(
    path: Path,
    model_type: str = "qwen2_vl",
    seed: int = 0,
    layers: int = 2,
    video: bool = True,
    **sizes: Any,
) -> Path:
    """Save a random model (fp32) and its processor to ``path``; returns ``path``.

    Language model by default: hidden 128, 4 heads of dim 32, 2 kv heads, ``layers`` layers,
    M-RoPE sections [2, 7, 7] (``sizes``: other :func:`~tokenprune_kernels.grounded.model.
    build_config` sizes, Qwen2-VL only); vision tower depth 2. ``qwen3_vl``: head dim 32,
    interleaved M-RoPE [4, 6, 6], deepstack features from both vision blocks. Layer-0 q/k
    weights (Qwen3-VL: its q/k norms) are scaled up so that the layer-0 attention ranks the
    visual tokens far from ties, as a trained model's does. ``video``: also save a video
    processor of the same patch sizes (Qwen2-VL / Qwen2.5-VL; needs torchvision).
    """
    if sizes and model_type != "qwen2_vl":
        raise ValueError(f"sizes are for qwen2_vl only, got {sorted(sizes)} for {model_type!r}")
    config = build_config(num_layers=layers, **sizes)
    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        import transformers

        name = {"qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[model_type]
        v = config.vision_config
        text = config.text_config.to_dict()
        vision = dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
            out_hidden_size=config.text_config.hidden_size, in_channels=3,
            patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size, initializer_range=0.08,
        )  # fmt: skip
        if model_type == "qwen2_5_vl":
            vision.update(window_size=32, fullatt_block_indexes=[1])
        else:
            text["head_dim"] = 32
            text["rope_parameters"] = {
                "rope_type": "default", "rope_theta": 100.0, "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
            }  # fmt: skip
            vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config_class = getattr(transformers, f"{name}Config")
        config = qwen_vl_config(
            config_class, text, vision, QWEN_TOKEN_IDS, tie_word_embeddings=True
        )
        torch.manual_seed(seed)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    elif model_type == "qwen2_vl":
        model = build_model(config, seed=seed)
    else:
        raise ValueError(f"model_type must be qwen2_vl, qwen2_5_vl or qwen3_vl, got {model_type!r}")
    with torch.no_grad():
        attn = model.model.language_model.layers[0].self_attn
        attn.q_proj.weight.mul_(3.0)
        attn.k_proj.weight.mul_(3.0)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: the per-head norms set the scale
            attn.q_norm.weight.mul_(3.0)
            attn.k_norm.weight.mul_(3.0)
    processor = build_processor()
    save_model_dir(model, processor, path)
    if video and model_type != "qwen3_vl":
        from transformers import Qwen2VLVideoProcessor

        ip = processor.image_processor
        Qwen2VLVideoProcessor(
            patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size,
            merge_size=ip.merge_size, size=dict(ip.size), do_sample_frames=False,
        ).save_pretrained(path)  # fmt: skip
    name = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}.get(model_type)
    if name is not None:
        (path / "processor_config.json").write_text(
            json.dumps({"processor_class": name}, indent=2) + "\n"
        )
    return path


IMAGE_TOKEN = TOKEN_ID[IMAGE_PAD]
