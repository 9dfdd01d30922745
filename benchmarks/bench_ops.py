"""pytest-benchmark cases for every op on every backend available here (Qwen2-VL-7B shapes).

    python -m pytest benchmarks/bench_ops.py --benchmark-only [--benchmark-json out.json]
    python -m pytest benchmarks/bench_ops.py --benchmark-only -k "select_topk and 16384"

Same cases as ``tokenprune bench`` (tokenprune_kernels/bench.py); CUDA cases run when a GPU is
visible (CUDA timings here are wall times with a synchronize per round: prefer
``tokenprune bench --device cuda``, which uses CUDA events).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from tokenprune_kernels import backend
from tokenprune_kernels.bench import (
    BENCH_OPS,
    KEEP_RATIOS,
    N_VISUAL,
    STAGE_KEEP_INDEPENDENT,
    backends_for,
    iter_cases,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params():
    for device, n, op in itertools.product(DEVICES, N_VISUAL, BENCH_OPS):
        ratios = (None,) if op in STAGE_KEEP_INDEPENDENT else KEEP_RATIOS
        for ratio in ratios:
            for name in backends_for(op, device):
                keep = "-" if ratio is None else f"{ratio:g}"
                case_id = f"{op}-{n}-keep{keep}-{name}-{device}"
                yield pytest.param(device, n, op, ratio, name, id=case_id)


@functools.cache
def _cases(device: str, n: int):
    return {(c.op, c.keep_ratio, c.backend): c for c in iter_cases(device, n_visual=(n,))}


@pytest.mark.parametrize("device,n,op,ratio,name", list(_params()))
def test_op(benchmark, device, n, op, ratio, name):
    case = _cases(device, n)[(op, ratio, name)]
    counter = itertools.count()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        case.fn(next(counter))
        sync()

    benchmark.group = f"{op} N_v={n} keep={ratio}"
    benchmark.extra_info.update({"device": device, "backend": name})
    with backend.use_backend(name), torch.no_grad():
        benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=2)
