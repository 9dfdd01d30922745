"""End-to-end time to first token (TTFT): unpatched vs keep 50% vs keep 25%, in one run.

TTFT here is one prefill forward of the whole ``*ForConditionalGeneration`` model (vision tower,
merge, language model, lm_head on the last position) followed by the argmax that gives the first
token; the median over ``--repeats`` timed runs after warm-up (``time.perf_counter``, with
``torch.cuda.synchronize`` around each run on a GPU). The cases are interleaved run by run
(unpatched, 50%, 25%, unpatched, ...) so that a change of machine load hits all of them alike.
Each case is timed twice:

- ``e2e``: pixels in, first token out (what a user waits for);
- ``cached vision``: the model's ``get_image_features`` returns a precomputed result (the vision
  encoder output is cached, as when an image is reused), so the time is the part that pruning can
  change: merge, pruning and the LLM prefill.

The pruning overhead is the time of the pruning call alone (``prune_inputs``, as the patched
forward calls it, synchronised), measured in separate runs and reported as a percentage of the
unpruned ``cached vision`` prefill.

Configs (random weights, built in-process, no hub):

- ``tiny``: small Qwen2-VL / LLaVA-OneVision / LLaVA shapes that run on a CPU in seconds;
- ``7b``: Qwen2-VL-7B and LLaVA-OneVision-7B (Qwen2-7B + SigLIP-so400m) shapes, built directly on
  the device in ``--dtype`` (bf16 by default).

Examples::

    python3 benchmarks/bench_e2e.py --device cpu --config tiny --out benchmarks/results/e2e_cpu.md
    python3 benchmarks/bench_e2e.py --device cuda --config 7b --visual-tokens 4096 \\
        --out benchmarks/results/e2e_h100.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KEEP_RATIOS = (0.5, 0.25)
SYSTEM_TOKENS = 14
INSTRUCTION_TOKENS = 32
FAMILY_MODULE = {"qwen2_vl": "qwen", "llava_onevision": "llava", "llava": "llava"}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


#: Language-model sizes: (hidden, intermediate, layers, heads, kv heads, vocab, max positions).
_TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings",
)  # fmt: skip
_TEXT_SIZES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32064, 4096),  # LLaVA-1.5-7B's language model
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, 32768),  # Qwen2-VL-7B's, LLaVA-OneVision-7B's
    "tiny": (256, 704, 4, 8, 2, 1024, 32768),
}
#: Vision towers (SigLIP, CLIP): (hidden, intermediate, layers, heads, patch, image size). The
#: tiny ones: 224-pixel tiles of 16 x 16 tokens (the 7B SigLIP: 384 pixels, 27 x 27); 64 tokens
#: per image (the 7B CLIP: 576).
_TOWER_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
    "image_size",
)  # fmt: skip
_TOWER_SIZES = {
    ("llava_onevision", "7b"): (1152, 4304, 26, 16, 14, 384),
    ("llava_onevision", "tiny"): (64, 128, 2, 2, 14, 224),
    ("llava", "7b"): (1024, 4096, 24, 16, 14, 336),
    ("llava", "tiny"): (64, 128, 2, 2, 14, 112),
}


def _text_kwargs(family: str, size: str) -> dict:
    if size == "7b":
        name = "llama2-7b" if family == "llava" else "qwen2-7b"
        eps = 1e-5 if family == "llava" else 1e-6
        return dict(zip(_TEXT_FIELDS, _TEXT_SIZES[name], strict=True), rms_norm_eps=eps)
    tiny = dict(zip(_TEXT_FIELDS, _TEXT_SIZES["tiny"], strict=True))
    return dict(tiny, bos_token_id=None, eos_token_id=None)


def _tower_kwargs(family: str, size: str) -> dict:
    return dict(zip(_TOWER_FIELDS, _TOWER_SIZES[family, size], strict=True))


def build_config(family: str, size: str, attn: str):
    """The transformers config of ``family`` at ``size`` ('tiny' or '7b')."""
    import transformers as tf

    text = _text_kwargs(family, size)
    if family == "qwen2_vl":
        vision = (
            dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16)
            if size == "7b"
            else dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2)
        )
        vocab = text["vocab_size"]
        special = {}  # the 7B vocabulary holds the real special ids; the tiny one its last ids
        if size != "7b":
            special = dict(
                image_token_id=vocab - 1,
                video_token_id=vocab - 2,
                vision_start_token_id=vocab - 3,
                vision_end_token_id=vocab - 4,
            )
        text_config = dict(
            model_type="qwen2_vl_text",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            }
            if size == "7b"
            else {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            **text,
        )
        config = tf.Qwen2VLConfig(
            text_config=text_config,
            vision_config=dict(model_type="qwen2_vl_vision", patch_size=14, **vision),
            **special,
        )
    elif family == "llava_onevision":
        vision = _tower_kwargs(family, size)
        tile = vision["image_size"]
        pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(vision_use_head=False, **vision),
            text_config=tf.Qwen2Config(**text),
            image_token_index=text["vocab_size"] - 2,
            video_token_index=text["vocab_size"] - 1,
            image_grid_pinpoints=pinpoints,  # the 7B model's grid (for 384-pixel tiles)
        )
    elif family == "llava":
        vision = _tower_kwargs(family, size)
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision),
            text_config=tf.LlamaConfig(**text),
            image_token_id=text["vocab_size"] - 2,
        )
    else:
        raise ValueError(f"--family must be one of {sorted(FAMILY_MODULE)}, got {family!r}")
    config._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        getattr(config, sub)._attn_implementation = attn
    return config


def build_model(family: str, size: str, device: torch.device, dtype: torch.dtype, attn: str):
    """A random-weight ``*ForConditionalGeneration`` built directly on ``device`` in ``dtype``."""
    import transformers as tf

    cls = {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
        "llava": tf.LlavaForConditionalGeneration,
    }[family]
    config = build_config(family, size, attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # parameters were created on `device` in `dtype`


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _text_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(10, min(vocab - 10, 30000), (n,), generator=gen).tolist()


def make_inputs(model, family: str, visual_tokens: int, device: torch.device, gen) -> dict:
    """One prompt: system text, about ``visual_tokens`` visual tokens, instruction text."""
    config = model.config
    vocab = config.text_config.vocab_size
    dtype = model.dtype
    system = _text_ids(SYSTEM_TOKENS, vocab, gen)
    instruction = _text_ids(INSTRUCTION_TOKENS, vocab, gen)
    inputs: dict = {}
    if family == "qwen2_vl":
        merge = config.vision_config.spatial_merge_size
        side = max(1, round(math.sqrt(visual_tokens)))  # grid of side x side merged tokens
        grid = torch.tensor([[1, side * merge, side * merge]])
        n_patches = int(grid.prod())
        patch_dim = (
            3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
        )
        inputs["pixel_values"] = torch.randn(n_patches, patch_dim, generator=gen).to(device, dtype)
        inputs["image_grid_thw"] = grid.to(device)
        n_visual = n_patches // merge**2
        ids = (
            system
            + [config.vision_start_token_id]
            + [config.image_token_id] * n_visual
            + [config.vision_end_token_id]
            + instruction
        )
        input_ids = torch.tensor([ids], device=device)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    elif family == "llava_onevision":
        image_size, n_patches = _onevision_image(model, visual_tokens)
        side = config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(1, n_patches, 3, side, side, generator=gen).to(
            device, dtype
        )
        inputs["image_sizes"] = torch.tensor([image_size], device=device)
        with torch.no_grad():
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], return_dict=True
            ).pooler_output
        n_visual = int(feats[0].shape[0])
        input_ids = torch.tensor([system + [config.image_token_id] * n_visual + instruction])
        input_ids = input_ids.to(device)
    else:  # llava: several fixed-size images make up the visual tokens
        per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        n_images = max(1, round(visual_tokens / per_image))
        side = config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(n_images, 3, side, side, generator=gen).to(
            device, dtype
        )
        n_visual = n_images * per_image
        input_ids = torch.tensor([system + [config.image_token_id] * n_visual + instruction])
        input_ids = input_ids.to(device)
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = torch.ones_like(input_ids)
    return inputs


def _onevision_image(model, visual_tokens: int) -> tuple[list[int], int]:
    """An image size (H, W) whose anyres packing gives about ``visual_tokens`` tokens, and its
    number of tiles. Counted with the model's own ``pack_image_features`` on 1-channel dummies."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches,
    )

    config = model.config
    tile = config.vision_config.image_size
    per_side = tile // config.vision_config.patch_size
    newline = torch.zeros(1)
    best: tuple[int, list[int]] | None = None
    for h in range(tile // 2, 6 * tile + 1, 8):
        for w in {h, (h * 4) // 3, (h * 3) // 2, 2 * h}:
            n_tiles = image_size_to_num_patches([h, w], config.image_grid_pinpoints, tile)
            packed, _ = model.model.pack_image_features(
                [torch.zeros(n_tiles, per_side**2, 1)],
                torch.tensor([[h, w]]),
                image_newline=newline,
                vision_aspect_ratio=config.vision_aspect_ratio,
            )
            n = int(packed[0].shape[0])
            if best is None or abs(n - visual_tokens) < abs(best[0] - visual_tokens):
                best = (n, [h, w])
    assert best is not None
    size = best[1]
    return size, image_size_to_num_patches(size, config.image_grid_pinpoints, tile)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_token(model, inputs: dict) -> torch.Tensor:
    """One prefill forward and the greedy first token: [B] int64."""
    with torch.inference_mode():
        logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1)


def time_ttft(model, inputs: dict, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per prefill (TTFT), ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        first_token(model, inputs)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        token = first_token(model, inputs)
        token.cpu()  # the first token is on the host
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def cached_vision(model) -> Iterator[None]:
    """Make ``model.model.get_image_features`` return a result computed once (vision cached)."""
    inner = model.model
    had = "get_image_features" in inner.__dict__
    previous = inner.__dict__.get("get_image_features")
    original = inner.get_image_features
    memo: dict = {}

    def get_image_features(*args, **kwargs):
        if "out" not in memo:
            memo["out"] = original(*args, **kwargs)
        return memo["out"]

    inner.get_image_features = get_image_features
    try:
        yield
    finally:
        if had:
            inner.get_image_features = previous
        else:
            del inner.get_image_features


@contextlib.contextmanager
def timed_pruning(device: torch.device, sink: list[float]) -> Iterator[None]:
    """Time every ``prune_inputs`` call the patched model makes (synchronised) into ``sink``:
    the seam every family shares, ``tokenprune_kernels.transformers.patch``, calls it."""
    module = importlib.import_module("tokenprune_kernels.transformers.patch")
    original: Callable = module.prune_inputs

    def prune_inputs(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        sink.append(time.perf_counter() - t0)
        return out

    module.prune_inputs = prune_inputs
    try:
        yield
    finally:
        module.prune_inputs = original


@dataclass
class Row:
    family: str
    mode: str
    keep: str
    seq_len: int
    visual: int
    ttft_ms: float
    speedup: float
    overhead_ms: float | None
    overhead_pct: float | None


def _set_case(model, keep: float | None) -> None:
    from tokenprune_kernels.transformers import apply_tokenprune, revert_tokenprune

    if keep is None:
        revert_tokenprune(model)
    else:
        apply_tokenprune(model, keep_ratio=keep)  # applying again only replaces the config


def time_cases(
    model, inputs: dict, device: torch.device, cases: tuple, repeats: int, warmup: int
) -> dict:
    """TTFT samples (seconds) per case. The cases are interleaved run by run (unpatched, 50%,
    25%, unpatched, ...), so that a change of machine load hits every case alike."""
    times: dict = {case: [] for case in cases}
    for i in range(warmup + repeats):
        for case in cases:
            _set_case(model, case)
            t = time_ttft(model, inputs, device, repeats=1, warmup=0)[0]
            if i >= warmup:
                times[case].append(t)
    _set_case(model, None)
    return times


def pruning_times(model, family: str, inputs: dict, device: torch.device, keep: float, n: int):
    """Seconds of each ``prune_inputs`` call over ``n`` patched prefills (synchronised)."""
    sink: list[float] = []
    _set_case(model, keep)
    try:
        with timed_pruning(device, sink):
            for _ in range(n):
                first_token(model, inputs)
    finally:
        _set_case(model, None)
    return sink


def bench_family(family: str, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """All rows of one model family."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(family, args.config, device, dtype, args.attn)
    inputs = make_inputs(model, family, args.visual_tokens, device, gen)
    print(f"[{family}] built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    seq_len = int(inputs["input_ids"].shape[1])
    visual = seq_len - SYSTEM_TOKENS - INSTRUCTION_TOKENS - (2 if family == "qwen2_vl" else 0)
    cases = (None, *KEEP_RATIOS)
    rows: list[Row] = []
    cached_base = None
    for mode in ("e2e", "cached vision"):
        with cached_vision(model) if mode == "cached vision" else contextlib.nullcontext():
            times = time_cases(model, inputs, device, cases, args.repeats, args.warmup)
            overhead = {
                keep: statistics.median(
                    pruning_times(model, family, inputs, device, keep, max(3, args.repeats))
                )
                for keep in KEEP_RATIOS
            }
        base = statistics.median(times[None])
        if mode == "cached vision":
            cached_base = base
        for keep in cases:
            ttft = statistics.median(times[keep])
            rows.append(
                Row(
                    family=family,
                    mode=mode,
                    keep="unpatched" if keep is None else f"{keep:.0%}",
                    seq_len=seq_len,
                    visual=visual,
                    ttft_ms=ttft * 1e3,
                    speedup=base / ttft,
                    overhead_ms=None if keep is None else overhead[keep] * 1e3,
                    overhead_pct=None,
                )
            )
            print(f"[{family}] {mode} keep={rows[-1].keep}: {ttft * 1e3:.2f} ms", file=sys.stderr)
    # overhead as % of the unpruned cached-vision prefill (the LLM part pruning acts on)
    assert cached_base is not None
    for r in rows:
        if r.overhead_ms is not None:
            r.overhead_pct = 100.0 * r.overhead_ms / (cached_base * 1e3)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tokenprune_kernels", "benchmarks/bench_e2e.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        commit = out.stdout.strip() or "unknown"
        return commit + (" (+ local changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def to_markdown(rows: list[Row], args, device: torch.device, command: str) -> str:
    """The results table with device, versions, commit and the exact command."""
    import transformers

    lines = [
        "# End-to-end time to first token (TTFT)",
        "",
        f"- device: {_device_name(device)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}",
        f"- git commit: {_git_commit()}",
        f"- command: `{command}`",
        f"- config: {args.config} (random weights), dtype {args.dtype}, attention {args.attn}, "
        f"batch 1, {SYSTEM_TOKENS} system + ~{args.visual_tokens} visual + {INSTRUCTION_TOKENS} "
        f"instruction tokens, training-free scores (no mapper)",
        f"- median of {args.repeats} runs after {args.warmup} warm-up runs; TTFT = one prefill "
        "forward + argmax of the first token; `e2e` includes the vision encoder, `cached vision` "
        "reuses its output; overhead = the pruning call alone (`prune_inputs`: layer-0 q/k, "
        "scores, top-k, gather), % of the unpruned `cached vision` prefill",
        "",
        "| model | mode | keep | seq len | visual | TTFT ms | speed-up | pruning ms | overhead % |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over = "" if r.overhead_ms is None else f"{r.overhead_ms:.3f}"
        pct = "" if r.overhead_pct is None else f"{r.overhead_pct:.2f}"
        lines.append(
            f"| {r.family} | {r.mode} | {r.keep} | {r.seq_len} | {r.visual} | {r.ttft_ms:.2f} "
            f"| {r.speedup:.2f}x | {over} | {pct} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--config", choices=("tiny", "7b"), default="tiny")
    p.add_argument(
        "--family",
        action="append",
        choices=sorted(FAMILY_MODULE),
        help="model family (repeatable); default: qwen2_vl and llava_onevision",
    )
    p.add_argument("--visual-tokens", type=int, default=None, help="default 1024 tiny, 4096 7b")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.visual_tokens is None:
        args.visual_tokens = 4096 if args.config == "7b" else 1024
    if args.visual_tokens < 4:
        p.error(f"--visual-tokens must be >= 4, got {args.visual_tokens}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.family is None:
        args.family = ["qwen2_vl", "llava_onevision"]
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print (and with ``--out`` write) the Markdown report; return it."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python3 benchmarks/bench_e2e.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    rows: list[Row] = []
    for family in args.family:
        rows += bench_family(family, args, device, dtype)
    report = to_markdown(rows, args, device, command)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
