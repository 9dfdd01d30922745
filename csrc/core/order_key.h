// The order-preserving score key of select_topk (docs/contract.md, stage c), shared by the CPU
// kernel (csrc/cpu/select.cpp) and the CUDA kernel (csrc/cuda/select.cu).
//
// Torch-free and header-only (tp_math.h's TP_INLINE: `__host__ __device__ __forceinline__` under
// nvcc, always-inline on the host): the CPU tests run the very function the CUDA kernel calls.
#pragma once

#include "tp_math.h"

#include <cstdint>

namespace tokenprune::core {

// Maps a score to a uint32 whose unsigned order is the ranking order: a higher score has a higher
// key; -0.0 and +0.0 share a key; every NaN maps to 0, below -inf (whose key is 0x007FFFFF).
//   NaN -> 0; otherwise, with -0 canonicalised to +0: negative -> ~bits, else bits | 0x80000000.
TP_INLINE uint32_t order_key(float x) {
  uint32_t bits = float_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0u;  // NaN (any sign, any payload)
  if (bits == 0x80000000u) bits = 0u;                   // -0.0 ranks as +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace tokenprune::core
