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


# --------------------------------------------------------------------------------------------
# spread.h: the neighbour runs and the greedy pass of the spread rule, on one sample

SPREAD_PROGRAM = r"""
#include "order_key.h"
#include "spread.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace tokenprune::core;

// Per case: "n radius k" then n lines "segment row col score_bits". Prints n lines of neighbours
// (spread_neighbours, in call order), then the kept local indices in pass order (the first k of
// accepted then suppressed, as the kernels take them).
int main() {
  long long n, radius, k;
  while (std::scanf("%lld %lld %lld", &n, &radius, &k) == 3) {
    std::vector<int64_t> xy(3 * n);
    std::vector<uint32_t> keys(n);
    for (long long i = 0; i < n; ++i) {
      long long s, r, c;
      unsigned bits;
      std::scanf("%lld %lld %lld %x", &s, &r, &c, &bits);
      xy[3 * i] = s, xy[3 * i + 1] = r, xy[3 * i + 2] = c;
      float x;
      std::memcpy(&x, &bits, 4);
      keys[i] = order_key(x);
    }
    for (long long i = 0; i < n; ++i) {
      spread_neighbours(xy.data(), n, i, radius, [](int64_t j) { std::printf(" %lld", (long long)j); });
      if (radius >= 1 && radius <= kSpreadTableRadius) {  // the CUDA kernel's table row
        std::vector<int> row(spread_table_width(radius));
        spread_neighbour_row(xy.data(), n, i, radius, row.data(), spread_table_width(radius));
        std::printf(" |");
        for (int j : row) std::printf(" %d", j);
      }
      std::printf("\n");
    }
    std::vector<uint64_t> order(n);
    for (long long i = 0; i < n; ++i) order[i] = spread_rank_key(keys[i], i);
    std::sort(order.begin(), order.end());
    auto token = [&](int64_t q) { return static_cast<int64_t>(order[q] & 0xFFFFFFFFu); };
    std::vector<char> blocked(n, 0);
    std::vector<int64_t> kept;
    auto next_free = [&](int64_t q) {
      while (q < n && blocked[token(q)]) ++q;
      return q;
    };
    auto accept = [&](int64_t q, int64_t a) {
      if (a != static_cast<int64_t>(kept.size())) std::printf("bad accept count\n");
      kept.push_back(token(q));
    };
    auto block = [&](int64_t q) {
      spread_neighbours(xy.data(), n, token(q), radius, [&](int64_t j) { blocked[j] = 1; });
    };
    const int64_t accepted = spread_accept(n, k, next_free, accept, block);
    for (int64_t q = 0; q < n && static_cast<int64_t>(kept.size()) < k; ++q) {
      if (blocked[token(q)]) kept.push_back(token(q));
    }
    std::printf("%lld:", (long long)accepted);
    for (int64_t i : kept) std::printf(" %lld", (long long)i);
    std::printf("\n");
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def spread_program(tmp_path_factory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    out = tmp_path_factory.mktemp("spread_core")
    src = out / "spread.cpp"
    src.write_text(SPREAD_PROGRAM)
    exe = out / "spread"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'core'}"]
    result = subprocess.run([*cmd, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


def spread_coords(gen, n: int) -> list[tuple[int, int, int]]:
    """``n`` strictly increasing (segment, row, col): a random subset of two ragged grids."""
    width = int(torch.randint(1, 9, (1,), generator=gen))
    pool = [(s, r, c) for s in (-3, 4) for r in range(-2, 2 * n // width + 2) for c in range(width)]
    pick = sorted(torch.randperm(len(pool), generator=gen)[:n].tolist())
    return [pool[p] for p in pick]


def near(a, b, radius: int) -> bool:
    return a[0] == b[0] and abs(a[1] - b[1]) <= radius and abs(a[2] - b[2]) <= radius


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 50, 2**63 - 1])
def test_spread_core_neighbours_and_pass(spread_program, radius, gen):
    """spread_neighbours lists exactly the pairwise neighbours, ascending, each once (rows by
    binary search, or one scan for a window taller than the sample); the pass keeps what the
    reference's greedy rule keeps, stopping at the k-th accepted token."""
    from tokenprune_kernels.reference import spread_suppressed_ref

    cases, text = [], []
    for n in (1, 2, 7, 40, 131):
        coords = spread_coords(gen, n)
        if radius == 2**63 - 1 and n > 2:  # coordinates near the int64 limits: saturation
            coords[-1] = (coords[-1][0], 2**63 - 1, 2**63 - 1)
            coords[0] = (coords[0][0], -(2**63), -(2**63))
        scores = torch.randint(-3, 4, (n,), generator=gen).float()
        scores[torch.randperm(n, generator=gen)[: n // 5]] = math.nan
        for k in sorted({0, 1, max(1, n // 3), n - 1, n}):
            cases.append((coords, scores, k))
            rows = "".join(
                f"{s} {r} {c} {bits(float(x)):x}\n"
                for (s, r, c), x in zip(coords, scores.tolist(), strict=True)
            )
            text.append(f"{n} {radius} {k}\n{rows}")
    out = run(spread_program, "".join(text))
    line = 0
    for coords, scores, k in cases:
        n = len(coords)
        for i in range(n):
            listed, _, table_row = out[line].partition("|")
            line += 1
            got = [int(j) for j in listed.split()]
            want = [
                j for j in range(n) if j != i and radius > 0 and near(coords[i], coords[j], radius)
            ]
            assert got == want, (i, coords[i])
            if 1 <= radius <= 3:  # the table row: the same neighbours, -1 padded
                width = (2 * radius + 1) ** 2 - 1
                assert [int(j) for j in table_row.split()] == want + [-1] * (width - len(want))
        head, _, tail = out[line].partition(":")
        line += 1
        kept = [int(j) for j in tail.split()]
        values = scores.tolist()
        order = sorted(
            range(n), key=lambda i: (1, 0.0, i) if math.isnan(values[i]) else (0, -values[i], i)
        )
        acc: list[int] = []
        for i in order:  # the greedy rule, pairwise
            if not any(near(coords[i], coords[j], radius) for j in acc):
                acc.append(i)
        assert kept == (acc + [i for i in order if i not in acc])[:k], (n, k)
        assert int(head) == min(k, len(acc))
        if radius < 2**62:  # the reference enumerates the (2r + 1)^2 window: small radii only
            xy = torch.tensor(coords, dtype=torch.int64)
            sup = spread_suppressed_ref(scores, torch.tensor([0, n]), xy, radius).tolist()
            assert [i for i in order if not sup[i]] == acc
