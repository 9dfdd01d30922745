// CPU kernel of tokenprune::_spread_select (contract.md, stage c, "Spread rule").
//
// _spread_select(scores [Tv], cu_seqlens_v [B+1], keep_counts [B] int64, coords [Tv, 3] int32/int64,
//                radius, total_kept = None)
//     -> (kept_idx [sum(keep_counts)] int64, cu_seqlens_kept [B+1] dtype of cu_seqlens_v)
// total_kept, when given, must be sum(keep_counts) (the CUDA kernel sizes its output by it).
//
// Per sample (in parallel over the batch, one sample per task): sort the tokens by
// core::spread_rank_key (order_key desc, index asc: the selection order), run the greedy pass of
// core/spread.h (an accepted token blocks its neighbours, found by binary search in the sample's
// raster-ordered coords; the pass stops at the k-th accepted token), fill up with the suppressed
// tokens in order when fewer than k were accepted, and write the kept indices ascending.
// O(n log n + a (2r + 1) log n) per sample, a <= n the tokens accepted before the pass stops.
// The coords must be strictly increasing within each sample (checked here, O(Tv)).

#include "../core/order_key.h"
#include "../core/spread.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace tokenprune::cpu {
namespace {

// coords [Tv, 3] int32/int64 on the CPU, as a contiguous int64 copy (row-major, 3 per token).
std::vector<int64_t> read_coords(const at::Tensor& coords, int64_t tv) {
  check_dim(coords, "coords", 2, "[Tv, 3]");
  check_index(coords, "coords");
  check_device(coords, "coords", c10::Device(c10::kCPU));
  TORCH_CHECK_VALUE(coords.size(0) == tv && coords.size(1) == 3, "coords must be [Tv = ", tv,
                    ", 3], got shape ", coords.sizes());
  std::vector<int64_t> out(static_cast<size_t>(3 * tv));
  const int64_t s0 = coords.stride(0);
  const int64_t s1 = coords.stride(1);
  AT_DISPATCH_INDEX_TYPES(coords.scalar_type(), "_spread_select_cpu_coords", [&] {
    const index_t* p = coords.const_data_ptr<index_t>();
    for (int64_t i = 0; i < tv; ++i) {
      for (int64_t d = 0; d < 3; ++d) out[3 * i + d] = static_cast<int64_t>(p[i * s0 + d * s1]);
    }
  });
  return out;
}

// Per-task scratch, reused across the samples of a task.
struct SpreadScratch {
  std::vector<uint64_t> rank;    // [n] spread_rank_key, sorted: the visiting order
  std::vector<uint8_t> blocked;  // [n] by local index
  std::vector<int64_t> kept;     // [k] local indices
};

// Writes base + the kept local indices of one sample, ascending, to out[0, k).
void spread_sample(const uint32_t* keys, const int64_t* coords, int64_t n, int64_t k,
                   int64_t radius, int64_t base, int64_t* out, SpreadScratch& s) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = base + i;
    return;
  }
  s.rank.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.rank[i] = core::spread_rank_key(keys[i], i);
  std::sort(s.rank.begin(), s.rank.end());
  auto token = [&](int64_t q) { return static_cast<int64_t>(s.rank[q] & 0xFFFFFFFFu); };
  s.blocked.assign(static_cast<size_t>(n), 0);
  s.kept.resize(static_cast<size_t>(k));

  auto next_free = [&](int64_t q) {
    while (q < n && s.blocked[token(q)] != 0) ++q;
    return q;
  };
  auto accept = [&](int64_t q, int64_t a) { s.kept[a] = token(q); };
  auto block = [&](int64_t q) {
    core::spread_neighbours(coords, n, token(q), radius, [&](int64_t j) { s.blocked[j] = 1; });
  };
  int64_t filled = core::spread_accept(n, k, next_free, accept, block);
  // Fewer than k accepted: the pass ran to the end, so the blocked tokens are the suppressed ones.
  for (int64_t q = 0; q < n && filled < k; ++q) {
    const int64_t i = token(q);
    if (s.blocked[i] != 0) s.kept[filled++] = i;
  }
  TORCH_INTERNAL_ASSERT(filled == k, "_spread_select: kept ", filled, " tokens instead of ", k);
  std::sort(s.kept.begin(), s.kept.end());
  for (int64_t a = 0; a < k; ++a) out[a] = base + s.kept[a];
}

std::tuple<at::Tensor, at::Tensor> spread_select_cpu(const at::Tensor& scores,
                                                     const at::Tensor& cu_seqlens_v,
                                                     const at::Tensor& keep_counts,
                                                     const at::Tensor& coords, int64_t radius,
                                                     std::optional<int64_t> total_kept) {
  const c10::Device cpu(c10::kCPU);
  const int64_t tv = check_scores(scores, cpu);
  const std::vector<int64_t> cu = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  TORCH_CHECK_VALUE(radius >= 0, "radius must be >= 0, got ", radius);
  const std::vector<int64_t> counts = read_keep_counts(keep_counts, batch);
  const std::vector<int64_t> xy = read_coords(coords, tv);

  std::vector<int64_t> cu_kept(static_cast<size_t>(batch + 1), 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(n < (int64_t{1} << 32), "sample ", b, " has ", n,
                      " visual tokens; at most 2^32 - 1 are supported");
    TORCH_CHECK_VALUE(counts[b] >= 0 && counts[b] <= n, "keep_counts[", b, "] must be in [0, ", n,
                      "] (the sample's visual tokens), got ", counts[b]);
    cu_kept[b + 1] = cu_kept[b] + counts[b];
    for (int64_t i = cu[b] + 1; i < cu[b + 1]; ++i) {
      const int64_t* p = xy.data() + 3 * i;
      TORCH_CHECK_VALUE(core::coord_below(xy.data(), i - 1, p[0], p[1], p[2]),
                        "coords must be strictly increasing (segment, row, col) within each "
                        "sample, got coords[", i - 1, "] >= coords[", i, "] in sample ", b);
    }
  }
  TORCH_CHECK_VALUE(!total_kept.has_value() || *total_kept == cu_kept[batch],
                    "total_kept must equal sum(keep_counts) = ", cu_kept[batch], ", got ",
                    total_kept.value_or(0));
  at::Tensor kept_idx = at::empty({cu_kept[batch]}, scores.options().dtype(c10::kLong));
  at::Tensor cu_out = offsets_tensor(cu_kept, cu_seqlens_v.scalar_type());
  if (cu_kept[batch] == 0) return {kept_idx, cu_out};

  std::vector<uint32_t> keys(static_cast<size_t>(tv));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      c10::kHalf, c10::kBFloat16, scores.scalar_type(), "_spread_select_cpu", [&] {
        const scalar_t* src = scores.const_data_ptr<scalar_t>();
        const int64_t stride = scores.stride(0);
        for (int64_t i = 0; i < tv; ++i) {
          keys[i] = core::order_key(static_cast<float>(src[i * stride]));
        }
      });

  int64_t* out = kept_idx.mutable_data_ptr<int64_t>();
  // One sample per task, handed out as threads free up (sample sizes vary widely).
  parallel_pull(batch, [&](int64_t, const auto& next) {
    SpreadScratch scratch;
    for (int64_t b = next(); b < batch; b = next()) {
      spread_sample(keys.data() + cu[b], xy.data() + 3 * cu[b], cu[b + 1] - cu[b], counts[b],
                    radius, cu[b], out + cu_kept[b], scratch);
    }
  });
  return {kept_idx, cu_out};
}

}  // namespace
}  // namespace tokenprune::cpu

TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("_spread_select", &tokenprune::cpu::spread_select_cpu);
}
