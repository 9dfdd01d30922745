// Torch-free CUDA kernels of the spread rule's selection (docs/contract.md, stage c, "Spread
// rule"), tokenprune::_spread_select.
//
// 1. The selection order: one CUB radix sort of the keys (sample << 32) | ~core::order_key(score)
//    with the indices as values (stable, so equal scores keep index order), as select.cu sorts.
//    Sample b then occupies sorted positions [cu_v[b], cu_v[b + 1]).
// 2. For 1 <= radius <= core::kSpreadTableRadius, every token's neighbours (local indices, -1
//    padded to (2r + 1)^2 - 1) in a table, one thread per token (core::spread_neighbour_row:
//    one binary search per row of its window in the sample's raster-ordered coords), so the
//    sequential pass below reads a token's neighbours in one load instead of searching for them.
// 3. The greedy pass, one warp per sample (core::spread_accept, the CPU kernel's loop): the next
//    unblocked token is found 32 sorted positions at a time (a ballot over their blocked flags),
//    accepted (its flag set), and its neighbours blocked by the lanes together: from the table,
//    else one row of its window per lane (core::spread_row_neighbours), or one stride of the
//    sample per lane when the window has more rows than the sample has tokens. The pass stops at
//    the k-th accepted token; when fewer were accepted it ran to the end, its blocked tokens are
//    the suppressed ones, and the first k - accepted of them in sorted order are flagged too.
// 4. An exclusive scan of the flags gives each kept index its slot: kept_idx ascending, sized by
//    the host-known total_kept; cu_kept is the inclusive scan of keep_counts.
// No host synchronisation; every index read from the offsets, counts or the sort is checked
// before it is dereferenced (wrong offsets give unspecified output, never an access outside the
// buffers).

#include "../core/order_key.h"
#include "../core/spread.h"
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

constexpr size_t kAlign = 256;     // every scratch array starts on a 256-byte boundary
constexpr int kWarp = 32;
constexpr int kSpreadWarps = 4;    // samples per block of the greedy pass, one warp each
constexpr unsigned kFullMask = 0xFFFFFFFFu;

constexpr size_t align_up(size_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// Bits of the sample ids 0..batch-1 in the sort key.
inline int spread_sample_bits(int64_t batch) {
  int bits = 0;
  for (int64_t b = batch - 1; b > 0; b >>= 1) ++bits;
  return bits;
}

// Scratch of one call, in this order in the workspace.
struct SpreadPlan {
  size_t temp = 0;          // CUB temp storage of the sort and the scans
  size_t keys_bytes = 0;    // 2 x [tv] uint64 (sort double buffer)
  size_t vals_bytes = 0;    // 2 x [tv] int32
  size_t flags_bytes = 0;   // [tv] int32 kept flags
  size_t slots_bytes = 0;   // [tv] int32 exclusive scan of the flags
  size_t blocked_bytes = 0; // [tv] uint8 blocked (after a complete pass: suppressed) flags
  size_t table_bytes = 0;   // [tv, table_width] int32 neighbours (0 without a table)
  int64_t table_width = 0;  // (2r + 1)^2 - 1 for 1 <= radius <= kSpreadTableRadius, else 0
  size_t total() const {
    return temp + 2 * keys_bytes + 2 * vals_bytes + flags_bytes + slots_bytes + blocked_bytes +
           table_bytes;
  }
};

cudaError_t make_spread_plan(int64_t tv, int64_t batch, int64_t radius, SpreadPlan* plan) {
  if (radius < 0) return cudaErrorInvalidValue;
  const int n = static_cast<int>(tv);
  plan->keys_bytes = align_up(static_cast<size_t>(tv) * sizeof(uint64_t));
  plan->vals_bytes = align_up(static_cast<size_t>(tv) * sizeof(int32_t));
  plan->flags_bytes = align_up(static_cast<size_t>(tv) * sizeof(int32_t));
  plan->slots_bytes = plan->flags_bytes;
  plan->blocked_bytes = align_up(static_cast<size_t>(tv));
  plan->table_width = (radius >= 1 && radius <= core::kSpreadTableRadius)
                          ? core::spread_table_width(radius)
                          : 0;
  plan->table_bytes =
      align_up(static_cast<size_t>(tv) * static_cast<size_t>(plan->table_width) * sizeof(int32_t));
  size_t sort_bytes = 0;
  size_t scan_bytes = 0;
  size_t count_bytes = 0;
  cub::DoubleBuffer<uint64_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> vals(nullptr, nullptr);
  TP_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, vals, n, 0,
                                                     32 + spread_sample_bits(batch)));
  TP_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes,
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), n));
  TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(nullptr, count_bytes,
                                                   static_cast<const int64_t*>(nullptr),
                                                   static_cast<int64_t*>(nullptr),
                                                   static_cast<int>(batch > 0 ? batch : 1)));
  size_t temp = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  temp = temp > count_bytes ? temp : count_bytes;
  plan->temp = align_up(temp);
  return cudaSuccess;
}

// table[v, 0:width) = the neighbours of token v (local indices in its sample, -1 padded).
__global__ void spread_table_kernel(const int64_t* __restrict__ coords, int64_t tv,
                                    const int64_t* __restrict__ cu_v, int64_t batch,
                                    int64_t radius, int64_t width, int32_t* __restrict__ table) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t b = sample_of(cu_v, batch, v);
    const int64_t start = cu_v[b];
    const int64_t end = cu_v[b + 1];
    int32_t* row = table + v * width;
    if (start < 0 || end > tv || v < start || v >= end) {  // only with invalid offsets
      for (int64_t e = 0; e < width; ++e) row[e] = -1;
      continue;
    }
    core::spread_neighbour_row(coords + 3 * start, end - start, v - start, radius, row, width);
  }
}

// The greedy pass of every sample, one warp each (grid-stride over the samples). Sets
// flags[v] = 1 for the kept tokens (flags and blocked zeroed before). coords: [tv, 3] int64;
// table: [tv, width] from spread_table_kernel, or null (width 0).
__global__ void spread_pass_kernel(const int32_t* __restrict__ sorted, int64_t tv,
                                   const int64_t* __restrict__ cu_v, int64_t batch,
                                   const int64_t* __restrict__ keep_counts,
                                   const int64_t* __restrict__ coords, int64_t radius,
                                   const int32_t* __restrict__ table, int64_t width,
                                   uint8_t* blocked_all, int32_t* __restrict__ flags) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kSpreadWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kSpreadWarps +
                        static_cast<int64_t>(threadIdx.x) / kWarp;
  for (int64_t b = first; b < batch; b += warps) {
    const int64_t start = cu_v[b];
    const int64_t end = cu_v[b + 1];
    if (start < 0 || end > tv || start >= end) continue;  // empty (or invalid) sample
    const int64_t n = end - start;
    int64_t k = keep_counts[b];
    k = k < 0 ? 0 : (k > n ? n : k);
    if (k == 0) continue;
    if (k == n) {
      for (int64_t q = lane; q < n; q += kWarp) flags[start + q] = 1;
      continue;
    }
    const int64_t* xy = coords + 3 * start;        // the sample's coords, local indices
    volatile uint8_t* blocked = blocked_all + start;  // written and read back by other lanes
    // Local index of the token at sorted position q of the sample (-1 if the sort put a token of
    // another sample there: only with invalid offsets).
    auto local = [&](int64_t q) -> int64_t {
      const int64_t v = sorted[start + q];
      return (v >= start && v < end) ? v - start : -1;
    };
    auto next_free = [&](int64_t p) -> int64_t {
      for (int64_t base = p; base < n; base += kWarp) {
        const int64_t q = base + lane;
        const int64_t i = q < n ? local(q) : -1;
        const unsigned mask = __ballot_sync(kFullMask, i >= 0 && blocked[i] == 0);
        if (mask != 0u) return base + __ffs(static_cast<int>(mask)) - 1;
      }
      return n;
    };
    auto accept = [&](int64_t q, int64_t) {
      if (lane == 0) flags[start + local(q)] = 1;  // next_free returns valid positions only
    };
    auto block = [&](int64_t q) {
      const int64_t i = local(q);
      const core::SpreadRows rows = core::spread_rows(xy[3 * i + 1], radius);
      if (radius <= 0) {
        // distinct coordinates: nothing to block
      } else if (table != nullptr) {
        const int32_t* near = table + (start + i) * width;
        for (int64_t e = lane; e < width; e += kWarp) {
          const int64_t j = near[e];
          if (j >= 0 && j < n) blocked[j] = 1;
        }
      } else if (core::spread_by_rows(rows, n)) {
        for (uint64_t d = static_cast<uint64_t>(lane); d <= rows.row_span; d += kWarp) {
          const int64_t row = static_cast<int64_t>(static_cast<uint64_t>(rows.row_lo) + d);
          core::spread_row_neighbours(xy, n, i, radius, row, [&](int64_t j) { blocked[j] = 1; });
        }
      } else {
        for (int64_t j = lane; j < n; j += kWarp) {
          if (j != i && core::spread_is_neighbour(xy, i, j, radius)) blocked[j] = 1;
        }
      }
      __threadfence_block();
      __syncwarp(kFullMask);
    };
    int64_t filled = core::spread_accept(n, k, next_free, accept, block);
    // Fewer than k accepted: the pass ran to the end and the blocked tokens are the suppressed
    // ones; the first k - filled of them in sorted order are kept too.
    for (int64_t base = 0; base < n && filled < k; base += kWarp) {
      const int64_t q = base + lane;
      const int64_t i = q < n ? local(q) : -1;
      const bool suppressed = i >= 0 && blocked[i] != 0;
      const unsigned mask = __ballot_sync(kFullMask, suppressed);
      const int64_t rank = filled + __popc(mask & ((1u << lane) - 1u));
      if (suppressed && rank < k) flags[start + i] = 1;
      filled += __popc(mask);
    }
  }
}

// kept_idx[slots[v]] = v for every flagged v (slots: exclusive scan of the flags).
__global__ void spread_scatter_kernel(const int32_t* __restrict__ flags,
                                      const int32_t* __restrict__ slots, int64_t tv,
                                      int64_t total_kept, int64_t* __restrict__ kept_idx) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t slot = slots[v];
    if (flags[v] != 0 && slot >= 0 && slot < total_kept) kept_idx[slot] = v;
  }
}

template <typename F>
cudaError_t spread_dispatch_float(FloatType type, const F& f) {
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

}  // namespace

cudaError_t spread_workspace_bytes(int64_t tv, int64_t batch, int64_t radius, size_t* bytes) {
  SpreadPlan plan;
  TP_RETURN_IF_ERROR(make_spread_plan(tv, batch, radius, &plan));
  *bytes = plan.total();
  return cudaSuccess;
}

cudaError_t spread_select(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                          const int64_t* keep_counts, const int64_t* coords, int64_t radius,
                          int64_t total_kept, void* workspace, size_t workspace_bytes,
                          int64_t* kept_idx, int64_t* cu_kept, cudaStream_t stream) {
  SpreadPlan plan;
  TP_RETURN_IF_ERROR(make_spread_plan(tv, batch, radius, &plan));
  if (workspace_bytes < plan.total()) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* temp = ws;
  ws += plan.temp;
  uint64_t* keys0 = reinterpret_cast<uint64_t*>(ws);
  ws += plan.keys_bytes;
  uint64_t* keys1 = reinterpret_cast<uint64_t*>(ws);
  ws += plan.keys_bytes;
  int32_t* vals0 = reinterpret_cast<int32_t*>(ws);
  ws += plan.vals_bytes;
  int32_t* vals1 = reinterpret_cast<int32_t*>(ws);
  ws += plan.vals_bytes;
  int32_t* flags = reinterpret_cast<int32_t*>(ws);
  ws += plan.flags_bytes;
  int32_t* slots = reinterpret_cast<int32_t*>(ws);
  ws += plan.slots_bytes;
  uint8_t* blocked = reinterpret_cast<uint8_t*>(ws);
  ws += plan.blocked_bytes;
  int32_t* table = plan.table_width > 0 ? reinterpret_cast<int32_t*>(ws) : nullptr;

  TP_RETURN_IF_ERROR(cudaMemsetAsync(cu_kept, 0, sizeof(int64_t), stream));
  if (batch > 0) {
    size_t bytes = plan.temp;
    TP_RETURN_IF_ERROR(cub::DeviceScan::InclusiveSum(temp, bytes, keep_counts, cu_kept + 1,
                                                     static_cast<int>(batch), stream));
  }
  if (tv <= 0 || batch <= 0 || total_kept <= 0) return cudaSuccess;

  const int n = static_cast<int>(tv);
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> vals(vals0, vals1);
  TP_RETURN_IF_ERROR(spread_dispatch_float(scores.type, [&](auto tag) {
    using T = decltype(tag);
    sort_keys_kernel<T><<<blocks_for(tv), kThreads, 0, stream>>>(
        scores.data, scores.stride, tv, cu_v, batch, keys.Current(), vals.Current());
    return cudaGetLastError();
  }));
  size_t bytes = plan.temp;
  TP_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(temp, bytes, keys, vals, n, 0,
                                                     32 + spread_sample_bits(batch), stream));
  TP_RETURN_IF_ERROR(cudaMemsetAsync(flags, 0, static_cast<size_t>(tv) * sizeof(int32_t), stream));
  TP_RETURN_IF_ERROR(cudaMemsetAsync(blocked, 0, static_cast<size_t>(tv), stream));
  if (table != nullptr) {
    spread_table_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(coords, tv, cu_v, batch, radius,
                                                                 plan.table_width, table);
    TP_RETURN_IF_ERROR(cudaGetLastError());
  }
  const int64_t pass_blocks = (batch + kSpreadWarps - 1) / kSpreadWarps;
  const unsigned grid = static_cast<unsigned>(pass_blocks < kMaxBlocks ? pass_blocks : kMaxBlocks);
  spread_pass_kernel<<<grid, kSpreadWarps * kWarp, 0, stream>>>(
      vals.Current(), tv, cu_v, batch, keep_counts, coords, radius, table, plan.table_width,
      blocked, flags);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  bytes = plan.temp;
  const int32_t* flags_in = flags;  // the type the plan queried CUB with
  TP_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(temp, bytes, flags_in, slots, n, stream));
  spread_scatter_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(flags, slots, tv, total_kept,
                                                                 kept_idx);
  return cudaGetLastError();
}

}  // namespace tokenprune::cuda
