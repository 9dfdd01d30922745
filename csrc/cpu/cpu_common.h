// Helpers shared by the CPU kernels in csrc/cpu.
#pragma once

#include "../checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace tokenprune::cpu {

// Copies a 1-D int32/int64 CPU tensor (any stride) into int64 values.
inline std::vector<int64_t> to_int64_vector(const at::Tensor& t) {
  const int64_t n = t.size(0);
  const int64_t s = t.stride(0);
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (t.scalar_type() == c10::kLong) {
    const int64_t* p = t.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i * s];
  } else {
    const int32_t* p = t.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i * s];
  }
  return out;
}

// Reads and validates `cu_seqlens`-style offsets over a packed axis of length `total`:
// 1-D int32/int64 on CPU, starts at 0, never decreases, ends at `total`.
inline std::vector<int64_t> read_offsets(const at::Tensor& t, const char* name, int64_t total,
                                         const char* total_name) {
  check_offsets_meta(t, name);
  check_device(t, name, c10::Device(c10::kCPU));
  std::vector<int64_t> cu = to_int64_vector(t);
  TORCH_CHECK_VALUE(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (size_t b = 1; b < cu.size(); ++b) {
    TORCH_CHECK_VALUE(cu[b] >= cu[b - 1], name, " must never decrease, got ", name, "[", b - 1,
                      "] = ", cu[b - 1], " > ", name, "[", b, "] = ", cu[b]);
  }
  TORCH_CHECK_VALUE(cu.back() == total, name, "[-1] must equal ", total_name, " = ", total,
                    ", got ", cu.back());
  return cu;
}

// Per-sample keep counts of a selection kernel: `keep_counts` must be [B] int64 on the CPU;
// returned as a host vector (the values are the op layer's, already checked against the sizes).
inline std::vector<int64_t> read_keep_counts(const at::Tensor& keep_counts, int64_t batch) {
  check_dim(keep_counts, "keep_counts", 1, "[B]");
  check_int64(keep_counts, "keep_counts");
  check_device(keep_counts, "keep_counts", c10::Device(c10::kCPU));
  TORCH_CHECK_VALUE(keep_counts.size(0) == batch, "keep_counts must have B = ", batch,
                    " entries (len(cu_seqlens_v) - 1), got ", keep_counts.size(0));
  return to_int64_vector(keep_counts);
}

// A new 1-D CPU tensor of dtype `dtype` (int32 or int64) holding the offsets `cu`.
inline at::Tensor offsets_tensor(const std::vector<int64_t>& cu, c10::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(cu.size())}, at::TensorOptions().dtype(dtype));
  if (dtype == c10::kLong) {
    int64_t* p = out.mutable_data_ptr<int64_t>();
    for (size_t i = 0; i < cu.size(); ++i) p[i] = cu[i];
  } else {
    int32_t* p = out.mutable_data_ptr<int32_t>();
    for (size_t i = 0; i < cu.size(); ++i) {
      TORCH_CHECK_VALUE(cu[i] <= INT32_MAX, "offset ", cu[i], " does not fit the int32 offsets");
      p[i] = static_cast<int32_t>(cu[i]);
    }
  }
  return out;
}

// Runs body(n, next) once on each of up to n intra-op threads; next() hands out the task
// indices 0, 1, ... to whichever thread asks first (values >= n: no task left). On a loaded
// machine threads get stalled unevenly, and static chunks (at::parallel_for's) would wait for
// the slowest; here the others take its share. A task's result must depend only on the task, not
// on the thread (per-thread buffers hold temporaries only), so results stay deterministic.
template <class Body>
void parallel_pull(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(n, next); });
}

}  // namespace tokenprune::cpu
