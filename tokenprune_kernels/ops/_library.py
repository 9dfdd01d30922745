"""The ``tokenprune`` op library: schemas defined once, implementations and fakes registered.

When the compiled extension loaded, its ``TORCH_LIBRARY`` block already defined every schema and
this module only adds the Python implementations (which route between backends) and the fakes.
Without it, the same schemas are defined here from :mod:`tokenprune_kernels.ops.schemas`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenprune_kernels import _extension  # noqa: F401  (loads _C, which defines the schemas)
from tokenprune_kernels.ops.schemas import NAMESPACE, PUBLIC_SCHEMAS

LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}", "")
    except RuntimeError:
        return False
    return True


for _name, _schema in PUBLIC_SCHEMAS.items():
    if not _defined(_name):
        LIB.define(_schema)


def register(name: str, impl: Callable, fake: Callable) -> None:
    """Register ``impl`` for CPU and CUDA tensors and ``fake`` for fake/meta tensors."""
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_kernel(qualname, ("cpu", "cuda"), impl, lib=LIB)
    torch.library.register_fake(qualname, fake, lib=LIB)
