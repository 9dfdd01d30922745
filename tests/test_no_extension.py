"""Without the compiled extension the package defines the schemas itself, runs the reference,
and says so once (checked in a fresh interpreter with TOKENPRUNE_DISABLE_EXT=1)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import torch
import tokenprune_kernels as tp
from tokenprune_kernels import _extension, backend
from tokenprune_kernels.ops.schemas import PUBLIC_SCHEMAS
from tokenprune_kernels.testing import make_inputs

assert not _extension.available(), "extension loaded despite TOKENPRUNE_DISABLE_EXT=1"
for name, schema in PUBLIC_SCHEMAS.items():
    assert str(getattr(torch.ops.tokenprune, name).default._schema) == "tokenprune::" + schema
assert not hasattr(torch.ops.tokenprune, "_select_topk")
table = backend.describe("cpu")
assert all(table[op] == "ref" for op in backend.STAGE_OPS), table
x = make_inputs([[("t", 2), ("v", 9), ("q", 3)], [("t", 1), ("v", 4), ("q", 2)]])
for _ in range(3):
    out = tp.prune_and_merge(
        x.q, x.k, x.cu_seqlens_q, x.cu_seqlens_k, x.inputs_embeds, x.position_ids,
        x.cu_seqlens, x.visual_embeds, x.visual_idx, x.cu_seqlens_v, keep_ratio=0.5,
    )
torch.library.opcheck(
    torch.ops.tokenprune.select_topk.default, (out[5], x.cu_seqlens_v, 0.5, None)
)
print("kept", out[4].tolist())
"""


def test_reference_path_without_extension():
    env = dict(os.environ, TOKENPRUNE_DISABLE_EXT="1", TOKENPRUNE_BACKEND="auto")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("kept ")
    assert proc.stderr.count("compiled extension not available") == 1, proc.stderr
    assert "TOKENPRUNE_DISABLE_EXT=1" in proc.stderr
