// The spread rule of the selection (docs/contract.md, stage c, "Spread rule"), shared by the CPU
// kernel (csrc/cpu/spread.cpp) and the CUDA kernel (csrc/cuda/spread.cu); the plain-PyTorch truth
// is tokenprune_kernels/reference.py:spread_suppressed_ref / spread_select_ref.
//
// Within one sample of n tokens, visited in the selection order (core::order_key desc, index
// asc), a token is accepted when no token accepted before it is its neighbour (same segment
// coords[:, 0], Chebyshev distance <= radius on (row, col)), else suppressed; the sample keeps
// the first k of (accepted in order, then suppressed in order).
//
// Everything here works on one sample: local indices 0..n-1, its coordinates as a contiguous
// int64 [n, 3] array (segment, row, col) strictly increasing in lexicographic order (raster order;
// the public op validates it), so the neighbours in one row form one contiguous run found by a
// binary search. The neighbour relation is symmetric, so the pass "pushes": an accepted token
// marks its neighbours blocked, and a token is suppressed exactly when it is blocked at its turn.
// After a complete pass the blocked flags are the suppressed flags (an accepted token is never a
// neighbour of another accepted one, so no accepted token gets blocked).
//
// Torch-free and header-only (TP_INLINE: `__host__ __device__` under nvcc).
#pragma once

#include "tp_math.h"

#include <cstdint>

namespace tokenprune::core {

constexpr int64_t kCoordMin = INT64_MIN;
constexpr int64_t kCoordMax = INT64_MAX;

// The ascending sort key of one token of a sample: key desc, then local index asc (n < 2^32).
TP_INLINE uint64_t spread_rank_key(uint32_t key, int64_t local) {
  return (static_cast<uint64_t>(~key) << 32) | static_cast<uint64_t>(local);
}

// a + b clamped to the int64 range (coordinates +- radius must not overflow).
TP_INLINE int64_t saturating_add(int64_t a, int64_t b) {
  if (b > 0 && a > kCoordMax - b) return kCoordMax;
  if (b < 0 && a < kCoordMin - b) return kCoordMin;
  return a + b;
}

// Whether coords[q] (a row of a [*, 3] int64 array) is lexicographically below (s, r, c).
TP_INLINE bool coord_below(const int64_t* coords, int64_t q, int64_t s, int64_t r, int64_t c) {
  const int64_t* p = coords + 3 * q;
  if (p[0] != s) return p[0] < s;
  if (p[1] != r) return p[1] < r;
  return p[2] < c;
}

// The first position q in [lo, hi) with coords[q] >= (s, r, c) (hi if none).
TP_INLINE int64_t coord_lower_bound(const int64_t* coords, int64_t lo, int64_t hi, int64_t s,
                                    int64_t r, int64_t c) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (coord_below(coords, mid, s, r, c)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Rows a token of row r can neighbour under `radius`: [row_lo, row_lo + row_span] (saturated).
struct SpreadRows {
  int64_t row_lo;
  uint64_t row_span;  // rows - 1 (unsigned: the span of a saturated range can exceed INT64_MAX)
};

TP_INLINE SpreadRows spread_rows(int64_t r, int64_t radius) {
  const int64_t lo = saturating_add(r, -radius);
  const int64_t hi = saturating_add(r, radius);
  return {lo, static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo)};
}

// Calls f(j) for every neighbour j != i of token i in row `row` of the sample (coords [n, 3]),
// ascending. Rows above i's own come before position i and rows below after it, which bounds the
// search; the run of a row is contiguous (raster order).
template <class F>
TP_INLINE void spread_row_neighbours(const int64_t* coords, int64_t n, int64_t i, int64_t radius,
                                     int64_t row, F&& f) {
  const int64_t s = coords[3 * i];
  const int64_t r = coords[3 * i + 1];
  const int64_t c = coords[3 * i + 2];
  const int64_t c_lo = saturating_add(c, -radius);
  const int64_t c_hi = saturating_add(c, radius);
  int64_t lo = 0;
  int64_t hi = n;
  if (row < r) {
    hi = i;
  } else if (row > r) {
    lo = i + 1;
  }
  for (int64_t q = coord_lower_bound(coords, lo, hi, s, row, c_lo); q < hi; ++q) {
    const int64_t* p = coords + 3 * q;
    if (p[0] != s || p[1] != row || p[2] > c_hi) break;
    if (q != i) f(q);
  }
}

// Whether token j is within Chebyshev distance `radius` of token i in the same segment.
TP_INLINE bool spread_is_neighbour(const int64_t* coords, int64_t i, int64_t j, int64_t radius) {
  const int64_t* a = coords + 3 * i;
  const int64_t* b = coords + 3 * j;
  return a[0] == b[0] && saturating_add(a[1], -radius) <= b[1] &&
         b[1] <= saturating_add(a[1], radius) && saturating_add(a[2], -radius) <= b[2] &&
         b[2] <= saturating_add(a[2], radius);
}

// How the neighbours of a token are found: one binary search per row of its window when the
// window has fewer rows than the sample has tokens, else one scan of the sample (a huge radius
// costs O(n), never O(radius)).
TP_INLINE bool spread_by_rows(const SpreadRows& rows, int64_t n) {
  return rows.row_span < static_cast<uint64_t>(n);
}

// Calls f(j) for every neighbour j != i of token i (each once, rows in order).
template <class F>
TP_INLINE void spread_neighbours(const int64_t* coords, int64_t n, int64_t i, int64_t radius,
                                 F&& f) {
  if (radius <= 0) return;  // distinct coordinates: no token is within distance 0 of another
  const SpreadRows rows = spread_rows(coords[3 * i + 1], radius);
  if (!spread_by_rows(rows, n)) {
    for (int64_t j = 0; j < n; ++j) {
      if (j != i && spread_is_neighbour(coords, i, j, radius)) f(j);
    }
    return;
  }
  for (uint64_t d = 0; d <= rows.row_span; ++d) {  // row_span < n: no wrap-around
    const int64_t row = static_cast<int64_t>(static_cast<uint64_t>(rows.row_lo) + d);
    spread_row_neighbours(coords, n, i, radius, row, f);
  }
}

// Neighbours a token can have at most under `radius` (distinct coordinates): (2r + 1)^2 - 1, for
// the radii a neighbour table is built for (0 <= radius <= kSpreadTableRadius).
constexpr int64_t kSpreadTableRadius = 3;
TP_INLINE int64_t spread_table_width(int64_t radius) {
  return (2 * radius + 1) * (2 * radius + 1) - 1;
}

// Writes the neighbours of token i (as spread_neighbours lists them) to out[0, width), then -1 up
// to width; writes no more than width (only invalid, repeated coordinates could have more).
template <class Index>
TP_INLINE void spread_neighbour_row(const int64_t* coords, int64_t n, int64_t i, int64_t radius,
                                    Index* out, int64_t width) {
  int64_t count = 0;
  spread_neighbours(coords, n, i, radius, [&](int64_t j) {
    if (count < width) out[count++] = static_cast<Index>(j);
  });
  for (; count < width; ++count) out[count] = static_cast<Index>(-1);
}

// The greedy pass of one sample, given its visiting order and a neighbour push. `next_free(p)`
// returns the first order position q >= p whose token is not blocked (n when there is none);
// `accept(q, a)` records that the token at order position q is the a-th accepted one;
// `block(q)` marks every neighbour of the token at position q blocked, and returns only once
// those marks are visible to next_free. Stops after k accepted tokens (the rest cannot be
// kept); returns how many were accepted (<= k). On the device all three may be collective over
// a warp: the loop's control flow depends only on their results.
template <class NextFree, class Accept, class Block>
TP_INLINE int64_t spread_accept(int64_t n, int64_t k, NextFree&& next_free, Accept&& accept,
                                Block&& block) {
  int64_t accepted = 0;
  if (k <= 0) return 0;
  for (int64_t q = next_free(0); q < n; q = next_free(q + 1)) {
    accept(q, accepted);
    if (++accepted == k) break;
    block(q);
  }
  return accepted;
}

}  // namespace tokenprune::core
