// CPU kernels of tokenprune::_instruction_attention and _instruction_attention_heads
// (contract.md, stage a).
//
// _instruction_attention(q [Tq, Hq, D], k [Tk, Hk, D], cu_seqlens_q, cu_seqlens_k,
//                        visual_idx [Tv], cu_seqlens_v, q_pos [Tq]?, softmax_scale?)
//     -> [Tv] float32: per visual token, the causal softmax over all keys a query sees, read at
//        the token's key and averaged over the Hq heads and the sample's n_q queries.
// _instruction_attention_heads(..., head_groups G) -> [Tv, G] float32: the same averaged over
//        each group of Hq / G consecutive query heads instead (G = Hk: one per key head). The
//        same pass: only the column sums keep the head groups apart (an item's rows belong to
//        one key head; for G > Hk its rows are split by head within the key head's group).
//
// Rows. The rows of sample b and key head g are its n_q * G (query, head of the group) pairs,
// G = Hq / Hk, query-major: all heads that read one key head share every key load. An "item" is
// a run of such rows (all of them unless the scratch budget below splits them), padded to a
// multiple of 16 with zero queries whose results are discarded.
//
// One pass over the keys, the softmax finished through per-tile weights (core/softmax.h):
//   tile   per (item, key tile of kKeyTile keys): the logits tile S^T = K_tile Q^T [keys, rows]
//          as one GEMM (oneDNN's brgemm micro-kernel through ATen; bf16 operands with fp32
//          accumulation for bf16 inputs, fp32 otherwise), the causal mask, the tile's row maxima
//          m_t and sums l_t (base 2), and e = 2^(scale log2(e) (s - max)). The e of visual keys
//          go to a scratch [visual token, row]; the others are only summed.
//   weights per item, by the thread that finishes its last tile: M = max_t m_t,
//          L = sum_t l_t 2^(m_t - M), w_t = 2^(m_t - M) / L.
//   sums   per (item, chunk of visual tokens): dot(e[v, rows], w_{tile(v)}[rows]).
// Then each visual token sums its sample's items in item order and divides by n_q * Hq.
// No [Hq, Tq, Tk] tensor: a scratch buffer holds the visual columns of at most kScratchBytes
// worth of rows. Items go in waves that fit it (an item too large for it alone gets fewer rows;
// the keys are then streamed once per item), two waves in flight on two buffers. All of it runs
// as one ordered task list in one parallel region (run_items). Every output element is summed in
// a fixed order (tiles, items in order, fixed-lane dot products) and the work split depends on
// the shapes only, so the result does not depend on the number of threads.
//
// FLOPs: 2 * D * Hq * sum_b n_q[b] * kv_len[b] (the GEMMs, once per key), plus one exp2 per
// (row, key). Bytes: q once, k once per item (the items of one key head share it through the
// cache when they are in flight together), the scratch written once and read once.

#include "cpu_common.h"

#include "../core/softmax.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace tokenprune::cpu {
namespace {

constexpr int64_t kKeyTile = 128;                     // keys per GEMM tile
constexpr int64_t kRowAlign = 16;                     // rows padded to 16 floats (64 bytes)
constexpr int64_t kScratchBytes = int64_t{8} << 20;   // per scratch buffer (two in flight)
constexpr int64_t kVisualChunk = 256;                 // visual tokens per column-sum task

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether the bf16 tiles can be multiplied as bf16 (VNNI brgemm, fp32 accumulation). ATen's
// brgemm raises when its oneDNN micro-kernel is missing (no AVX-512, or a torch built without
// it); bf16 inputs are then converted to fp32 like fp16 ones.
bool bf16_brgemm_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool available = [] {
    try {
      // [1, 2] x [2, 16] in VNNI layout: c[n] = 1 * 1 + 2 * (n + 1).
      const at::BFloat16 a[2] = {1.0f, 2.0f};
      at::BFloat16 b[32];
      for (int n = 0; n < 16; ++n) {
        b[2 * n] = 1.0f;
        b[2 * n + 1] = static_cast<float>(n + 1);
      }
      float c[16];
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      for (int n = 0; n < 16; ++n) {
        if (c[n] != 1.0f + 2.0f * static_cast<float>(n + 1)) return false;
      }
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available;
}

struct Sample {
  int64_t q0, nq, k0, v0, nv;
  int64_t kv_len;  // keys 0..kv_len-1 are seen by some query
};

// Rows [r0, r1) of sample b's n_q * G rows for key head g (row r: query r / G, head g*G + r%G).
struct Item {
  int64_t b, g, r0, r1, rows;  // rows: r1 - r0 padded to kRowAlign
  int64_t kv_len;              // keys 0..kv_len-1 are seen by some row
  int64_t min_pos;             // every row sees keys 0..min_pos
  int64_t ntiles;
  int64_t scratch = 0;  // offset (floats) of its [nv, rows] e block in the wave's scratch
  int64_t stats = 0;    // offset (floats) of its [ntiles, rows] statistics
  int64_t qpack = 0;    // offset (elements) of its packed queries [D, rows]
  int64_t pos = 0;      // offset of its [rows] query positions
  int64_t partial = 0;  // offset of its [nv] column sums
};

// ---- vectorised tile arithmetic (cloned per ISA level) ----

// Softmax pieces of one tile: c [nkeys, rows] raw logits (changed in place). Masks keys a row
// does not see (key0 + j > pos[r]) when `mask`, writes the tile's row maxima m_t in base-2 units
// (-inf for a row that sees none of its keys) and sums l_t, and e_j = 2^(scale_log2 * (s - max))
// to dst[j] (the scratch row of a visual key, or c's own row). Every loop runs over the rows,
// contiguous, so that it vectorises.
TP_CPU_CLONES void tile_softmax(float* c, int64_t nkeys, int64_t rows, const int32_t* pos,
                                int64_t key0, bool mask, float scale_log2, float* const* dst,
                                float* tile_max, float* tile_sum, float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    shift[r] = core::kNegInf;
    tile_sum[r] = 0.0f;
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    float* row = c + j * rows;
    if (mask) {
      const int32_t key = static_cast<int32_t>(key0 + j);
      for (int64_t r = 0; r < rows; ++r) row[r] = key > pos[r] ? core::kNegInf : row[r];
    }
    for (int64_t r = 0; r < rows; ++r) shift[r] = row[r] > shift[r] ? row[r] : shift[r];
  }
  for (int64_t r = 0; r < rows; ++r) {
    tile_max[r] = shift[r] == core::kNegInf ? core::kNegInf : shift[r] * scale_log2;
    shift[r] = core::softmax_shift(shift[r]);
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    const float* row = c + j * rows;
    float* out = dst[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float e = core::softmax_tile_value(row[r], shift[r], scale_log2);
      out[r] = e;
      tile_sum[r] += e;
    }
  }
}

// The weights of one item: m [ntiles, rows] tile maxima become the tile weights w_t (in place);
// rows from `real` on are padding and get weight 0.
TP_CPU_CLONES void item_weights(float* m, const float* l, int64_t ntiles, int64_t rows,
                                int64_t real, float* row_max, float* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    row_max[r] = core::kNegInf;
    row_sum[r] = 0.0f;
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* mt = m + t * rows;
    for (int64_t r = 0; r < rows; ++r) row_max[r] = mt[r] > row_max[r] ? mt[r] : row_max[r];
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* mt = m + t * rows;
    const float* lt = l + t * rows;
    for (int64_t r = 0; r < rows; ++r) {
      row_sum[r] += core::softmax_rescaled_sum(mt[r], lt[r], row_max[r]);
    }
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    float* mt = m + t * rows;
    for (int64_t r = 0; r < rows; ++r) {
      const float w = core::softmax_tile_weight(mt[r], row_max[r], row_sum[r]);
      mt[r] = r < real ? w : 0.0f;
    }
  }
}

TP_CPU_CLONES float row_dot(const float* a, const float* b, int64_t n) {
  return core::dot_fixed(a, b, n);
}

// The column sum split by head: out[j] = sum of a[r] * b[r] over the n rows r whose head within
// the key head's group, (r0 + r) % group, lies in sub-group j (group / sub heads each), j < sub.
TP_CPU_CLONES void row_dot_split(const float* a, const float* b, int64_t n, int64_t r0,
                                 int64_t group, int64_t sub, float* out) {
  const int64_t per = group / sub;
  for (int64_t j = 0; j < sub; ++j) out[j] = 0.0f;
  for (int64_t r = 0; r < n; ++r) out[((r0 + r) % group) / per] += a[r] * b[r];
}

// ---- the kernel ----

template <typename T>
void pack_queries(const T* q, int64_t sq0, int64_t sq1, int64_t sq2, int64_t d, int64_t group,
                  const Item& it, int64_t q0, bool vnni, void* out) {
  // out: fp32 [D, rows], or bf16 VNNI [D/2, rows, 2]; padding rows are 0.
  const int64_t rows = it.rows;
  for (int64_t rr = 0; rr < rows; ++rr) {
    const int64_t r = it.r0 + rr;
    const bool real = r < it.r1;
    const T* src = real ? q + (q0 + r / group) * sq0 + (it.g * group + r % group) * sq1 : nullptr;
    for (int64_t i = 0; i < d; ++i) {
      if (vnni) {
        auto* o = static_cast<at::BFloat16*>(out);
        o[(i / 2) * rows * 2 + rr * 2 + i % 2] = real ? static_cast<at::BFloat16>(src[i * sq2])
                                                       : at::BFloat16(0.0f);
      } else {
        auto* o = static_cast<float*>(out);
        o[i * rows + rr] = real ? static_cast<float>(src[i * sq2]) : 0.0f;
      }
    }
  }
}

struct Problem {
  at::Tensor q, k;  // k has a dense last dimension
  int64_t hq, hk, group, d;
  int64_t channels = 1;  // output channels G (1: the mean over every head)
  int64_t sub = 1;       // column sums per (item, visual token): head sub-groups of a key head
  float scale_log2;  // softmax scale * log2(e): the logits in base 2
  bool vnni;  // bf16 GEMM operands (else fp32)
  std::vector<Sample> samples;
  std::vector<int32_t> slot;      // per packed key: its sample-local visual index, or -1
  std::vector<int32_t> positions; // per query: its local key position
  const int64_t* visual_idx;      // [Tv] int64 local key positions
};

// The n rows [n, d] of src (row stride `stride`, elements contiguous) as float into dst
// [rows, d]; the rows from n on are zeros. Cloned per ISA level: the fp16 conversion then
// vectorises (F16C); the baseline build converts one value at a time.
template <typename T>
TP_INLINE void rows_as_float(const T* src, int64_t stride, int64_t n, int64_t rows, int64_t d,
                          float* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t i = 0; i < d; ++i) {
      dst[j * d + i] = j < n ? static_cast<float>(src[j * stride + i]) : 0.f;
    }
  }
}
TP_CPU_CLONES void rows_to_float(const float* src, int64_t stride, int64_t n, int64_t rows,
                                 int64_t d, float* dst) {
  rows_as_float(src, stride, n, rows, d, dst);
}
TP_CPU_CLONES void rows_to_float(const at::Half* src, int64_t stride, int64_t n, int64_t rows,
                                 int64_t d, float* dst) {
  rows_as_float(src, stride, n, rows, d, dst);
}
TP_CPU_CLONES void rows_to_float(const at::BFloat16* src, int64_t stride, int64_t n, int64_t rows,
                                 int64_t d, float* dst) {
  rows_as_float(src, stride, n, rows, d, dst);
}

// A key tile as the GEMM's A operand [kKeyTile, D]: straight from k when the tile is full and k
// has the GEMM's dtype, else converted (or copied) into `buf` with zero rows past the tile.
template <typename T>
const void* key_tile(const Problem& p, const T* k, int64_t first_key, int64_t nkeys, int64_t g,
                     void* buf, int64_t* lda) {
  const int64_t sk0 = p.k.stride(0), sk1 = p.k.stride(1), d = p.d;
  const T* src = k + first_key * sk0 + g * sk1;
  constexpr bool is_float = std::is_same_v<T, float>;
  constexpr bool is_bf16 = std::is_same_v<T, at::BFloat16>;
  if (nkeys == kKeyTile && ((is_float && !p.vnni) || (is_bf16 && p.vnni))) {
    *lda = sk0;
    return src;
  }
  *lda = d;
  if (p.vnni) {  // a partial bf16 tile: copied, zero-padded
    auto* o = static_cast<at::BFloat16*>(buf);
    for (int64_t j = 0; j < kKeyTile; ++j) {
      for (int64_t i = 0; i < d; ++i) {
        o[j * d + i] = j < nkeys ? static_cast<at::BFloat16>(src[j * sk0 + i]) : at::BFloat16(0.f);
      }
    }
  } else {
    rows_to_float(src, sk0, nkeys, kKeyTile, d, static_cast<float*>(buf));
  }
  return buf;
}

// One call's work as a list of tasks in dependency order, pulled by the threads in that order
// inside ONE parallel region: pack the queries of every item; then per wave the key tiles of its
// items, then their column sums. A task waits (yielding its core) only for earlier tasks:
//   tile of an item      <- the item's packed queries; the column sums of the wave two back
//                           (the two waves alternate between two scratch buffers)
//   column sums of item  <- the item's weights, computed by whichever thread finishes the item's
//                           last tile
// Since tasks are pulled in order, whatever a task waits for is already running or done: no
// deadlock, with any number of threads. One region instead of four per wave: each region's end
// is a barrier, and on a loaded machine a barrier waits for the most delayed thread.
enum class Kind : uint8_t { kPack, kTile, kSums };
struct Task {
  Kind kind;
  int32_t item;
  int32_t index;  // the tile, or the chunk of kVisualChunk visual tokens
};

inline void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  while (counter.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

template <typename T>
void run_items(const Problem& p, std::vector<Item>& items,
               const std::vector<std::pair<int64_t, int64_t>>& waves, int64_t scratch_size,
               float* out) {
  const int64_t d = p.d;
  const int64_t dp = round_up(d, 2);
  const T* qd = p.q.const_data_ptr<T>();
  const T* kd = p.k.const_data_ptr<T>();
  const int64_t elem = p.vnni ? 2 : 4;
  const int64_t nitems = static_cast<int64_t>(items.size());
  const int64_t nwaves = static_cast<int64_t>(waves.size());

  int64_t stats_size = 0, qpack_size = 0, pos_size = 0, partial_size = 0, max_rows = 0;
  std::vector<int64_t> wave_of(static_cast<size_t>(nitems)), sums_in_wave(nwaves, 0);
  std::vector<Task> tasks;
  for (int64_t i = 0; i < nitems; ++i) {
    Item& it = items[i];
    it.stats = stats_size;
    it.qpack = qpack_size;
    it.pos = pos_size;
    it.partial = partial_size;
    stats_size += it.ntiles * it.rows;
    qpack_size += dp * it.rows;
    pos_size += it.rows;
    partial_size += p.samples[it.b].nv * p.sub;
    max_rows = std::max(max_rows, it.rows);
    tasks.push_back({Kind::kPack, static_cast<int32_t>(i), 0});
  }
  for (int64_t w = 0; w < nwaves; ++w) {
    const auto [first, last] = waves[w];
    for (int64_t i = first; i < last; ++i) {
      wave_of[i] = w;
      for (int64_t t = 0; t < items[i].ntiles; ++t) {
        tasks.push_back({Kind::kTile, static_cast<int32_t>(i), static_cast<int32_t>(t)});
      }
    }
    for (int64_t i = first; i < last; ++i) {
      const int64_t nv = p.samples[items[i].b].nv;
      for (int64_t c = 0; c * kVisualChunk < nv; ++c) {
        tasks.push_back({Kind::kSums, static_cast<int32_t>(i), static_cast<int32_t>(c)});
        ++sums_in_wave[w];
      }
    }
  }
  std::vector<float> tmax(static_cast<size_t>(stats_size)), tsum(static_cast<size_t>(stats_size));
  std::vector<char> qpack(static_cast<size_t>(qpack_size * elem));
  std::vector<int32_t> pos(static_cast<size_t>(pos_size));
  std::vector<float> partial(static_cast<size_t>(partial_size));
  const int64_t buffers = nwaves > 1 ? 2 : 1;
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(buffers * scratch_size)]);
  std::unique_ptr<std::atomic<int64_t>[]> packed(new std::atomic<int64_t>[nitems]);
  std::unique_ptr<std::atomic<int64_t>[]> tiles_done(new std::atomic<int64_t>[nitems]);
  std::unique_ptr<std::atomic<int64_t>[]> weighted(new std::atomic<int64_t>[nitems]);
  std::unique_ptr<std::atomic<int64_t>[]> sums_done(new std::atomic<int64_t>[nwaves]);
  for (int64_t i = 0; i < nitems; ++i) packed[i] = tiles_done[i] = weighted[i] = 0;
  for (int64_t w = 0; w < nwaves; ++w) sums_done[w] = 0;
  auto scratch_of = [&](const Item& it) {
    return scratch.get() + (wave_of[&it - items.data()] % 2) * scratch_size + it.scratch;
  };

  parallel_pull(static_cast<int64_t>(tasks.size()), [&](int64_t n, const auto& next) {
    std::vector<float> c(static_cast<size_t>(kKeyTile * max_rows));
    std::vector<char> abuf(static_cast<size_t>(kKeyTile * dp * elem));
    std::vector<float*> dst(static_cast<size_t>(kKeyTile));
    std::vector<float> shift(static_cast<size_t>(max_rows)), row_sum(shift.size());
    bool used_vnni = false;
    for (int64_t ti = next(); ti < n; ti = next()) {
      const Task task = tasks[ti];
      Item& it = items[task.item];
      const Sample& s = p.samples[it.b];
      const int64_t rows = it.rows;
      if (task.kind == Kind::kPack) {
        pack_queries(qd, p.q.stride(0), p.q.stride(1), p.q.stride(2), d, p.group, it, s.q0,
                     p.vnni, qpack.data() + it.qpack * elem);
        for (int64_t rr = 0; rr < rows; ++rr) {
          const int64_t r = it.r0 + rr;
          pos[it.pos + rr] = r < it.r1 ? p.positions[s.q0 + r / p.group]
                                       : static_cast<int32_t>(it.kv_len - 1);
        }
        packed[task.item].store(1, std::memory_order_release);
      } else if (task.kind == Kind::kTile) {
        const int64_t w = wave_of[task.item];
        wait_for(packed[task.item], 1);
        if (w >= 2) wait_for(sums_done[w - 2], sums_in_wave[w - 2]);
        const int64_t t = task.index;
        const int64_t j0 = t * kKeyTile;
        const int64_t nkeys = std::min(kKeyTile, it.kv_len - j0);
        int64_t lda = 0;
        const void* a = key_tile(p, kd, s.k0 + j0, nkeys, it.g, abuf.data(), &lda);
        const void* b = qpack.data() + it.qpack * elem;
        if (p.vnni) {
          at::native::cpublas::brgemm(kKeyTile, rows, dp, lda, rows, rows, false,
                                      static_cast<const at::BFloat16*>(a),
                                      static_cast<const at::BFloat16*>(b), c.data(), true);
          used_vnni = true;
        } else {
          at::native::cpublas::brgemm(kKeyTile, rows, d, lda, rows, rows, false,
                                      static_cast<const float*>(a), static_cast<const float*>(b),
                                      c.data(), false);
        }
        float* e = scratch_of(it);
        for (int64_t j = 0; j < nkeys; ++j) {
          const int32_t slot = p.slot[s.k0 + j0 + j];
          dst[j] = slot >= 0 ? e + slot * rows : c.data() + j * rows;
        }
        const bool mask = j0 + nkeys - 1 > it.min_pos;
        tile_softmax(c.data(), nkeys, rows, pos.data() + it.pos, j0, mask, p.scale_log2,
                     dst.data(), tmax.data() + it.stats + t * rows,
                     tsum.data() + it.stats + t * rows, shift.data());
        if (tiles_done[task.item].fetch_add(1, std::memory_order_acq_rel) + 1 == it.ntiles) {
          item_weights(tmax.data() + it.stats, tsum.data() + it.stats, it.ntiles, rows,
                       it.r1 - it.r0, shift.data(), row_sum.data());
          weighted[task.item].store(1, std::memory_order_release);
        }
      } else {
        wait_for(weighted[task.item], 1);
        const float* e = scratch_of(it);
        const int64_t v0 = task.index * kVisualChunk;
        const int64_t v1 = std::min(s.nv, v0 + kVisualChunk);
        for (int64_t v = v0; v < v1; ++v) {
          const int64_t key = p.visual_idx[s.v0 + v];
          const float* w = tmax.data() + it.stats + (key / kKeyTile) * rows;
          float* dst_v = partial.data() + it.partial + v * p.sub;
          // A key past every row's position: no row of the item sees it.
          if (key >= it.kv_len) {
            for (int64_t j = 0; j < p.sub; ++j) dst_v[j] = 0.0f;
          } else if (p.sub == 1) {
            dst_v[0] = row_dot(e + v * rows, w, rows);
          } else {
            row_dot_split(e + v * rows, w, it.r1 - it.r0, it.r0, p.group, p.sub, dst_v);
          }
        }
        sums_done[wave_of[task.item]].fetch_add(1, std::memory_order_acq_rel);
      }
    }
    if (used_vnni) at::native::cpublas::brgemm_release(true);
  });

  // Each visual token and channel: the sum over its sample's items (those of the channel's key
  // heads), in item order, over the channel's row count. out is [Tv, G].
  const int64_t nc = p.channels;
  const int64_t heads_per_channel = p.hq / nc;  // query heads of a channel
  const int64_t heads_per_sub = p.group / p.sub;
  std::vector<float> acc(static_cast<size_t>(nc));
  for (int64_t i = 0; i < nitems;) {
    const Sample& s = p.samples[items[i].b];
    int64_t j = i;
    while (j < nitems && items[j].b == items[i].b) ++j;
    const float count = static_cast<float>(s.nq * (p.hq / nc));
    for (int64_t v = 0; v < s.nv; ++v) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = i; k < j; ++k) {
        const float* part = partial.data() + items[k].partial + v * p.sub;
        for (int64_t h = 0; h < p.sub; ++h) {  // sub-group h: first query head g*group + h*per
          acc[(items[k].g * p.group + h * heads_per_sub) / heads_per_channel] += part[h];
        }
      }
      for (int64_t c = 0; c < nc; ++c) out[(s.v0 + v) * nc + c] = acc[c] / count;
    }
    i = j;
  }
}

// Both ops: `groups` output channels (1: the mean over every head); the result is [Tv, groups].
at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         const at::Tensor& visual_idx_in, const at::Tensor& cu_seqlens_v,
                         const std::optional<at::Tensor>& q_pos_in,
                         std::optional<double> softmax_scale, int64_t groups) {
  const c10::Device cpu(c10::kCPU);
  check_dim(q_in, "q", 3, "[Tq, Hq, D]");
  check_float(q_in, "q");
  check_device(q_in, "q", cpu);
  check_dim(k_in, "k", 3, "[Tk, Hk, D]");
  check_device(k_in, "k", cpu);
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type(), "k must have the dtype of q (",
                   q_in.scalar_type(), "), got ", k_in.scalar_type());
  const int64_t tq = q_in.size(0), hq = q_in.size(1), d = q_in.size(2);
  const int64_t tk = k_in.size(0), hk = k_in.size(1);
  TORCH_CHECK_VALUE(k_in.size(2) == d, "k must have the head_dim of q (", d, "), got shape ",
                    k_in.sizes());
  TORCH_CHECK_VALUE(d >= 1 && hq >= 1 && hk >= 1 && hq % hk == 0,
                    "q and k need head_dim >= 1 and Hq a multiple of Hk >= 1, got q ",
                    q_in.sizes(), " and k ", k_in.sizes());
  check_dim(visual_idx_in, "visual_idx", 1, "[Tv]");
  check_index(visual_idx_in, "visual_idx");
  check_device(visual_idx_in, "visual_idx", cpu);
  const int64_t tv = visual_idx_in.size(0);
  const std::vector<int64_t> cq = read_offsets(cu_seqlens_q, "cu_seqlens_q", tq, "Tq");
  const std::vector<int64_t> ck = read_offsets(cu_seqlens_k, "cu_seqlens_k", tk, "Tk");
  const std::vector<int64_t> cv = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  const int64_t batch = static_cast<int64_t>(cq.size()) - 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(ck.size()) == batch + 1 &&
                        static_cast<int64_t>(cv.size()) == batch + 1,
                    "cu_seqlens_q, cu_seqlens_k and cu_seqlens_v must have the same B+1 entries, "
                    "got ", cq.size(), ", ", ck.size(), " and ", cv.size());
  TORCH_CHECK_VALUE(tk < std::numeric_limits<int32_t>::max(), "k has too many rows: ", tk);
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(d));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "softmax_scale must be a finite number > 0, "
                    "got ", scale);

  Problem p;
  p.hq = hq;
  p.hk = hk;
  p.group = hq / hk;
  TORCH_CHECK_VALUE(groups >= 1 && hq % groups == 0,
                    "head_groups must be an int >= 1 dividing the query heads (", hq, "), got ",
                    groups);
  p.channels = groups;
  // A channel holds whole key heads (1 sum per item), whole sub-groups of one key head's group
  // (G / Hk sums), or else the sums are kept per query head (G heads straddle key heads).
  p.sub = hk % groups == 0 ? 1 : (groups % hk == 0 ? groups / hk : hq / hk);
  p.d = d;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.q = q_in;
  p.k = (k_in.size(2) == 1 || k_in.stride(2) == 1) ? k_in : k_in.contiguous();
  const at::Tensor vidx_t = visual_idx_in.to(c10::kLong).contiguous();
  p.visual_idx = vidx_t.const_data_ptr<int64_t>();

  // Query positions: given, or the last n_q keys.
  p.positions.assign(static_cast<size_t>(tq), 0);
  std::vector<int64_t> qpos_given;
  if (q_pos_in.has_value()) {
    const at::Tensor& qp = *q_pos_in;
    check_dim(qp, "q_pos", 1, "[Tq]");
    check_index(qp, "q_pos");
    check_device(qp, "q_pos", cpu);
    TORCH_CHECK_VALUE(qp.size(0) == tq, "q_pos must have one entry per query (", tq, "), got ",
                      qp.size(0));
    qpos_given = to_int64_vector(qp);
  }
  p.slot.assign(static_cast<size_t>(tk), -1);
  for (int64_t b = 0; b < batch; ++b) {
    Sample s{cq[b], cq[b + 1] - cq[b], ck[b], cv[b], cv[b + 1] - cv[b], 0};
    const int64_t nk = ck[b + 1] - ck[b];
    TORCH_CHECK_VALUE(s.nv == 0 || s.nq > 0, "sample ", b, " has ", s.nv,
                      " visual tokens but no instruction queries");
    if (!q_pos_in.has_value()) {
      TORCH_CHECK_VALUE(s.nq <= nk, "sample ", b, " has ", s.nq, " queries but only ", nk,
                        " keys; without q_pos the queries must be the last keys");
    }
    for (int64_t i = 0; i < s.nq; ++i) {
      const int64_t pos = q_pos_in.has_value() ? qpos_given[s.q0 + i] : nk - s.nq + i;
      TORCH_CHECK_VALUE(pos >= 0 && pos < nk, "q_pos[", s.q0 + i, "] = ", pos,
                        " is outside sample ", b, "'s ", nk, " keys");
      p.positions[s.q0 + i] = static_cast<int32_t>(pos);
      s.kv_len = std::max(s.kv_len, pos + 1);
    }
    for (int64_t v = 0; v < s.nv; ++v) {
      const int64_t key = p.visual_idx[s.v0 + v];
      TORCH_CHECK_VALUE(key >= 0 && key < nk, "visual_idx[", s.v0 + v, "] = ", key,
                        " is outside sample ", b, "'s ", nk, " keys");
      TORCH_CHECK_VALUE(v == 0 || key > p.visual_idx[s.v0 + v - 1], "visual_idx must increase "
                        "strictly within a sample, got visual_idx[", s.v0 + v, "] = ", key);
      p.slot[s.k0 + key] = static_cast<int32_t>(v);
    }
    p.samples.push_back(s);
  }

  // every entry written
  at::Tensor out = at::empty({tv, groups}, q_in.options().dtype(c10::kFloat));
  if (tv == 0) return out;
  const c10::ScalarType dtype = q_in.scalar_type();
  p.vnni = dtype == c10::kBFloat16 && d % 2 == 0 && bf16_brgemm_available();

  // Items: every sample's rows per key head, split so that one item's e fit the scratch.
  const int64_t budget = kScratchBytes / static_cast<int64_t>(sizeof(float));
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const Sample& s = p.samples[b];
    if (s.nv == 0) continue;
    const int64_t nrows = s.nq * p.group;
    int64_t chunk = round_up(nrows, kRowAlign);
    if (chunk * s.nv > budget) {
      const int64_t fit = std::max(kRowAlign, budget / s.nv / kRowAlign * kRowAlign);
      const int64_t pieces = (nrows + fit - 1) / fit;
      chunk = round_up((nrows + pieces - 1) / pieces, kRowAlign);
    }
    for (int64_t g = 0; g < hk; ++g) {
      for (int64_t r0 = 0; r0 < nrows; r0 += chunk) {
        Item it{};
        it.b = b;
        it.g = g;
        it.r0 = r0;
        it.r1 = std::min(nrows, r0 + chunk);
        it.rows = round_up(it.r1 - it.r0, kRowAlign);
        it.kv_len = 0;
        it.min_pos = std::numeric_limits<int64_t>::max();
        for (int64_t qi = r0 / p.group; qi <= (it.r1 - 1) / p.group; ++qi) {
          const int64_t pos = p.positions[s.q0 + qi];
          it.kv_len = std::max(it.kv_len, pos + 1);
          it.min_pos = std::min(it.min_pos, pos);
        }
        it.ntiles = (it.kv_len + kKeyTile - 1) / kKeyTile;
        items.push_back(it);
      }
    }
  }

  // Waves of consecutive items whose e fit the scratch together.
  int64_t max_wave = 0;
  std::vector<std::pair<int64_t, int64_t>> waves;
  for (int64_t i = 0; i < static_cast<int64_t>(items.size());) {
    int64_t used = 0, j = i;
    while (j < static_cast<int64_t>(items.size())) {
      const int64_t need = p.samples[items[j].b].nv * items[j].rows;
      if (j > i && used + need > budget) break;
      items[j].scratch = used;
      used += need;
      ++j;
    }
    waves.emplace_back(i, j);
    max_wave = std::max(max_wave, used);
    i = j;
  }
  float* o = out.mutable_data_ptr<float>();
  if (dtype == c10::kFloat) {
    run_items<float>(p, items, waves, max_wave, o);
  } else if (dtype == c10::kHalf) {
    run_items<at::Half>(p, items, waves, max_wave, o);
  } else {
    run_items<at::BFloat16>(p, items, waves, max_wave, o);
  }
  return out;
}

at::Tensor instruction_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& cu_seqlens_k, const at::Tensor& visual_idx,
                                     const at::Tensor& cu_seqlens_v,
                                     const std::optional<at::Tensor>& q_pos,
                                     std::optional<double> softmax_scale) {
  return attention_cpu(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos,
                       softmax_scale, 1)
      .view({-1});
}

at::Tensor instruction_attention_heads_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& visual_idx, const at::Tensor& cu_seqlens_v,
    const std::optional<at::Tensor>& q_pos, std::optional<double> softmax_scale,
    int64_t head_groups) {
  return attention_cpu(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos,
                       softmax_scale, head_groups);
}

}  // namespace
}  // namespace tokenprune::cpu

TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("_instruction_attention", &tokenprune::cpu::instruction_attention_cpu);
  m.impl("_instruction_attention_heads", &tokenprune::cpu::instruction_attention_heads_cpu);
}
