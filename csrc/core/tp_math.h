// Scalar float32 math shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// Torch-free on purpose: nvcc compiles these headers without torch, and the CPU tests exercise
// the very code a CUDA kernel includes. Every function is branch-free (selects, no early
// returns), so a loop that calls it over contiguous floats vectorises (see TP_CPU_CLONES).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TP_HOST_DEVICE __host__ __device__
#else
#define TP_HOST_DEVICE
#endif

// The shared functions below are always inlined: a CPU loop cloned per ISA level (TP_CPU_CLONES)
// must get them compiled for its level, not call a baseline x86-64 copy.
#if defined(__CUDACC__)
#define TP_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define TP_INLINE inline __attribute__((always_inline))
#else
#define TP_INLINE inline
#endif

// Compiles a CPU function once per x86-64 level (AVX-512, AVX2 + FMA, baseline) and picks the
// best at load time: the extension is built for the generic x86-64 target (a wheel must run on
// any x86-64 CPU), so without this its loops would be SSE2-only. Empty elsewhere.
#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TP_CPU_CLONES
#endif

namespace tokenprune::core {

// The bits of a float and back: CUDA's intrinsics on the device, a copy of the bytes (what
// std::bit_cast does) on the host.
#if defined(__CUDA_ARCH__)
TP_INLINE uint32_t float_bits(float x) { return __float_as_uint(x); }
TP_INLINE float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
template <class To, class From>
TP_INLINE To bit_copy(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy copies between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}
TP_INLINE uint32_t float_bits(float x) { return bit_copy<uint32_t>(x); }
TP_INLINE float bits_float(uint32_t u) { return bit_copy<float>(u); }
#endif

// 2^x in float32: at most 2 ulp from the exact value for x in [-126, 127] (measured 1.6 ulp),
// 0 below (where the exact value is a denormal, < 1.2e-38), +inf above, NaN for NaN. x = n + f
// with n = round(x), |f| <= 1/2, then a degree-6 polynomial fitted to 2^f for minimal relative
// error (max 2e-9 in exact arithmetic), scaled by 2^n through the exponent bits. exp2(-inf) is
// 0, which the masked softmax relies on. e^y is exp2_f32(y * log2(e)): the product's rounding
// adds a relative error of |y| * 6e-8.
TP_INLINE float exp2_f32(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMin = -126.0f;
  constexpr float kMax = 127.0f;
  float xc = x < kMin ? kMin : x;  // comparisons are false for NaN: it flows through
  xc = xc > kMax ? kMax : xc;
  const float shifted = xc + kRound;
  const float f = xc - (shifted - kRound);
  float p = 1.534581097e-04f;
  p = p * f + 1.339993090e-03f;
  p = p * f + 9.618489072e-03f;
  p = p * f + 5.550328642e-02f;
  p = p * f + 2.402264625e-01f;
  p = p * f + 6.931471825e-01f;
  p = p * f + 1.0f;
  const uint32_t n = float_bits(shifted) - 0x4B400000u;  // round(x), two's complement
  float y = p * bits_float((n + 127u) << 23);          // 2^n, n in [-126, 127]
  y = x < kMin ? 0.0f : y;
  y = x > kMax ? bits_float(0x7F800000u) : y;
  return y;
}

constexpr float kLog2e = 1.44269504088896341f;

// Lanes of the fixed-order sums (dot_fixed, layer_norm_moments): the additions happen in the
// same order whatever vector width the compiler picks, so a result does not depend on the
// buffer alignment or on the thread that computes it.
constexpr int kSumLanes = 16;

// The sum of the kSumLanes lanes as a fixed tree (lane u += lane u + w for w = 8, 4, 2, 1): four
// dependent steps instead of fifteen.
TP_INLINE float lane_total(float* lanes) {
  for (int w = kSumLanes / 2; w > 0; w /= 2) {
    for (int u = 0; u < w; ++u) lanes[u] += lanes[u + w];
  }
  return lanes[0];
}

// SiLU (x * sigmoid(x)) in float32, through exp2_f32.
TP_INLINE float silu_f32(float x) {
  return x / (1.0f + exp2_f32(-x * kLog2e));
}

// Fixed-order dot product of a[0, c) and b[0, c) (the mapper head, the attention's column sums).
TP_INLINE float dot_fixed(const float* a, const float* b, int64_t c) {
  float lanes[kSumLanes];
  for (int u = 0; u < kSumLanes; ++u) lanes[u] = 0.0f;
  const int64_t full = c - c % kSumLanes;
  for (int64_t i = 0; i < full; i += kSumLanes) {
    for (int u = 0; u < kSumLanes; ++u) lanes[u] += a[i + u] * b[i + u];
  }
  float sum = lane_total(lanes);
  for (int64_t i = full; i < c; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace tokenprune::core
