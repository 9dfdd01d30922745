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

// Compiles a CPU function once per x86-64 level (AVX-512, AVX2 + FMA, baseline) and picks the
// best at load time: the extension is built for the generic x86-64 target (a wheel must run on
// any x86-64 CPU), so without this its loops would be SSE2-only. Empty elsewhere.
#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TP_CPU_CLONES
#endif

namespace tokenprune::core {

TP_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

TP_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// e^x in float32: at most 2 ulp from the exact value for x in [-87.3, 88.3] (measured 1.4 ulp),
// 0 below that range (where the exact value is a denormal, < 1.2e-38), +inf above, NaN for NaN.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6 polynomial fitted to e^r
// for minimal relative error (max 2e-9 in exact arithmetic), scaled by 2^n through the exponent
// bits. exp(-inf) is 0, which the masked softmax relies on.
TP_HOST_DEVICE inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMin = -87.3f;
  constexpr float kMax = 88.3f;
  float xc = x < kMin ? kMin : x;  // comparisons are false for NaN: it flows through
  xc = xc > kMax ? kMax : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.383580151e-03f;
  p = p * r + 8.375644684e-03f;
  p = p * r + 4.166828841e-02f;
  p = p * r + 1.666641086e-01f;
  p = p * r + 4.999999106e-01f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t n_int = float_bits(shifted) - 0x4B400000u;  // n, two's complement
  const float scale = bits_float((n_int + 127u) << 23);    // 2^n, n in [-126, 127]
  float y = p * scale;
  y = x < kMin ? 0.0f : y;
  y = x > kMax ? bits_float(0x7F800000u) : y;
  return y;
}

// Lanes of the fixed-order sums (dot_fixed, layer_norm_moments): the additions happen in the
// same order whatever vector width the compiler picks, so a result does not depend on the
// buffer alignment or on the thread that computes it.
constexpr int kSumLanes = 16;

// SiLU (x * sigmoid(x)) in float32, through exp_f32.
TP_HOST_DEVICE inline float silu_f32(float x) {
  return x / (1.0f + exp_f32(-x));
}

// Fixed-order dot product of a[0, c) and b[0, c) (the mapper head, the attention's column sums).
TP_HOST_DEVICE inline float dot_fixed(const float* a, const float* b, int64_t c) {
  float lanes[kSumLanes];
  for (int u = 0; u < kSumLanes; ++u) lanes[u] = 0.0f;
  const int64_t full = c - c % kSumLanes;
  for (int64_t i = 0; i < full; i += kSumLanes) {
    for (int u = 0; u < kSumLanes; ++u) lanes[u] += a[i + u] * b[i + u];
  }
  float sum = 0.0f;
  for (int u = 0; u < kSumLanes; ++u) sum += lanes[u];
  for (int64_t i = full; i < c; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace tokenprune::core
