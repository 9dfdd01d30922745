"""The compiled extension ``tokenprune_kernels._C``, loaded once, here and nowhere else.

Loading it runs its ``TORCH_LIBRARY`` registrations (every schema, the CPU kernels and, in a CUDA
build, the CUDA kernels). Without it the package still works on the reference path and says so
once. Nothing here touches a device.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("tokenprune_kernels")

_ext = None
_load_error: str | None = None
_warned = False

try:  # pragma: no cover - which branch runs depends on the build
    if os.environ.get("TOKENPRUNE_DISABLE_EXT", "") == "1":
        raise ImportError("disabled by TOKENPRUNE_DISABLE_EXT=1")
    _ext = importlib.import_module("tokenprune_kernels._C")
except (ImportError, OSError) as exc:  # OSError: an ABI mismatch surfaces as a dlopen failure
    _ext = None
    _load_error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when the compiled extension loaded."""
    return _ext is not None


def load_error() -> str | None:
    """Why the extension did not load (None when it did)."""
    return _load_error


def path() -> str | None:
    """File the extension was loaded from."""
    return getattr(_ext, "__file__", None)


def defined(op: str) -> bool:
    """Whether ``tokenprune::<op>`` exists (a private op exists only when the extension loaded)."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"tokenprune::{op}", "")
    except RuntimeError:
        return False
    return True


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``tokenprune::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if _ext is None:
        return False
    try:
        return bool(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenprune::{op}", dispatch_key)
        )
    except RuntimeError:
        return False


def warn_if_missing() -> None:
    """Log once that the reference path is in use because the extension is missing."""
    global _warned
    if _ext is None and not _warned:
        _warned = True
        logger.warning(
            "tokenprune_kernels: compiled extension not available (%s); using the plain-PyTorch "
            "reference path. Build it with `pip install --no-build-isolation -e .`.",
            _load_error,
        )
