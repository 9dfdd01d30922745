"""The backends a parity test runs over, from the op table (imported by name: pytest puts this
folder on sys.path)."""

from __future__ import annotations

import pytest

from tokenprune_kernels.testing import backend_cases


def backend_params(op: str) -> list:
    """``(backend_name, device)`` params for every backend the op table lists for ``op``, those
    that cannot run here skipped with the reason (``ids``: the backend's name)."""
    return [
        pytest.param(name, device, id=name, marks=[pytest.mark.skip(reason=why)] if why else [])
        for name, device, why in backend_cases(op)
    ]


def runnable(op: str, device: str = "cpu") -> list[str]:
    """The backends that run ``op`` on ``device`` here."""
    return [name for name, dev, why in backend_cases(op) if dev == device and why is None]
