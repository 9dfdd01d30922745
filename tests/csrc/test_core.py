"""The host/device numeric core of csrc/core, run on the CPU: a tiny program that includes the
headers the CUDA kernels include (order_key.h, online_softmax.h) is compiled with the host C++
compiler and its results are compared with the Python reference."""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from tokenprune_kernels.reference import score_keys_ref

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
#include "order_key.h"
#include "online_softmax.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace tokenprune::core;

static float from_bits(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }

int main() {
  char what[16];
  while (std::scanf("%15s", what) == 1) {
    if (std::string(what) == "key") {  // key <bits>: order_key of one float
      unsigned bits;
      std::scanf("%x", &bits);
      std::printf("%u\n", order_key(from_bits(bits)));
    } else {  // row <scale> <n> <tile> s_0 .. s_{n-1}: fold tile by tile, print max sum probs
      float scale;
      int n, tile;
      std::scanf("%f %d %d", &scale, &n, &tile);
      std::vector<float> s(n);
      for (int i = 0; i < n; ++i) std::scanf("%f", &s[i]);
      const float scale_log2 = scale * kLog2e;  // softmax.h works in base 2, as the kernel does
      float row_max = kNegInf, row_sum = 0.0f;
      for (int t = 0; t < n; t += tile) {
        const int end = t + tile < n ? t + tile : n;
        float tile_max = kNegInf;
        for (int i = t; i < end; ++i) tile_max = s[i] > tile_max ? s[i] : tile_max;
        const float shift = softmax_shift(tile_max);
        float tile_sum = 0.0f;
        for (int i = t; i < end; ++i) tile_sum += softmax_tile_value(s[i], shift, scale_log2);
        softmax_fold(row_max, row_sum, tile_max, tile_sum, scale_log2);
      }
      std::printf("%a %a", row_max, row_sum);
      for (int i = 0; i < n; ++i) std::printf(" %a", softmax_prob(s[i], row_max, row_sum, scale_log2));
      std::printf("\n");
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def core_program(tmp_path_factory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    out = tmp_path_factory.mktemp("core")
    src = out / "core.cpp"
    src.write_text(PROGRAM)
    exe = out / "core"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'core'}"]
    result = subprocess.run([*cmd, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


def run(exe: Path, text: str) -> list[str]:
    result = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    return result.stdout.split("\n")[:-1]


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def test_order_key_equals_the_reference(core_program, gen):
    specials = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4e38]
    values = torch.tensor(specials + torch.randn(200, generator=gen).mul(1e3).tolist())
    raw = values.view(torch.int32).tolist()
    raw += [0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF]  # NaNs of both signs and payloads
    text = "".join(f"key {b & 0xFFFFFFFF:x}\n" for b in raw)
    got = [int(x) for x in run(core_program, text)]
    as_floats = torch.tensor([b & 0xFFFFFFFF for b in raw], dtype=torch.int64)
    want = score_keys_ref(as_floats.to(torch.int32).view(torch.float32)).tolist()
    assert got == want
    # The order: NaN lowest, -inf next, -0 == +0, larger floats larger keys.
    key = dict(zip([bits(x) for x in specials], got[: len(specials)], strict=False))
    assert key[bits(math.nan)] == 0 < key[bits(-math.inf)] < key[bits(-1.0)] < key[bits(0.0)]
    assert key[bits(-0.0)] == key[bits(0.0)] < key[bits(1e-45)] < key[bits(math.inf)]


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_online_softmax_fold_equals_a_float64_softmax(core_program, tile, gen):
    rows = []
    cases = []
    for n in (1, 2, 7, 64, 129):
        # float32 values (the program reads floats): the float64 truth starts from the same ones
        scale = float(torch.rand(1, generator=gen) + 0.05)
        s = (torch.randn(n, generator=gen) * 6).tolist()
        if n > 3:
            s[1] = -math.inf  # a key the row does not see
        cases.append((scale, s))
        rows.append(f"row {scale!r} {n} {tile} " + " ".join(repr(x) for x in s) + "\n")
    cases.append((0.5, [-math.inf] * 5))  # a row that sees nothing: (-inf, 0), all zeros
    rows.append("row 0.5 5 " + str(tile) + " " + " ".join(["-inf"] * 5) + "\n")
    out = run(core_program, "".join(rows))
    for (scale, s), line in zip(cases, out, strict=True):
        got = [float.fromhex(x) for x in line.split()]
        row_max, row_sum, probs = got[0], got[1], got[2:]
        finite = [x for x in s if x != -math.inf]
        if not finite:
            assert row_max == -math.inf and row_sum == 0 and probs == [0.0] * len(s)
            continue
        m = max(finite)
        z = sum(math.exp(scale * (x - m)) for x in finite)
        assert row_max == pytest.approx(m, rel=0, abs=0)
        assert row_sum == pytest.approx(z, rel=2e-6)
        want = [math.exp(scale * (x - m)) / z if x != -math.inf else 0.0 for x in s]
        assert probs == pytest.approx(want, rel=5e-6, abs=1e-12)
