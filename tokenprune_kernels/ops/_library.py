"""The ``tokenprune`` op library: :func:`define` registers a public op, its implementation and
its fake; :func:`register_kernel_fakes` the fakes of the compiled extension's private ops.

Public ops are defined here, in Python, each by its stage module (``ops/<stage>.py``) beside its
implementation and fake. Private ops (``_select_topk``, ...) are defined once, in C++
(``csrc/torch_bindings.cpp``), when the compiled extension loads; the op table
(:data:`tokenprune_kernels.backend.OPS`) names them and their fakes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenprune_kernels import _extension, backend

NAMESPACE = "tokenprune"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

#: Public op name -> schema (without the namespace), in definition order.
SCHEMAS: dict[str, str] = {}


def define(schema: str, impl: Callable, fake: Callable) -> None:
    """Define the public op ``schema``; ``impl`` runs for CPU and CUDA tensors, ``fake`` for
    fake/meta tensors (shapes, dtypes and the static argument checks only)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    SCHEMAS[name] = schema
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_kernel(qualname, ("cpu", "cuda"), impl, lib=LIB)
    torch.library.register_fake(qualname, fake, lib=LIB)


def register_kernel_fakes() -> None:
    """Register the fake of every private op the op table names (those the extension defines:
    without it they do not exist)."""
    if not _extension.available():
        return
    for op, fake in backend.kernels().items():
        if _extension.defined(op):
            torch.library.register_fake(f"{NAMESPACE}::{op}", backend.resolve(fake), lib=LIB)
