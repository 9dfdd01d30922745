// Device helpers shared by the torch-free CUDA kernels (gather.cu, select.cu, attention.cu,
// mapper.cu). Plain CUDA C++: no torch header here (see kernels.h).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tokenprune::cuda {

constexpr int kThreads = 256;            // threads of the element-wise kernels
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

#define TP_RETURN_IF_ERROR(expr)        \
  do {                                  \
    const cudaError_t tp_err_ = (expr); \
    if (tp_err_ != cudaSuccess) {       \
      return tp_err_;                   \
    }                                   \
  } while (0)

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// The sample owning packed row i: the largest b in [0, batch) with cu[b] <= i (batch >= 1).
// Stays in [0, batch) even when cu is not monotone (garbage offsets give a wrong sample, never an
// out-of-bounds one).
__device__ __forceinline__ int64_t sample_of(const int64_t* cu, int64_t batch, int64_t i) {
  int64_t lo = 0;
  int64_t hi = batch - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (cu[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device (past the default
// 48 KiB). cudaFuncSetAttribute is called only when a larger size than before is needed on that
// device: after a warm-up call, a launch inside a CUDA graph capture makes no such API call.
// `granted` is the kernel's own table (one entry per device, 0 at start).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes, std::atomic<size_t>* granted,
                               int max_devices) {
  int device = 0;
  TP_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device < 0 || device >= max_devices) return cudaErrorInvalidDevice;
  if (granted[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  TP_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
  size_t seen = granted[device].load(std::memory_order_relaxed);
  while (seen < bytes && !granted[device].compare_exchange_weak(seen, bytes)) {
  }
  return cudaSuccess;
}

constexpr int kMaxDevices = 64;

}  // namespace tokenprune::cuda
