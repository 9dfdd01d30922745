// The streaming (online) form of the attention softmax, on top of softmax.h: the running row
// statistics that the CUDA instruction-attention kernel folds key tile after key tile, and the
// merge of the partial statistics of several key splits. Torch-free, host and device.
//
// Statistics live in the RAW logit domain: `max` is the largest q . k_j (unscaled) of the keys
// folded so far (-inf when none), `sum` is sum_j 2^(scale_log2 * (s_j - max)) with scale_log2 =
// softmax scale * log2(e). A key's softmax value is then softmax_tile_value(s_j, max, scale_log2)
// / sum (softmax.h), the same arithmetic as a tile's e_j. Keeping the raw max (rather than the
// scaled one) means no division by the scale anywhere.
#pragma once

#include "softmax.h"

namespace tokenprune::core {

// Folds a tile (or a split) with raw max `tile_max` (-inf when the row sees none of its keys) and
// sum `tile_sum` (of 2^(scale_log2 * (s_j - softmax_shift(tile_max))) over the keys it sees) into
// the running (row_max, row_sum). Either side may be empty (-inf, 0); both empty stays (-inf, 0).
// Branch-free: both sides are rescaled to the new shift (0 when both are empty).
TP_INLINE void softmax_fold(float& row_max, float& row_sum, float tile_max, float tile_sum,
                            float scale_log2) {
  const float m = row_max > tile_max ? row_max : tile_max;
  const float shift = softmax_shift(m);
  row_sum = row_sum * softmax_tile_value(row_max, shift, scale_log2) +
            tile_sum * softmax_tile_value(tile_max, shift, scale_log2);
  row_max = m;
}

// The softmax probability of a key with raw logit s in a row with final statistics
// (row_max, row_sum); 0 for a row that saw no key (row_sum == 0).
TP_INLINE float softmax_prob(float s, float row_max, float row_sum, float scale_log2) {
  return row_sum > 0.0f ? softmax_tile_value(s, row_max, scale_log2) / row_sum : 0.0f;
}

}  // namespace tokenprune::core
