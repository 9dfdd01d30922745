"""Schemas of every public op in ``torch.ops.tokenprune``, as the stage modules define them.

Each public op's schema is written once, in its stage module (``ops/<stage>.py``, beside its
implementation and fake); this is the collected view, name -> schema without the namespace. The
private compiled ops' schemas are in ``csrc/torch_bindings.cpp`` only. Layout and rules of the
arguments: ``docs/contract.md``.
"""

from __future__ import annotations

import tokenprune_kernels.ops  # noqa: F401  (defines every public op)
from tokenprune_kernels.ops._library import NAMESPACE, SCHEMAS

PUBLIC_SCHEMAS: dict[str, str] = dict(SCHEMAS)

__all__ = ["NAMESPACE", "PUBLIC_SCHEMAS"]
