// The relevance weights of the adaptive keep rule (docs/contract.md, stage c, keep_mass), shared
// by the CPU kernel (csrc/cpu/select.cpp) and the CUDA kernel (csrc/cuda/select.cu); the
// plain-PyTorch truth is tokenprune_kernels/reference.py:mass_weights_ref.
//
// A sample's weights are integers, so their sums are exact and do not depend on the order a
// backend adds them in. A weight is 2^K times the token's relevance relative to the sample's
// top token, K = min(30, 53 - bit_length(n)) (n tokens: every sum of the sample stays below
// 2^53, exact in int64 and float64):
//   softmax   (logits):  floor(2^K * 2^(log2(e) * (x - max)))  with the exponential in integer
//                         arithmetic: log2 of the weight in Q30 fixed point (one float64
//                         subtraction and one multiplication, both correctly rounded), then a
//                         degree-10 Horner polynomial for 2^frac in int64;
//   normalize (masses):  floor(x * 2^(K - e)), 2^(e-1) <= max < 2^e (exact).
// Every floating-point step is one correctly rounded IEEE operation with no add after a multiply
// (nothing a compiler may contract into an FMA), so every backend gets the same integers.
//
// Torch-free and header-only (TP_INLINE: `__host__ __device__` under nvcc).
#pragma once

#include "tp_math.h"

#include <cmath>
#include <cstdint>

namespace tokenprune::core {

constexpr int kMassBits = 30;
// log2(e) * 2^30 as a float64 (the reference's LOG2E_Q30: math.log2(math.e) * 2**30).
constexpr double kLog2eQ30 = 0x1.71547652b82fep+30;
constexpr double kMinLog2Q30 = -64.0 * 1073741824.0;  // weights below 2^-64 of the top are 0

TP_INLINE bool is_nan(float x) {
  return (float_bits(x) & 0x7FFFFFFFu) > 0x7F800000u;
}
TP_INLINE bool is_pos_inf(float x) {
  return float_bits(x) == 0x7F800000u;
}
TP_INLINE bool is_neg_inf(float x) {
  return float_bits(x) == 0xFF800000u;
}

// K of a sample of n >= 1 tokens: min(30, 53 - bit_length(n)).
TP_INLINE int mass_bits(int64_t n) {
  int bits = 0;
  for (int64_t m = n; m > 0; m >>= 1) ++bits;
  return 53 - bits < kMassBits ? 53 - bits : kMassBits;
}

// 2^(frac / 2^30) in Q30 for frac in [0, 2^30): coefficients round(2^30 ln(2)^k / k!).
TP_INLINE int64_t exp2_q30(int64_t frac) {
  int64_t p = 8;
  p = 109 + ((p * frac) >> 30);
  p = 1419 + ((p * frac) >> 30);
  p = 16377 + ((p * frac) >> 30);
  p = 165394 + ((p * frac) >> 30);
  p = 1431680 + ((p * frac) >> 30);
  p = 10327387 + ((p * frac) >> 30);
  p = 59597083 + ((p * frac) >> 30);
  p = 257941248 + ((p * frac) >> 30);
  p = 744261118 + ((p * frac) >> 30);
  return 1073741824 + ((p * frac) >> 30);
}

// Weight of score x in a sample whose largest non-NaN score is mx (-inf when there is none),
// relevance = softmax of the scores. NaN and -inf weigh 0; when mx is +inf, the +inf scores weigh
// 2^k and the others 0.
TP_INLINE int64_t softmax_weight(float x, float mx, int k) {
  if (is_nan(x) || is_neg_inf(x)) return 0;
  if (is_pos_inf(mx)) return is_pos_inf(x) ? (int64_t{1} << k) : 0;
  double u = (static_cast<double>(x) - static_cast<double>(mx)) * kLog2eQ30;
  if (!(u >= kMinLog2Q30)) u = kMinLog2Q30;
  const int64_t y = static_cast<int64_t>(floor(u));  // in [-2^36, 0]
  const int64_t whole = y >> 30;                      // floor(y / 2^30), arithmetic shift
  const int64_t shift = kMassBits - k - whole;        // >= 0
  return shift >= 31 ? 0 : exp2_q30(y & ((int64_t{1} << 30) - 1)) >> shift;
}

// Weight of score x (finite and >= 0, or NaN) in a sample whose largest non-NaN score is mx,
// relevance = the scores normalised by their sum. NaN weighs 0; so does every score when mx <= 0.
TP_INLINE int64_t normalized_weight(float x, float mx, int k) {
  if (is_nan(x) || !(mx > 0.0f)) return 0;
  int e = 0;
  frexp(static_cast<double>(mx), &e);
  return static_cast<int64_t>(floor(ldexp(static_cast<double>(x), k - e)));
}

TP_INLINE int64_t mass_weight(float x, float mx, int k, bool softmax) {
  return softmax ? softmax_weight(x, mx, k) : normalized_weight(x, mx, k);
}

}  // namespace tokenprune::core
