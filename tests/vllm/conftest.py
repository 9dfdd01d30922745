"""tests/vllm: the helpers of this folder import as top-level modules (``_tiny``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
