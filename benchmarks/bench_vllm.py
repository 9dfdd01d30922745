"""Serving benchmark of the vLLM plugin: unpruned vs keep 0.5 vs keep 0.25, in one run.

Starts one ``vllm serve`` per setting on 127.0.0.1 (the plugin through ``--hf-overrides``, the
same model directory for all), then sends image requests to the OpenAI chat endpoint (streamed)
at each concurrency, the settings interleaved round by round (a change of machine load hits all
of them alike), and reports per setting and concurrency: TTFT p50 / p90 (request sent -> first
generated token received) and requests/s (requests / wall time of their batch). Every request
has its own random image (no encoder or prefix cache reuse) and ``--max-tokens`` output tokens.
Request count and time are bounded (``--requests``, ``--timeout``); the servers are stopped at
the end.

The model (``tokenprune_kernels.testing_models.saved``): a random-weight Qwen2-VL whose language
model is large enough that the prefill dominates (``--hidden``, ``--layers``...; at most 4096
positions), a small vision tower, the package's offline tokenizer and image processor; each image
is ``--image-px`` square pixels = (px / 16)^2 visual tokens.

CPU (the vLLM venv from ``scripts/setup_vllm.sh``; this script runs in the main env, which has
matplotlib, and builds the model with its transformers)::

    python3 benchmarks/bench_vllm.py --vllm .venv-vllm/bin/vllm --rounds 2 \\
        --out benchmarks/results/vllm_cpu.md

GPU (a venv with vLLM's CUDA package, ``VLLM_PACKAGE=vllm==0.32.0 bash scripts/setup_vllm.sh``;
a ~1 B-parameter language model, built in fp32 on the host first, so that the prefill dominates
there; not run yet)::

    python3 benchmarks/bench_vllm.py --vllm .venv-vllm/bin/vllm --dtype bfloat16 \\
        --hidden 2048 --layers 16 --heads 16 --kv-heads 2 --intermediate 8192 \\
        --image-px 896 --max-model-len 4096 --requests 1:8,4:32,8:64 --rounds 2 \\
        --out benchmarks/results/vllm_h100.md
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only
QUESTIONS = (
    "what colour is the circle ?",
    "how many objects are there ?",
    "what shape is the red object ?",
    "is there a blue square ?",
)


@dataclass(frozen=True)
class Setting:
    name: str
    keep: float | None  # None: plain vLLM (no plugin architecture)


@dataclass
class Cell:
    setting: str
    concurrency: int
    ttft: list[float]
    wall: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.ttft) / self.wall if self.wall > 0 else 0.0


def build_model_dir(path: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """Save the random-weight Qwen2-VL and its processor to ``path``; (path, LM parameters)."""
    from safetensors import safe_open

    from tokenprune_kernels.testing_models.saved import save_qwen_dir

    save_qwen_dir(
        path,
        layers=args.layers,
        video=False,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        initializer_range=0.02,
    )
    n_params = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if "visual." not in name:  # the language model (tied lm_head: stored once)
                n_params += math.prod(f.get_slice(name).get_shape())
    return path, n_params


def _image_url(px: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(args, model_dir: Path, setting: Setting, port: int, log: Path):
    cmd = [
        args.vllm, "serve", str(model_dir), "--host", HOST, "--port", str(port),
        "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(max(args.concurrency_levels())),
        "--max-num-batched-tokens", str(args.max_model_len),
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--enforce-eager", "--disable-log-stats", "--seed", "0",
    ]  # fmt: skip
    if setting.keep is not None:
        from tokenprune_kernels.vllm import hf_overrides

        cmd += ["--hf-overrides", json.dumps(hf_overrides(setting.keep))]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
    f = log.open("w")
    proc = subprocess.Popen(
        cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return proc, cmd


def wait_ready(proc, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}); log: {log}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r,
        ):
            if r.status == 200:
                return
        time.sleep(2)
    raise TimeoutError(f"vllm serve not ready after {timeout} s; log: {log}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_request(port: int, model: str, image_url: str, question: str, args) -> float:
    """Send one streamed chat request; seconds until the first generated token arrives."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": True,
    }
    req = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(req, timeout=args.timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            choices = chunk.get("choices") or []
            lp = (choices[0].get("logprobs") or {}).get("content") if choices else None
            if ttft is None and lp:
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("no token received")
    return ttft


def run_batch(port, model, n, concurrency, seed0, args) -> tuple[list[float], float]:
    images = [_image_url(args.image_px, seed0 + i) for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [
            pool.submit(one_request, port, model, images[i], QUESTIONS[i % len(QUESTIONS)], args)
            for i in range(n)
        ]
        ttfts = [f.result() for f in futs]
    return ttfts, time.perf_counter() - t0


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def _venv_versions(vllm_exe: str) -> str:
    py = Path(vllm_exe).with_name("python")
    code = (
        "import vllm, torch, transformers; "
        "print(f'vllm {vllm.__version__}, torch {torch.__version__}, "
        "transformers {transformers.__version__}')"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    lines = [x for x in out.stdout.strip().splitlines() if x.startswith("vllm ")]
    return lines[-1] if lines else "unknown"


def _git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "tokenprune_kernels", "benchmarks/bench_vllm.py"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return (out.stdout.strip() or "unknown") + (
        " (+ local changes)" if dirty.stdout.strip() else ""
    )


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def to_markdown(cells: dict, settings, args, meta: dict) -> str:
    lines = [
        "# vLLM serving: unpruned vs tokenprune keep 0.5 / 0.25",
        "",
        f"- device: {meta['device']}",
        f"- {meta['versions']}, python {platform.python_version()}",
        f"- git commit: {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- model: random-weight Qwen2-VL, language model {meta['lm_params'] / 1e6:.0f} M params "
        f"(hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv "
        f"heads of dim {args.hidden // args.heads}, MLP {args.intermediate}), vision tower depth 2 "
        f"width 64; dtype {args.dtype}; image {args.image_px}x{args.image_px} px = "
        f"{(args.image_px // 16) ** 2} visual tokens; prompt {meta['prompt_tokens']} tokens "
        f"unpruned; {args.max_tokens} output tokens; training-free scores (no mapper)",
        f"- server: `vllm serve` on {HOST}, `--enforce-eager --max-num-seqs "
        f"{max(args.concurrency_levels())} --max-num-batched-tokens {args.max_model_len}`, "
        "prefix caching on (every request has its own image)",
        f"- requests per concurrency per round: {args.requests}; rounds: {args.rounds}; the "
        "settings interleaved round by round; TTFT = request sent -> first token received "
        "(streamed); req/s = requests / wall time of their batches",
        "",
        "| concurrency | setting | requests | TTFT p50 s | TTFT p90 s | req/s | TTFT p50 vs "
        "unpruned | req/s vs unpruned |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in args.concurrency_levels():
        base = cells[("unpruned", c)]
        b50 = percentile(base.ttft, 50)
        for s in settings:
            cell = cells[(s.name, c)]
            p50, p90 = percentile(cell.ttft, 50), percentile(cell.ttft, 90)
            lines.append(
                f"| {c} | {s.name} | {len(cell.ttft)} | {p50:.3f} | {p90:.3f} | {cell.rps:.3f} "
                f"| {b50 / p50:.2f}x lower | {cell.rps / base.rps:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(cells: dict, settings, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = args.concurrency_levels()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        xs = [j + i * width for j in range(len(levels))]
        p50 = [percentile(cells[(s.name, c)].ttft, 50) for c in levels]
        p90 = [percentile(cells[(s.name, c)].ttft, 90) for c in levels]
        axes[0].bar(xs, p50, width, label=s.name)
        up = [b - a for a, b in zip(p50, p90, strict=True)]
        axes[0].errorbar(xs, p50, yerr=[[0] * len(p50), up], fmt="none", ecolor="k", capsize=3)
        axes[1].bar(xs, [cells[(s.name, c)].rps for c in levels], width, label=s.name)
    for ax, title in zip(axes, ("TTFT p50 (bar) to p90 (whisker), s", "requests / s"), strict=True):
        ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"concurrency {c}" for c in levels])
        ax.set_title(title)
        ax.legend()
    fig.suptitle("vLLM serving, tokenprune plugin (random-weight Qwen2-VL)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--vllm",
        default=str(Path(sys.executable).with_name("vllm")),
        help="the vllm executable (of the vLLM venv)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/vllm_cpu.md")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--requests", default="1:3,4:8,8:16", help="concurrency:requests per round, comma separated"
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--port", type=int, default=18470, help="first port (one per setting)")
    p.add_argument("--timeout", type=float, default=900.0, help="per request and per startup, s")
    p.add_argument("--kv-cache-gb", type=int, default=2)
    args = p.parse_args(argv)
    pairs = [tuple(int(v) for v in x.split(":")) for x in args.requests.split(",")]
    args.plan = pairs
    args.concurrency_levels = lambda: [c for c, _ in pairs]
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    settings = [Setting("unpruned", None)] + [Setting(f"keep {k:g}", k) for k in args.keep]
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model_dir, lm_params = build_model_dir(work / "model", args)
    from tokenprune_kernels.grounded.model import build_processor

    proc_ = build_processor()
    text = proc_.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
        add_generation_prompt=True,
    )
    prompt_tokens = len(proc_.tokenizer(text)["input_ids"]) - 1 + (args.image_px // 16) ** 2
    servers = {}
    try:
        for i, s in enumerate(settings):
            port = args.port + i
            log = work / f"server_{i}.log"
            proc, cmd = start_server(args, model_dir, s, port, log)
            servers[s.name] = (proc, port)
            wait_ready(proc, port, args.timeout, log)
            one_request(port, str(model_dir), _image_url(args.image_px, 999), QUESTIONS[0], args)
            print(f"ready: {s.name} ({shlex.join(cmd)})", flush=True)
        cells = {(s.name, c): Cell(s.name, c, []) for s in settings for c, _ in args.plan}
        seed = 0
        for r in range(args.rounds):
            for c, n in args.plan:
                order = settings[r % len(settings) :] + settings[: r % len(settings)]
                for s in order:
                    proc, port = servers[s.name]
                    ttfts, wall = run_batch(port, str(model_dir), n, c, seed, args)
                    seed += n
                    cell = cells[(s.name, c)]
                    cell.ttft += ttfts
                    cell.wall += wall
                    p50 = statistics.median(ttfts)
                    print(f"round {r} c={c} {s.name}: p50 {p50:.3f} s, {n / wall:.3f} req/s")
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    meta = {
        "device": f"{_cpu_name()} ({os.cpu_count()} cores)",
        "versions": _venv_versions(args.vllm),
        "commit": _git_commit(),
        "command": shlex.join(["python3", *sys.argv]) if argv is None else shlex.join(argv),
        "lm_params": lm_params,
        "prompt_tokens": prompt_tokens,
    }
    md = to_markdown(cells, settings, args, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    plot(cells, settings, args, args.out.with_suffix(".png"))
    print(md)
    return md


if __name__ == "__main__":
    main()
