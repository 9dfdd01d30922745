"""NVTX ranges around each stage, visible in Nsight Systems (``nsys profile``).

``with stage_range("tokenprune.select"):`` pushes an NVTX range when CUDA is usable and costs a
boolean check otherwise (CPU, the Triton interpreter, tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def stage_range(name: str, device: torch.device | str | None = None) -> Iterator[None]:
    """An NVTX range named ``name`` around the block when ``device`` is a CUDA device.

    Args:
        name: the range's label, ``"tokenprune.<stage>"`` by convention.
        device: the tensors' device; None means "whenever CUDA is available".
    """
    if device is not None and torch.device(device).type != "cuda":
        yield
        return
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
