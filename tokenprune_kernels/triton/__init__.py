"""Triton kernels: the ``triton`` backend of the tokenprune ops.

Each stage lives in its own module, named as its C++ counterpart in ``csrc/``, and exposes host
functions that take the arguments the op layer has already validated (``tokenprune_kernels.ops``)
in the stage's calling convention (``tokenprune_kernels.backend.CONVENTIONS``) and launch the
kernels:

    ``attention``  :func:`instruction_attention_triton` (stage a)
    ``mapper``     :func:`mapper_forward_triton` (stage b)
    ``select``     :func:`select_topk_triton` (stage c)
    ``gather``     :func:`gather_kept_triton`, :func:`merge_kept_triton` (stage d), and
                   :func:`select_gather_triton`, :func:`select_merge_triton` (c and d fused)

This package exports what the op table names (``backend.triton_functions()``).
The modules are imported on first use (``triton`` and its JIT are not loaded with the package).
Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before the
first import (the interpreter; slow, for tests). Every kernel also lowers for Hopper without a GPU:
see :mod:`tokenprune_kernels.triton.lowering`.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenprune_kernels import backend

_EXPORTS = backend.triton_functions()  # host function -> module, from the op table

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
