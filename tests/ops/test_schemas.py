"""The op library against the op table: public schemas defined once in Python, private ones once
in C++, and every implementation the table names callable with its stage's convention."""

from __future__ import annotations

import inspect

import pytest
import torch

from tokenprune_kernels import _extension, backend
from tokenprune_kernels.ops.schemas import NAMESPACE, PUBLIC_SCHEMAS

ENTRIES = [
    (stage, name, impl)
    for table in (backend.OPS, {"+".join(pair): impls for pair, impls in backend.FUSED.items()})
    for stage, impls in table.items()
    for name, impl in impls.items()
]


def needs_extension() -> None:
    if not _extension.available():
        pytest.skip(f"compiled extension not built: {_extension.load_error()}")


@pytest.mark.parametrize("name", sorted(PUBLIC_SCHEMAS))
def test_public_schema(name):
    op = getattr(torch.ops.tokenprune, name).default
    assert str(op._schema) == f"{NAMESPACE}::{PUBLIC_SCHEMAS[name]}"


def test_every_op_is_in_the_table():
    assert set(PUBLIC_SCHEMAS) == set(backend.PUBLIC_OPS)
    assert set(backend.PUBLIC_OPS) | set(backend.RUN_BY) == set(
        backend.STAGE_OPS + backend.COMPOSITE_OPS
    )
    assert set(backend.RUN_BY.values()) <= set(PUBLIC_SCHEMAS)
    assert set(backend.CONVENTIONS) == {e[0] for e in ENTRIES}
    for stages in backend.COMPOSITES.values():
        assert set(stages) <= set(backend.OPS)


def test_the_extension_defines_exactly_the_tables_private_ops():
    """C++ defines the private ops and only them; the table names each, and those of ``cpp``
    entries have a CPU kernel."""
    needs_extension()
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith(f"{NAMESPACE}::")}  # fmt: skip
    assert {n for n in names if n.startswith("_")} == set(backend.kernels())
    assert {n for n in names if not n.startswith("_")} == set(PUBLIC_SCHEMAS)
    for name in backend.kernels("cpp"):
        assert _extension.has_kernel(name, "CPU"), name


@pytest.mark.parametrize(("stage", "backend_name", "impl"), ENTRIES,
                         ids=[f"{e[0]}-{e[1]}" for e in ENTRIES])  # fmt: skip
def test_entry_takes_the_stage_convention(stage, backend_name, impl):
    """Every implementation the table names takes its stage's arguments, by name and in order
    (a private op: its schema; an adapter taking ``*args`` must then name a kernel)."""
    want = list(backend.CONVENTIONS[stage])
    assert (backend_name in ("cpp", "cuda")) == bool(impl.kernel)
    if impl.kernel:
        assert impl.fake and callable(backend.resolve(impl.fake))
        if _extension.defined(impl.kernel):
            schema = getattr(torch.ops.tokenprune, impl.kernel).default._schema
            names, expected = [a.name for a in schema.arguments], want + list(impl.hints)
            if impl.call:  # an adapter may pass them in another order (the fused CUDA ops)
                assert sorted(names) == sorted(expected)
            else:  # called as is: the convention, then the hints it takes
                assert names == expected
    if not impl.call:
        assert impl.kernel
        return
    if backend_name == "triton":
        pytest.importorskip("triton")
    params = inspect.signature(backend.resolve(impl.call)).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        assert impl.kernel, "an adapter taking *args must name the kernel it calls"
        return
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert positional[: len(want)] == want
    assert set(impl.hints) <= keyword
