// The softmax arithmetic of the instruction attention (stage a, docs/contract.md), torch-free.
//
// A row (one query of one head) has the logits x_j = scale * q . k_j of the keys it sees, here in
// base 2: x_j = scale * log2(e) * q . k_j, so that softmax_j = 2^(x_j - M) / L with
// M = max_j x_j and L = sum_j 2^(x_j - M). The keys are cut into tiles; a tile t gives partial
// statistics (m_t, l_t) = (max over the tile, sum over the tile of 2^(x_j - m_t)) and the
// tile-relative values e_j = 2^(x_j - m_t). Once every tile is done,
//     M = max_t m_t,   L = sum_t l_t * 2^(m_t - M),   softmax_j = e_j * w_t,
//     w_t = 2^(m_t - M) / L,
// so a tile's stored e_j need one weight per (row, tile), not a second pass over the keys.
// A key a row does not see has x_j = -inf: e_j = 0, and a tile the row sees no key of has
// m_t = -inf, l_t = 0, w_t = 0.
#pragma once

#include "tp_math.h"

namespace tokenprune::core {

constexpr float kNegInf = -__builtin_huge_valf();

// The shift a tile uses for its e_j: its max m_t, or 0 when the row sees none of its keys
// (m_t = -inf would give exp(-inf - -inf) = NaN).
TP_INLINE float softmax_shift(float tile_max) {
  return tile_max == kNegInf ? 0.0f : tile_max;
}

// e_j = 2^(scale_log2 * (s_j - s_max)) for a raw logit s_j (q . k_j, unscaled), the tile's raw
// maximum shift s_max (softmax_shift of the raw max; a scale > 0 keeps the argmax) and
// scale_log2 = softmax scale * log2(e).
TP_INLINE float softmax_tile_value(float s, float s_max, float scale_log2) {
  return exp2_f32((s - s_max) * scale_log2);
}

// A tile's contribution to L, l_t * 2^(m_t - M), for the row maximum M (finite).
TP_INLINE float softmax_rescaled_sum(float tile_max, float tile_sum, float row_max) {
  return tile_sum * exp2_f32(tile_max - row_max);
}

// The weight w_t = 2^(m_t - M) / L of the tile's e_j in the row's softmax.
TP_INLINE float softmax_tile_weight(float tile_max, float row_max, float row_sum) {
  return exp2_f32(tile_max - row_max) / row_sum;
}

}  // namespace tokenprune::core
