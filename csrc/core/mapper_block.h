// The per-token arithmetic of the mapper (stage b, docs/contract.md), torch-free.
//
// Per sample of n tokens the mapper computes
//     x = log(n * attn + input_eps)                                 [1, n]
//     per block: depthwise conv (K taps, zero padding per sample, bias) -> pointwise C_in ->
//                C_out (bias) -> LayerNorm over the C_out channels (eps 1e-5, affine) -> SiLU
//     head: pointwise C_last -> 1 (bias).
// The pointwise layers are GEMMs and stay in the kernels; what a kernel does per token and per
// channel around them is here, so the CPU and CUDA kernels share it.
#pragma once

#include "tp_math.h"

#include <cmath>

namespace tokenprune::core {

// LayerNorm epsilon of every mapper block (the contract's, LAYER_NORM_EPS in Python).
constexpr float kMapperNormEps = 1e-5f;

// The mapper's input feature of one token of a sample of n tokens, as the reference rounds it:
// n * attn rounded to float32, plus eps rounded to float32, then log.
TP_INLINE float mapper_input(float attn, float n, float input_eps) {
  const float scaled = n * attn;
  return ::logf(scaled + input_eps);
}

// One token's pointwise output x[0, c) (c channels, the GEMM result without bias): adds the
// bias in place and returns LayerNorm's mean and 1/sqrt(var + eps), var the biased variance
// (two passes: no E[x^2] - E[x]^2 cancellation). Fixed-order lane sums (kSumLanes).
TP_INLINE void bias_norm_moments(float* x, const float* bias, int64_t c, float* mean,
                                 float* rstd) {
  float lanes[kSumLanes];
  for (int u = 0; u < kSumLanes; ++u) lanes[u] = 0.0f;
  const int64_t full = c - c % kSumLanes;
  for (int64_t i = 0; i < full; i += kSumLanes) {
    for (int u = 0; u < kSumLanes; ++u) {
      x[i + u] += bias[i + u];
      lanes[u] += x[i + u];
    }
  }
  float sum = lane_total(lanes);
  for (int64_t i = full; i < c; ++i) {
    x[i] += bias[i];
    sum += x[i];
  }
  const float mu = sum / static_cast<float>(c);

  for (int u = 0; u < kSumLanes; ++u) lanes[u] = 0.0f;
  for (int64_t i = 0; i < full; i += kSumLanes) {
    for (int u = 0; u < kSumLanes; ++u) {
      const float d = x[i + u] - mu;
      lanes[u] += d * d;
    }
  }
  float sq = lane_total(lanes);
  for (int64_t i = full; i < c; ++i) {
    const float d = x[i] - mu;
    sq += d * d;
  }
  *mean = mu;
  *rstd = 1.0f / ::sqrtf(sq / static_cast<float>(c) + kMapperNormEps);
}

// One channel after the norm: SiLU(gamma * (x - mean) * rstd + beta).
TP_INLINE float norm_silu(float x, float mean, float rstd, float gamma, float beta) {
  return silu_f32((x - mean) * rstd * gamma + beta);
}

// The block's output of one token, in place: norm_silu of every channel.
TP_INLINE void norm_silu_row(float* x, int64_t c, float mean, float rstd, const float* gamma,
                             const float* beta) {
  for (int64_t i = 0; i < c; ++i) x[i] = norm_silu(x[i], mean, rstd, gamma[i], beta[i]);
}

// The last block's output of one token dotted with the head (fixed order), plus the head's
// bias: the token's logit. The activations themselves are not stored.
TP_INLINE float norm_silu_head(const float* x, int64_t c, float mean, float rstd,
                               const float* gamma, const float* beta, const float* head,
                               float head_bias) {
  float lanes[kSumLanes];
  for (int u = 0; u < kSumLanes; ++u) lanes[u] = 0.0f;
  const int64_t full = c - c % kSumLanes;
  for (int64_t i = 0; i < full; i += kSumLanes) {
    for (int u = 0; u < kSumLanes; ++u) {
      const int64_t ch = i + u;
      lanes[u] += norm_silu(x[ch], mean, rstd, gamma[ch], beta[ch]) * head[ch];
    }
  }
  float sum = lane_total(lanes);
  for (int64_t i = full; i < c; ++i) {
    sum += norm_silu(x[i], mean, rstd, gamma[i], beta[i]) * head[i];
  }
  return sum + head_bias;
}

}  // namespace tokenprune::core
