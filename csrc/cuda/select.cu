// Torch-free CUDA kernels of the deterministic per-sample top-k (docs/contract.md, stage c), the
// selection half of tokenprune::_select_topk, _select_gather_kept and _select_merge_kept.
//
// One CUB radix sort does the ranking, on 64-bit keys that hold the whole order rule:
//   key = (sample << 32) | ~core::order_key(score),   value = index (int32)
// Ascending order of these keys is sample by sample, and inside a sample by score descending
// (core::order_key is the CPU kernel's key: -0 == +0, NaN below -inf); CUB's radix sort is
// stable, so equal scores keep index order (the lower index first). Only the bits that can be
// non-zero are sorted (32 + bit width of batch - 1). After the sort, sample b occupies sorted
// positions [cu_v[b], cu_v[b + 1]) and its first keep_counts[b] entries are the kept ones: one
// kernel flags them at their original index, an exclusive scan of the flags gives each kept
// index its output slot, and a scatter writes kept_idx ascending. The merge reads the flags
// directly (gather.cu, merge_kept_mark_flags).
//
// Launches: keys, the sort (CUB onesweep: a histogram and one pass per 8 bits), flags, scan and
// scatter (when kept_idx is wanted), scan of keep_counts (when cu_kept is wanted). All on the
// given stream, no host synchronisation, scratch from the caller (select_workspace_bytes): the
// whole selection can be captured in a CUDA graph.

#include "../core/mass.h"
#include "../core/order_key.h"
#include "device_common.cuh"
#include "order_keys.cuh"
#include "kernels.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tokenprune::cuda {
namespace {

constexpr size_t kAlign = 256;  // every scratch array starts on a 256-byte boundary

constexpr size_t align_up(size_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// Number of bits needed for sample ids 0..batch-1.
inline int sample_bits(int64_t batch) {
  int bits = 0;
  while (bits < 32 && (int64_t{1} << bits) < batch) ++bits;
  return bits;
}

// The scratch of one selection, carved out of the caller's workspace.
struct Plan {
  size_t keys_bytes = 0;   // 2 x [tv] uint64 (sort double buffer)
  size_t vals_bytes = 0;   // 2 x [tv] int32
  size_t slots_bytes = 0;  // [tv] int32 exclusive scan of the flags
  size_t sort_temp = 0;    // CUB temp storage of the sort, the flag scan and the count scan
  size_t total() const {
    return 2 * keys_bytes + 2 * vals_bytes + slots_bytes + sort_temp;
  }
};

cudaError_t make_plan(int64_t tv, int64_t batch, Plan* plan) {
  const int n = static_cast<int>(tv);
  plan->keys_bytes = align_up(static_cast<size_t>(tv) * sizeof(uint64_t));
  plan->vals_bytes = align_up(static_cast<size_t>(tv) * sizeof(int32_t));
  plan->slots_bytes = align_up(static_cast<size_t>(tv) * sizeof(int32_t));
  size_t sort_bytes = 0;
  size_t scan_bytes = 0;
  size_t count_bytes = 0;
  cub::DoubleBuffer<uint64_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> vals(nullptr, nullptr);
  TP_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, vals, n, 0,
                                                     32 + sample_bits(batch)));
  TP_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes,
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), n));
  TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(nullptr, count_bytes,
                                                   static_cast<const int64_t*>(nullptr),
                                                   static_cast<int64_t*>(nullptr),
                                                   static_cast<int>(batch)));
  size_t temp = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  temp = temp > count_bytes ? temp : count_bytes;
  plan->sort_temp = align_up(temp);
  return cudaSuccess;
}

// flags[v] = 1 for the first keep_counts[b] sorted entries of each sample b, else 0.
__global__ void flag_kept_kernel(const uint64_t* __restrict__ sorted_keys,
                                 const int32_t* __restrict__ sorted_vals, int64_t tv,
                                 const int64_t* __restrict__ cu_v,
                                 const int64_t* __restrict__ keep_counts,
                                 int32_t* __restrict__ flags) {
  for (int64_t p = global_thread(); p < tv; p += grid_threads()) {
    const int64_t b = static_cast<int64_t>(sorted_keys[p] >> 32);  // < batch: written so
    const int64_t rank = p - cu_v[b];
    const int32_t v = sorted_vals[p];
    if (v >= 0 && v < tv) flags[v] = (rank >= 0 && rank < keep_counts[b]) ? 1 : 0;
  }
}

// kept_idx[slots[v]] = v for every flagged v (slots: exclusive scan of the flags).
__global__ void scatter_kept_kernel(const int32_t* __restrict__ flags,
                                    const int32_t* __restrict__ slots, int64_t tv,
                                    int64_t total_kept, int64_t* __restrict__ kept_idx) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t slot = slots[v];
    if (flags[v] != 0 && slot >= 0 && slot < total_kept) kept_idx[slot] = v;
  }
}

// ---- the adaptive rule's counts (mass_keep_counts) ---------------------------------------

// The scratch of mass_keep_counts: the selection's sort buffers, then weights and their scan.
struct MassPlan {
  Plan sort;
  size_t weights_bytes = 0;  // [tv] int64 weights in sorted order
  size_t scan_bytes = 0;     // [tv] int64 inclusive scan of the weights
  size_t temp = 0;           // CUB temp storage of the sort and of the scan
  size_t total() const {
    return temp + 2 * sort.keys_bytes + 2 * sort.vals_bytes + weights_bytes + scan_bytes;
  }
};

cudaError_t make_mass_plan(int64_t tv, int64_t batch, MassPlan* plan) {
  TP_RETURN_IF_ERROR(make_plan(tv, batch, &plan->sort));
  plan->weights_bytes = align_up(static_cast<size_t>(tv) * sizeof(int64_t));
  plan->scan_bytes = plan->weights_bytes;
  size_t scan_temp = 0;
  TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(nullptr, scan_temp,
                                                   static_cast<const int64_t*>(nullptr),
                                                   static_cast<int64_t*>(nullptr),
                                                   static_cast<int>(tv)));
  const size_t temp = align_up(scan_temp);
  plan->temp = plan->sort.sort_temp > temp ? plan->sort.sort_temp : temp;
  return cudaSuccess;
}

// weights[p] for every sorted position p: the mass weight (core/mass.h) of the token there. The
// sample's first sorted token holds its largest non-NaN score (NaN sorts last), the max the
// weights are relative to.
template <typename T>
__global__ void mass_weights_kernel(const void* __restrict__ scores, int64_t stride, int64_t tv,
                                    const uint64_t* __restrict__ sorted_keys,
                                    const int32_t* __restrict__ sorted_vals,
                                    const int64_t* __restrict__ cu_v, bool softmax,
                                    int64_t* __restrict__ weights) {
  for (int64_t p = global_thread(); p < tv; p += grid_threads()) {
    const int64_t b = static_cast<int64_t>(sorted_keys[p] >> 32);
    const int64_t start = cu_v[b];
    const int32_t v = sorted_vals[p];
    const int32_t top = (start >= 0 && start < tv) ? sorted_vals[start] : v;
    const bool ok = v >= 0 && v < tv && top >= 0 && top < tv;
    const float x = ok ? load_score<T>(scores, v * stride) : 0.0f;
    const float mx = ok ? load_score<T>(scores, top * stride) : 0.0f;
    const int k = core::mass_bits(cu_v[b + 1] - start);
    weights[p] = ok ? core::mass_weight(x, mx, k, softmax) : 0;
  }
}

// counts[b] = the number of leading sorted tokens of sample b whose preceding weights fall short
// of keep_mass * total: written by the one token where that stops (counts zeroed before).
__global__ void mass_count_kernel(const uint64_t* __restrict__ sorted_keys,
                                  const int64_t* __restrict__ weights,
                                  const int64_t* __restrict__ scan, int64_t tv,
                                  const int64_t* __restrict__ cu_v, double keep_mass,
                                  int64_t* __restrict__ counts) {
  for (int64_t p = global_thread(); p < tv; p += grid_threads()) {
    const int64_t b = static_cast<int64_t>(sorted_keys[p] >> 32);
    const int64_t start = cu_v[b];
    const int64_t end = cu_v[b + 1];
    if (start < 0 || end > tv || p < start || p >= end) continue;
    const int64_t base = start > 0 ? scan[start - 1] : 0;
    const double threshold = keep_mass * static_cast<double>(scan[end - 1] - base);
    const int64_t through = scan[p] - base;  // weight of the tokens up to p, p included
    const bool needed = static_cast<double>(through - weights[p]) < threshold;
    if (needed && (p + 1 == end || !(static_cast<double>(through) < threshold))) {
      counts[b] = p - start + 1;
    }
  }
}

// counts[b] = clamp(counts[b], lo[b], hi[b]), 0 for an empty sample (bounds [2, batch]).
__global__ void mass_clamp_kernel(const int64_t* __restrict__ cu_v, int64_t batch,
                                  const int64_t* __restrict__ keep_bounds,
                                  int64_t* __restrict__ counts) {
  for (int64_t b = global_thread(); b < batch; b += grid_threads()) {
    const int64_t lo = keep_bounds[b];
    const int64_t hi = keep_bounds[batch + b];
    const int64_t m = counts[b];
    counts[b] = cu_v[b + 1] == cu_v[b] ? 0 : (m < lo ? lo : (m > hi ? hi : m));
  }
}

// Calls f(T{}) with T the element type of `type` (float, __half or __nv_bfloat16).
template <typename F>
cudaError_t dispatch_float(FloatType type, const F& f) {
  switch (type) {
    case FloatType::kFloat32:
      return f(float{});
    case FloatType::kFloat16:
      return f(__half{});
    case FloatType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

// The sort of select_kept and mass_keep_counts: keys (sample, ~order_key) and indices, sorted.
cudaError_t sort_by_rank(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                         void* temp, size_t temp_bytes, cub::DoubleBuffer<uint64_t>& keys,
                         cub::DoubleBuffer<int32_t>& vals, cudaStream_t stream) {
  TP_RETURN_IF_ERROR(dispatch_float(scores.type, [&](auto tag) {
    using T = decltype(tag);
    sort_keys_kernel<T><<<blocks_for(tv), kThreads, 0, stream>>>(
        scores.data, scores.stride, tv, cu_v, batch, keys.Current(), vals.Current());
    return cudaGetLastError();
  }));
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, vals, static_cast<int>(tv), 0,
                                         32 + sample_bits(batch), stream);
}

}  // namespace

cudaError_t select_workspace_bytes(int64_t tv, int64_t batch, size_t* bytes) {
  Plan plan;
  TP_RETURN_IF_ERROR(make_plan(tv, batch, &plan));
  *bytes = plan.total();
  return cudaSuccess;
}

cudaError_t select_kept(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                        const int64_t* keep_counts, int64_t total_kept, void* workspace,
                        size_t workspace_bytes, int32_t* flags, int64_t* kept_idx,
                        int64_t* cu_kept, cudaStream_t stream) {
  Plan plan;
  TP_RETURN_IF_ERROR(make_plan(tv, batch, &plan));
  if (workspace_bytes < plan.total()) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* temp = ws;
  ws += plan.sort_temp;
  uint64_t* keys0 = reinterpret_cast<uint64_t*>(ws);
  ws += plan.keys_bytes;
  uint64_t* keys1 = reinterpret_cast<uint64_t*>(ws);
  ws += plan.keys_bytes;
  int32_t* vals0 = reinterpret_cast<int32_t*>(ws);
  ws += plan.vals_bytes;
  int32_t* vals1 = reinterpret_cast<int32_t*>(ws);
  ws += plan.vals_bytes;
  int32_t* slots = reinterpret_cast<int32_t*>(ws);

  if (cu_kept != nullptr) {
    TP_RETURN_IF_ERROR(cudaMemsetAsync(cu_kept, 0, sizeof(int64_t), stream));
    if (batch > 0) {
      size_t bytes = plan.sort_temp;
      TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(temp, bytes, keep_counts, cu_kept + 1,
                                                       static_cast<int>(batch), stream));
    }
  }
  if (tv <= 0 || batch <= 0) return cudaSuccess;

  const int n = static_cast<int>(tv);
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> vals(vals0, vals1);
  size_t bytes = plan.sort_temp;
  TP_RETURN_IF_ERROR(sort_by_rank(scores, tv, cu_v, batch, temp, bytes, keys, vals, stream));
  flag_kept_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(keys.Current(), vals.Current(), tv,
                                                            cu_v, keep_counts, flags);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  if (kept_idx == nullptr || total_kept <= 0) return cudaSuccess;

  bytes = plan.sort_temp;
  const int32_t* flags_in = flags;  // the type the plan queried CUB with
  TP_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(temp, bytes, flags_in, slots, n, stream));
  scatter_kept_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(flags, slots, tv, total_kept,
                                                               kept_idx);
  return cudaGetLastError();
}

cudaError_t mass_workspace_bytes(int64_t tv, int64_t batch, size_t* bytes) {
  MassPlan plan;
  TP_RETURN_IF_ERROR(make_mass_plan(tv, batch, &plan));
  *bytes = plan.total();
  return cudaSuccess;
}

cudaError_t mass_keep_counts(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                             const int64_t* keep_bounds, double keep_mass, bool softmax,
                             void* workspace, size_t workspace_bytes, int64_t* counts,
                             cudaStream_t stream) {
  MassPlan plan;
  TP_RETURN_IF_ERROR(make_mass_plan(tv, batch, &plan));
  if (workspace_bytes < plan.total()) return cudaErrorInvalidValue;
  if (batch <= 0) return cudaSuccess;
  TP_RETURN_IF_ERROR(cudaMemsetAsync(counts, 0, static_cast<size_t>(batch) * sizeof(int64_t),
                                     stream));
  if (tv > 0) {
    char* ws = static_cast<char*>(workspace);
    void* temp = ws;
    ws += plan.temp;
    uint64_t* keys0 = reinterpret_cast<uint64_t*>(ws);
    ws += plan.sort.keys_bytes;
    uint64_t* keys1 = reinterpret_cast<uint64_t*>(ws);
    ws += plan.sort.keys_bytes;
    int32_t* vals0 = reinterpret_cast<int32_t*>(ws);
    ws += plan.sort.vals_bytes;
    int32_t* vals1 = reinterpret_cast<int32_t*>(ws);
    ws += plan.sort.vals_bytes;
    int64_t* weights = reinterpret_cast<int64_t*>(ws);
    ws += plan.weights_bytes;
    int64_t* scan = reinterpret_cast<int64_t*>(ws);

    cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
    cub::DoubleBuffer<int32_t> vals(vals0, vals1);
    TP_RETURN_IF_ERROR(sort_by_rank(scores, tv, cu_v, batch, temp, plan.temp, keys, vals, stream));
    TP_RETURN_IF_ERROR(dispatch_float(scores.type, [&](auto tag) {
      using T = decltype(tag);
      mass_weights_kernel<T><<<blocks_for(tv), kThreads, 0, stream>>>(
          scores.data, scores.stride, tv, keys.Current(), vals.Current(), cu_v, softmax, weights);
      return cudaGetLastError();
    }));
    size_t bytes = plan.temp;
    const int n = static_cast<int>(tv);
    const int64_t* weights_in = weights;  // the type the plan queried CUB with
    TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(temp, bytes, weights_in, scan, n, stream));
    mass_count_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(keys.Current(), weights, scan, tv,
                                                               cu_v, keep_mass, counts);
    TP_RETURN_IF_ERROR(cudaGetLastError());
  }
  mass_clamp_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(cu_v, batch, keep_bounds, counts);
  return cudaGetLastError();
}

}  // namespace tokenprune::cuda
