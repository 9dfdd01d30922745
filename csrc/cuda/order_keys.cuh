// Order keys of the scores, shared by the selection kernels (select.cu, spread.cu): a score
// of any supported dtype as float, and the packed (sample, inverted key) sort keys of stage c.
#pragma once

#include "../core/order_key.h"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tokenprune::cuda {

template <typename T>
__device__ __forceinline__ float load_score(const void* data, int64_t i);

template <>
__device__ __forceinline__ float load_score<float>(const void* data, int64_t i) {
  return static_cast<const float*>(data)[i];
}

template <>
__device__ __forceinline__ float load_score<__half>(const void* data, int64_t i) {
  return __half2float(static_cast<const __half*>(data)[i]);
}

template <>
__device__ __forceinline__ float load_score<__nv_bfloat16>(const void* data, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
}

template <typename T>
__global__ void sort_keys_kernel(const void* __restrict__ scores, int64_t stride, int64_t tv,
                                 const int64_t* __restrict__ cu_v, int64_t batch,
                                 uint64_t* __restrict__ keys, int32_t* __restrict__ vals) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const uint32_t key = core::order_key(load_score<T>(scores, v * stride));
    const uint64_t b = static_cast<uint64_t>(sample_of(cu_v, batch, v));
    keys[v] = (b << 32) | static_cast<uint64_t>(~key);
    vals[v] = static_cast<int32_t>(v);
  }
}

}  // namespace tokenprune::cuda
