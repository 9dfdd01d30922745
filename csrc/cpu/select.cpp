// CPU kernel of tokenprune::_select_topk (contract.md, stage c).
//
// _select_topk(scores [Tv], cu_seqlens_v [B+1], keep_counts [B] int64, total_kept = None)
//     -> (kept_idx [sum(keep_counts)] int64, cu_seqlens_kept [B+1] dtype of cu_seqlens_v)
// total_kept, when given, must be sum(keep_counts) (the CUDA kernel sizes its output by it).
//
// Per sample, keeps the keep_counts[b] best visual tokens by (score desc, index asc), NaN below
// everything, -0.0 == +0.0; kept indices are global (into the packed Tv) and ascending.
//
// Algorithm, O(n) per sample:
//   1. Map every score to an order-preserving uint32 key (core::order_key, shared with the CUDA
//      kernel: NaN -> 0; -0 -> +0; negative floats -> ~bits; others -> bits | 0x80000000), so
//      "higher score" == "higher key".
//   2. Radix select, 8 bits per pass from the top: histogram the candidate keys (those matching
//      the digits chosen so far) by the next digit, walk the bins from the top to find the bin
//      holding the k-th largest key, and count the keys in higher bins as "greater". Stop after
//      four passes, or as soon as the chosen bin must be kept whole.
//   3. One pass in index order keeps the keys above the threshold prefix and the first
//      `k - greater` keys equal to it (ties go to the lower index).
// Large samples are split into chunks processed by different threads: each chunk keeps its own
// histogram row and counts, and a prefix sum over the chunks gives each chunk its output offset
// and its share of the tied keys, so the compaction is parallel too. Small samples run one per
// task, in parallel over the batch.

#include "../core/mass.h"
#include "../core/order_key.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

namespace tokenprune::cpu {
namespace {

constexpr int64_t kChunk = 4096;         // keys per task inside one large sample
constexpr int64_t kLargeSample = 8192;  // samples from this length on are split across threads
constexpr int kBins = 256;               // 8-bit radix digits: four passes at most

using core::order_key;  // shared with the CUDA kernel (csrc/core/order_key.h)

// Per-call scratch of one sample's selection, reused across the samples of a task.
struct Scratch {
  std::vector<int64_t> hist;     // [nchunks * kBins] per-chunk histograms of the current pass
  std::vector<int64_t> greater;  // [nchunks] keys of the chunk above the threshold prefix
  std::vector<int64_t> equal;    // [nchunks] keys of the chunk in the threshold bin
  std::vector<int64_t> offset;   // [nchunks] output offset of the chunk
  std::vector<int64_t> take;     // [nchunks] equal keys the chunk keeps
};

// Runs f(c) for every chunk c in [0, nchunks): on the intra-op thread pool, or in order.
struct ParallelChunks {
  template <class F>
  void operator()(int64_t nchunks, const F& f) const {
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) f(c);
    });
  }
};
struct SerialChunks {
  template <class F>
  void operator()(int64_t nchunks, const F& f) const {
    for (int64_t c = 0; c < nchunks; ++c) f(c);
  }
};

// Writes base + i, ascending, for the top k of keys[0, n) (by key desc, index asc) to out[0, k).
template <class ForEachChunk>
void select_sample(const uint32_t* keys, int64_t n, int64_t k, int64_t base, int64_t* out,
                   int64_t chunk, const ForEachChunk& for_each_chunk, Scratch& s) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = base + i;
    return;
  }
  const int64_t nchunks = (n + chunk - 1) / chunk;
  s.hist.resize(static_cast<size_t>(nchunks * kBins));
  s.greater.assign(static_cast<size_t>(nchunks), 0);
  s.equal.assign(static_cast<size_t>(nchunks), 0);
  s.offset.resize(static_cast<size_t>(nchunks));
  s.take.resize(static_cast<size_t>(nchunks));

  uint32_t prefix = 0;    // digits of the k-th largest key chosen so far
  uint32_t mask = 0;      // bits of those digits
  int64_t remaining = k;  // keys still to keep from inside the current bin
  for (int shift = 24; shift >= 0; shift -= 8) {
    for_each_chunk(nchunks, [&](int64_t c) {
      int64_t* h = s.hist.data() + c * kBins;
      std::fill(h, h + kBins, int64_t{0});
      const int64_t lo = c * chunk;
      const int64_t hi = std::min(n, lo + chunk);
      if (mask == 0) {
        for (int64_t i = lo; i < hi; ++i) ++h[(keys[i] >> shift) & 0xFFu];
      } else {
        for (int64_t i = lo; i < hi; ++i) {
          const uint32_t key = keys[i];
          if ((key & mask) == prefix) ++h[(key >> shift) & 0xFFu];
        }
      }
    });
    std::array<int64_t, kBins> total{};
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t* h = s.hist.data() + c * kBins;
      for (int d = 0; d < kBins; ++d) total[d] += h[d];
    }
    int d = kBins - 1;
    for (; d > 0; --d) {
      if (total[d] >= remaining) break;
      remaining -= total[d];
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t* h = s.hist.data() + c * kBins;
      int64_t above = 0;
      for (int e = d + 1; e < kBins; ++e) above += h[e];
      s.greater[c] += above;
      s.equal[c] = h[d];
    }
    prefix |= static_cast<uint32_t>(d) << shift;
    mask |= 0xFFu << shift;
    if (total[d] == remaining) break;  // the whole bin is kept: its prefix decides
  }

  // Output offsets and each chunk's share of the tied keys (lowest indices first).
  int64_t acc = 0;
  int64_t equal_before = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t t = std::clamp<int64_t>(remaining - equal_before, 0, s.equal[c]);
    equal_before += s.equal[c];
    s.take[c] = t;
    s.offset[c] = acc;
    acc += s.greater[c] + t;
  }
  TORCH_INTERNAL_ASSERT(acc == k, "_select_topk: selected ", acc, " keys instead of ", k);

  for_each_chunk(nchunks, [&](int64_t c) {
    const int64_t lo = c * chunk;
    const int64_t hi = std::min(n, lo + chunk);
    int64_t o = s.offset[c];
    int64_t t = s.take[c];
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t masked = keys[i] & mask;
      if (masked > prefix) {
        out[o++] = base + i;
      } else if (masked == prefix && t > 0) {
        out[o++] = base + i;
        --t;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_topk_cpu(const at::Tensor& scores,
                                                   const at::Tensor& cu_seqlens_v,
                                                   const at::Tensor& keep_counts,
                                                   std::optional<int64_t> total_kept) {
  const c10::Device cpu(c10::kCPU);
  const int64_t tv = check_scores(scores, cpu);
  const std::vector<int64_t> cu = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  const std::vector<int64_t> counts = read_keep_counts(keep_counts, batch);

  std::vector<int64_t> cu_kept(static_cast<size_t>(batch + 1), 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(counts[b] >= 0 && counts[b] <= n, "keep_counts[", b, "] must be in [0, ", n,
                      "] (the sample's visual tokens), got ", counts[b]);
    cu_kept[b + 1] = cu_kept[b] + counts[b];
  }
  TORCH_CHECK_VALUE(!total_kept.has_value() || *total_kept == cu_kept[batch],
                    "total_kept must equal sum(keep_counts) = ", cu_kept[batch], ", got ",
                    total_kept.value_or(0));
  at::Tensor kept_idx = at::empty({cu_kept[batch]}, scores.options().dtype(c10::kLong));
  at::Tensor cu_out = offsets_tensor(cu_kept, cu_seqlens_v.scalar_type());
  if (cu_kept[batch] == 0) return {kept_idx, cu_out};

  // 1. Order-preserving keys of every score.
  std::unique_ptr<uint32_t[]> keys(new uint32_t[static_cast<size_t>(tv)]);
  uint32_t* key_ptr = keys.get();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      c10::kHalf, c10::kBFloat16, scores.scalar_type(), "_select_topk_cpu", [&] {
        const scalar_t* src = scores.const_data_ptr<scalar_t>();
        const int64_t stride = scores.stride(0);
        at::parallel_for(0, tv, 2 * kChunk, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            key_ptr[i] = order_key(static_cast<float>(src[i * stride]));
          }
        });
      });

  int64_t* out = kept_idx.mutable_data_ptr<int64_t>();
  auto is_large = [&](int64_t b) {
    const int64_t n = cu[b + 1] - cu[b];
    return n >= kLargeSample && counts[b] > 0 && counts[b] < n;
  };

  // 2. Large samples one after the other, each split across the threads.
  Scratch scratch;
  int64_t small_work = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (is_large(b)) {
      select_sample(key_ptr + cu[b], cu[b + 1] - cu[b], counts[b], cu[b], out + cu_kept[b],
                    kChunk, ParallelChunks{}, scratch);
    } else if (counts[b] > 0) {
      small_work += cu[b + 1] - cu[b];
    }
  }

  // 3. Small samples, one per task, in parallel over the batch.
  auto run_small = [&](int64_t begin, int64_t end) {
    Scratch local;
    for (int64_t b = begin; b < end; ++b) {
      if (is_large(b)) continue;
      const int64_t n = cu[b + 1] - cu[b];
      select_sample(key_ptr + cu[b], n, counts[b], cu[b], out + cu_kept[b], std::max<int64_t>(n, 1),
                    SerialChunks{}, local);
    }
  };
  if (small_work >= kLargeSample && batch > 1) {
    at::parallel_for(0, batch, 1, run_small);
  } else {
    run_small(0, batch);
  }
  return {kept_idx, cu_out};
}

// _mass_keep_counts(scores [Tv], cu_seqlens_v [B+1], keep_bounds [2, B] int64, keep_mass,
//                   relevance) -> counts [B] int64
// Per sample of n >= 1 tokens: the fewest top tokens (by the selection's order) whose weights
// (core/mass.h) sum to at least keep_mass * total (float64 product), clamped to
// [keep_bounds[0][b], keep_bounds[1][b]]; 0 for an empty sample. The order's prefix sums only
// need the weights sorted by key: tied keys have equal weights, so which of them comes first
// does not change a sum. Each sample packs (order_key << 32 | weight) per token (weights fit 31
// bits), sorts descending and accumulates until the threshold: O(n log n), parallel over the
// batch.
at::Tensor mass_keep_counts_cpu(const at::Tensor& scores, const at::Tensor& cu_seqlens_v,
                                const at::Tensor& keep_bounds, double keep_mass,
                                c10::string_view relevance) {
  const c10::Device cpu(c10::kCPU);
  const int64_t tv = check_scores(scores, cpu);
  const std::vector<int64_t> cu = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  const bool softmax = check_mass_args(keep_bounds, batch, cpu, keep_mass, relevance);
  const std::vector<int64_t> lo = to_int64_vector(keep_bounds[0]);
  const std::vector<int64_t> hi = to_int64_vector(keep_bounds[1]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(n == 0 || (1 <= lo[b] && lo[b] <= hi[b] && hi[b] <= n), "keep_bounds[:, ", b,
                      "] must satisfy 1 <= lo <= hi <= n = ", n, ", got lo = ", lo[b], ", hi = ",
                      hi[b]);
  }
  at::Tensor counts = at::empty({batch}, scores.options().dtype(c10::kLong));
  int64_t* out = counts.mutable_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      c10::kHalf, c10::kBFloat16, scores.scalar_type(), "_mass_keep_counts_cpu", [&] {
        const scalar_t* src = scores.const_data_ptr<scalar_t>();
        const int64_t stride = scores.stride(0);
        at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
          std::vector<uint64_t> packed;
          for (int64_t b = begin; b < end; ++b) {
            const int64_t n = cu[b + 1] - cu[b];
            if (n == 0) {
              out[b] = 0;
              continue;
            }
            float mx = -INFINITY;
            for (int64_t i = cu[b]; i < cu[b + 1]; ++i) {
              const float x = static_cast<float>(src[i * stride]);
              if (!core::is_nan(x) && x > mx) mx = x;
            }
            const int k = core::mass_bits(n);
            packed.resize(static_cast<size_t>(n));
            int64_t total = 0;
            for (int64_t i = 0; i < n; ++i) {
              const float x = static_cast<float>(src[(cu[b] + i) * stride]);
              const int64_t w = core::mass_weight(x, mx, k, softmax);
              total += w;
              packed[i] = (static_cast<uint64_t>(order_key(x)) << 32) | static_cast<uint64_t>(w);
            }
            std::sort(packed.begin(), packed.end(), std::greater<uint64_t>());
            const double threshold = keep_mass * static_cast<double>(total);
            int64_t m = 0;
            int64_t before = 0;  // weight of the tokens ranked above token m
            while (m < n && static_cast<double>(before) < threshold) {
              before += static_cast<int64_t>(packed[m] & 0xFFFFFFFFu);
              ++m;
            }
            out[b] = std::min(std::max(m, lo[b]), hi[b]);
          }
        });
      });
  return counts;
}

}  // namespace
}  // namespace tokenprune::cpu

TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("_select_topk", &tokenprune::cpu::select_topk_cpu);
  m.impl("_mass_keep_counts", &tokenprune::cpu::mass_keep_counts_cpu);
}
