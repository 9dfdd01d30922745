// Torch-free CUDA kernels of tokenprune::_instruction_attention and _instruction_attention_heads
// (docs/contract.md, stages a and a'): the layer-0 attention of the instruction queries on each
// visual token, averaged over every query head or per group of Hq / C consecutive query heads
// (C output channels; the mean over every head is C = 1), without the [Hq, Tq, Tk] matrix. Three
// launches, no atomics, no host synchronisation:
//
// 1. row_stats_kernel, grid (row tiles, Hk, S). The rows of one sample and one KV head are its
//    n_q * G (query, head of the group) pairs, G = Hq / Hk, packed query-major (row r is query
//    r / G, head kv_head * G + r % G): the G query heads that read one key head share every key
//    tile (GQA). A block takes kRows such rows and one of S contiguous key splits of the keys
//    0..max q_pos, loads key tiles of kKeys keys into shared memory and computes the logit tile
//    [kRows, kKeys] (tensor cores for fp16/bf16 through WMMA, fp32 FMAs for fp32, which stays
//    exact). Each row folds the keys it sees (key <= q_pos) into its running raw max and sum
//    (core::softmax_fold, csrc/core/online_softmax.h) and writes them to scratch [Tq, Hq, S].
// 2. merge_stats_kernel: folds the S partial statistics of every row, in split order.
// 3. visual_colsum_kernel, grid (visual tiles). A block owns kCols visual tokens of one sample
//    and writes their C channels. Channel c's query heads [c Hq / C, (c + 1) Hq / C) are cut at
//    the KV-head boundaries into segments (KV head, run of its query heads); the rows of a
//    segment are its n_q * (heads of the run) (query, head) pairs, query-major as in pass 1. For
//    each segment the block loads the visual tokens' keys of its KV head (gathered through
//    visual_idx; once per KV head, the segments of one KV head being consecutive), then for each
//    row tile recomputes the logits [kRows, kCols] and adds core::softmax_prob over the rows that
//    see the key (visual_idx <= q_pos). The per-column sums run in a fixed order (two threads per
//    column, each over a fixed half of every row tile, combined at the end of the channel), and
//    every output element is written by one block: bitwise deterministic. For C = 1 the segments
//    are the KV heads with all their rows: the same tiles and the same order of every sum as a
//    per-KV-head loop, so _instruction_attention is the C = 1 case of one body.
//
// Varlen without a block table: grids are sized from shapes only (an upper bound of the tiles
// over any split of the packed axis into B samples); each block finds its sample by a loop over
// the B + 1 offsets and returns when its tile index is past the last tile.
//
// Index values are trusted (the public op validates them) but never used unchecked to address
// memory: tokens outside [0, Tq) / [0, Tk), visual positions outside the sample's keys and
// q_pos outside the keys are clamped or skipped.

#include "../core/online_softmax.h"
#include "device_common.cuh"
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tokenprune::cuda {
namespace {

constexpr int kRows = 64;                // query rows per tile
constexpr int kKeys = 64;                // keys per tile (pass 1) / visual tokens per block (pass 3)
constexpr int kCols = kKeys;
constexpr int kWarps = 4;
constexpr int kBlock = 32 * kWarps;      // threads of the tile kernels
constexpr int kLogitLd = kKeys + 4;      // row stride of the float logit tile
constexpr int kMaxSplits = 16;           // key splits of pass 1
constexpr int64_t kMinKeysPerSplit = 256;
constexpr float kNegInf = core::kNegInf;

static_assert(kBlock == 2 * kRows && kBlock == 2 * kCols, "two threads per row / per column");

// Shared-memory element type and row padding per input type: fp16/bf16 stay 16-bit (tensor
// cores), fp32 stays fp32 (FMAs). Rows are padded by 16 bytes against bank conflicts.
template <typename T>
struct Elem {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

__host__ __device__ constexpr int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// Padded head dim: a multiple of 16 (the WMMA k step).
__host__ __device__ constexpr int padded_dim(int64_t d) {
  return static_cast<int>(round_up(d, 16));
}

// Shared memory of one tile kernel: two [64, dp + pad] operand tiles, the [64, 68] float logits
// and a few per-row / per-column arrays (`extra` bytes), each region 128-byte aligned.
template <typename T>
__host__ __device__ constexpr size_t operand_bytes(int dp) {
  return static_cast<size_t>(round_up(static_cast<int64_t>(kRows) * (dp + Elem<T>::kPad) *
                                          static_cast<int64_t>(sizeof(T)),
                                      128));
}
constexpr size_t kLogitBytes = static_cast<size_t>(kRows) * kLogitLd * sizeof(float);
constexpr size_t kExtraBytes = 4 * 128 * sizeof(float);

template <typename T>
__host__ __device__ constexpr size_t tile_smem_bytes(int dp) {
  return 2 * operand_bytes<T>(dp) + kLogitBytes + kExtraBytes;
}

// A tile kernel's layout: the padded head dim, the operand tiles' row stride and the regions of
// its dynamic shared memory (tile_smem_bytes<T>(dp) bytes). The kernels unpack it in one line.
template <typename T>
struct TileSmem {
  int dp;                // head_dim padded to a multiple of 16
  int ld;                // row stride of the operand tiles, dp + pad
  T* q;                  // [kRows, ld] query rows
  T* k;                  // [kKeys, ld] key rows
  float* logit;          // [kRows, kLogitLd]
  unsigned char* extra;  // kExtraBytes for per-row / per-column arrays
  __device__ TileSmem(unsigned char* smem, int64_t head_dim)
      : dp(padded_dim(head_dim)),
        ld(dp + Elem<T>::kPad),
        q(reinterpret_cast<T*>(smem)),
        k(reinterpret_cast<T*>(smem + operand_bytes<T>(dp))),
        logit(reinterpret_cast<float*>(smem + 2 * operand_bytes<T>(dp))),
        extra(smem + 2 * operand_bytes<T>(dp) + kLogitBytes) {}
};

// ---------------------------------------------------------------------------------------------
// Loads and the logit tile.

// Copies 64 rows of head_dim elements into shared memory [64, ld] and zero-fills the padding
// columns [head_dim, dp) and the rows whose source is null. `vec`: every source row and head_dim
// allow 16-byte loads.
template <typename T, typename RowPtr>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, int dp, int head_dim,
                                          bool vec, const RowPtr& row_ptr) {
  if (vec) {
    constexpr int kVec = Elem<T>::kVec;
    const int chunks = dp / kVec;
    for (int i = threadIdx.x; i < kRows * chunks; i += kBlock) {
      const int r = i / chunks;
      const int c = (i % chunks) * kVec;
      const T* src = row_ptr(r);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (src != nullptr && c < head_dim) v = *reinterpret_cast<const uint4*>(src + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < kRows * dp; i += kBlock) {
      const int r = i / dp;
      const int c = i % dp;
      const T* src = row_ptr(r);
      dst[r * ld + c] = (src != nullptr && c < head_dim) ? src[c] : T(0.0f);
    }
  }
}

// logits[r][c] = sum_d a[r][d] * b[c][d] for r, c < 64 (a, b: [64, ld] in shared memory, zero
// beyond head_dim). fp16/bf16: WMMA 16x16x16 tiles, fp32 accumulation, warp w owns rows
// [16w, 16w + 16). fp32: FMAs in a fixed order over d, each thread 8 rows x 4 columns.
template <typename T>
__device__ __forceinline__ void logit_tile(const T* __restrict__ a, const T* __restrict__ b, int ld,
                                           int dp, float* __restrict__ logits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kKeys / 16];
#pragma unroll
  for (int j = 0; j < kKeys / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int k0 = 0; k0 < dp; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + warp * 16 * ld + k0, ld);
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + j * 16 * ld + k0, ld);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kKeys / 16; ++j) {
    wmma::store_matrix_sync(logits + warp * 16 * kLogitLd + j * 16, acc[j], kLogitLd,
                            wmma::mem_row_major);
  }
#else
  (void)a;
  (void)b;
  (void)ld;
  (void)dp;
  (void)logits;
  __trap();  // the extension is built for sm_80 and newer only
#endif
}

template <>
__device__ __forceinline__ void logit_tile<float>(const float* __restrict__ a,
                                                  const float* __restrict__ b, int ld, int dp,
                                                  float* __restrict__ logits) {
  const int r0 = (threadIdx.x / 16) * 8;
  const int c0 = (threadIdx.x % 16) * 4;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  for (int d = 0; d < dp; ++d) {
    float bv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[(c0 + j) * ld + d];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float av = a[(r0 + i) * ld + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) logits[(r0 + i) * kLogitLd + c0 + j] = acc[i][j];
  }
}

// ---------------------------------------------------------------------------------------------
// Samples and rows.

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Sample b's range [start, end) of a packed axis of length total, clamped into [0, total].
struct Range {
  int64_t start;
  int64_t len;
};

__device__ __forceinline__ Range range_of(const int64_t* cu, int64_t b, int64_t total) {
  const int64_t s = clamp64(cu[b], 0, total);
  const int64_t e = clamp64(cu[b + 1], s, total);
  return {s, e - s};
}

// The flat tile `tile` among the samples' tiles: sample b owns cdiv(items(b), per_tile) tiles
// when it has visual tokens, else none. Returns false when `tile` is past the last one.
template <typename Items>
__device__ __forceinline__ bool locate(int64_t tile, int64_t batch, int64_t per_tile,
                                       const int64_t* cu_v, int64_t tv, const Items& items,
                                       int64_t* sample, int64_t* local) {
  int64_t first = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = range_of(cu_v, b, tv).len > 0 ? (items(b) + per_tile - 1) / per_tile : 0;
    if (tile < first + n) {
      *sample = b;
      *local = tile - first;
      return true;
    }
    first += n;
  }
  return false;
}

// The rows of one sample and one run of query heads [head0, head0 + heads) that read one KV
// head: its n_q * heads (query, head) pairs, query-major (row r: query r / heads, head
// head0 + r % heads). Pass 1 takes all G heads of a KV head; pass 3 the part of it in a channel.
struct RowMap {
  int64_t q_start;  // first packed query of the sample
  int64_t n_q;
  int64_t n_k;
  int64_t heads;    // query heads of the run
  int64_t head0;    // its first query head
  const int64_t* q_pos;  // null: the queries are the last n_q keys
  __device__ __forceinline__ int64_t rows() const { return n_q * heads; }
  // Query position of packed row `row` (local to the sample's rows), clamped into [-1, n_k - 1];
  // -1 for a row past the sample's rows (it sees nothing).
  __device__ __forceinline__ int64_t pos(int64_t row) const {
    if (row >= rows()) return -1;
    const int64_t qi = row / heads;
    const int64_t p = q_pos != nullptr ? q_pos[q_start + qi] : n_k - n_q + qi;
    return clamp64(p, -1, n_k - 1);
  }
  __device__ __forceinline__ int64_t token(int64_t row) const { return q_start + row / heads; }
  __device__ __forceinline__ int64_t head(int64_t row) const { return head0 + row % heads; }
};

template <typename T>
__device__ __forceinline__ const T* q_row(const AttentionArgs& a, const RowMap& m, int64_t row) {
  if (row >= m.rows()) return nullptr;
  return static_cast<const T*>(a.q) + m.token(row) * a.q_stride_t + m.head(row) * a.q_stride_h;
}

// ---------------------------------------------------------------------------------------------
// Pass 1: partial row statistics of one key split.

template <typename T>
__global__ void __launch_bounds__(kBlock, 1) row_stats_kernel(AttentionArgs a, int num_splits,
                                                           float* __restrict__ stat_max,
                                                           float* __restrict__ stat_sum) {
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [dp, ld, s_q, s_k, s_logit, extra] = TileSmem<T>(smem, a.head_dim);
  int64_t* s_pos = reinterpret_cast<int64_t*>(extra);  // [kRows] query positions
  __shared__ int64_t s_most[2];

  const int group = static_cast<int>(a.hq / a.hk);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int split = static_cast<int>(blockIdx.z);
  int64_t b = 0;
  int64_t local = 0;
  const int64_t* cu_q = a.cu_q;
  const int64_t tq = a.tq;
  auto rows_of = [cu_q, tq, group](int64_t s) { return range_of(cu_q, s, tq).len * group; };
  if (!locate(blockIdx.x, a.batch, kRows, a.cu_v, a.tv, rows_of, &b, &local)) return;
  const Range rq = range_of(a.cu_q, b, a.tq);
  const Range rk = range_of(a.cu_k, b, a.tk);
  const RowMap map{rq.start, rq.len, rk.len, group, static_cast<int64_t>(kv_head) * group,
                   a.q_pos};
  const int64_t row0 = local * kRows;

  // Keys 0..kv_len-1 are seen by some row of the tile: the largest position of its rows, + 1
  // (warps 0 and 1 own the 64 rows; each reduces its 32, then the two are combined).
  if (threadIdx.x < kRows) {
    const int64_t p = map.pos(row0 + threadIdx.x);
    s_pos[threadIdx.x] = p;
    int64_t most = p;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const int64_t other = __shfl_xor_sync(0xFFFFFFFFu, most, offset);
      most = other > most ? other : most;
    }
    if (threadIdx.x % 32 == 0) s_most[threadIdx.x / 32] = most;
  }
  load_tile<T>(s_q, ld, dp, static_cast<int>(a.head_dim), a.vec,
               [&a, &map, row0](int r) { return q_row<T>(a, map, row0 + r); });
  __syncthreads();
  const int64_t kv_len = (s_most[0] > s_most[1] ? s_most[0] : s_most[1]) + 1;
  const int64_t chunk = round_up((kv_len + num_splits - 1) / num_splits, kKeys);
  const int64_t lo = split * chunk;
  const int64_t hi = lo + chunk < kv_len ? lo + chunk : kv_len;

  // Two threads per row: threads 2r and 2r + 1 own the first / second half of each key tile.
  const int row = threadIdx.x / 2;
  const int half = threadIdx.x % 2;
  const int64_t pos = s_pos[row];
  const float scale_log2 = a.scale * core::kLog2e;  // softmax.h works in base 2
  float run_max = kNegInf;
  float run_sum = 0.0f;
  const T* k_base = static_cast<const T*>(a.k) + kv_head * a.k_stride_h;
  for (int64_t start = lo; start < hi; start += kKeys) {
    const int64_t k_stride = a.k_stride_t;
    const T* k_first = k_base + rk.start * k_stride;
    load_tile<T>(s_k, ld, dp, static_cast<int>(a.head_dim), a.vec,
                 [k_first, k_stride, start, hi](int r) -> const T* {
                   const int64_t key = start + r;
                   return key < hi ? k_first + key * k_stride : nullptr;
                 });
    __syncthreads();
    logit_tile<T>(s_q, s_k, ld, dp, s_logit);
    __syncthreads();
    // The row's keys in this tile: start + c <= pos, start + c < hi.
    const int64_t seen = (pos < hi - 1 ? pos + 1 : hi) - start;  // keys of the tile it sees
    const float* lr = s_logit + row * kLogitLd + half * (kKeys / 2);
    const int64_t c_lo = half * (kKeys / 2);
    float tile_max = kNegInf;
    for (int c = 0; c < kKeys / 2; ++c) {
      if (c_lo + c < seen) tile_max = lr[c] > tile_max ? lr[c] : tile_max;
    }
    const float other_max = __shfl_xor_sync(0xFFFFFFFFu, tile_max, 1);
    tile_max = tile_max > other_max ? tile_max : other_max;
    const float shift = core::softmax_shift(tile_max);
    float tile_sum = 0.0f;
    for (int c = 0; c < kKeys / 2; ++c) {
      if (c_lo + c < seen) tile_sum += core::softmax_tile_value(lr[c], shift, scale_log2);
    }
    // Both lanes hold the same sum (half 0's part first: a fixed order).
    const float other_sum = __shfl_xor_sync(0xFFFFFFFFu, tile_sum, 1);
    tile_sum = half == 0 ? tile_sum + other_sum : other_sum + tile_sum;
    core::softmax_fold(run_max, run_sum, tile_max, tile_sum, scale_log2);
    __syncthreads();  // s_k and s_logit are rewritten by the next tile
  }
  if (half == 0 && row0 + row < map.rows()) {
    const int64_t at = (map.token(row0 + row) * a.hq + map.head(row0 + row)) * num_splits + split;
    stat_max[at] = run_max;
    stat_sum[at] = run_sum;
  }
}

// Pass 2: the S partial statistics of each (query, head) row, folded in split order.
__global__ void merge_stats_kernel(const float* __restrict__ part_max,
                                   const float* __restrict__ part_sum, int64_t rows,
                                   int num_splits, float scale_log2, float* __restrict__ row_max,
                                   float* __restrict__ row_sum) {
  for (int64_t r = global_thread(); r < rows; r += grid_threads()) {
    float m = kNegInf;
    float l = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      core::softmax_fold(m, l, part_max[r * num_splits + s], part_sum[r * num_splits + s],
                         scale_log2);
    }
    row_max[r] = m;
    row_sum[r] = l;
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 3: visual column sums.

template <typename T>
__global__ void __launch_bounds__(kBlock, 1) visual_colsum_kernel(AttentionArgs a,
                                                               const float* __restrict__ row_max,
                                                               const float* __restrict__ row_sum) {
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [dp, ld, s_q, s_k, s_logit, extra] = TileSmem<T>(smem, a.head_dim);
  int64_t* s_key = reinterpret_cast<int64_t*>(extra);            // [kCols] local key, -1: none
  int64_t* s_pos = reinterpret_cast<int64_t*>(extra + 512);      // [kRows] query positions
  float* s_max = reinterpret_cast<float*>(extra + 1024);         // [kRows]
  float* s_sum = reinterpret_cast<float*>(extra + 1024 + 256);   // [kRows]
  float* s_part = reinterpret_cast<float*>(extra + 1024 + 512);  // [kCols] half 1's sums

  const int group = static_cast<int>(a.hq / a.hk);
  int64_t b = 0;
  int64_t local = 0;
  const int64_t* cu_v = a.cu_v;
  const int64_t tv = a.tv;
  auto cols_of = [cu_v, tv](int64_t s) { return range_of(cu_v, s, tv).len; };
  if (!locate(blockIdx.x, a.batch, kCols, a.cu_v, a.tv, cols_of, &b, &local)) return;
  const Range rq = range_of(a.cu_q, b, a.tq);
  const Range rk = range_of(a.cu_k, b, a.tk);
  const Range rv = range_of(a.cu_v, b, a.tv);
  const int64_t v0 = rv.start + local * kCols;
  const int64_t n_cols = rv.start + rv.len - v0 < kCols ? rv.start + rv.len - v0 : kCols;
  if (threadIdx.x < kCols) {
    const int64_t key = threadIdx.x < n_cols ? a.visual_idx[v0 + threadIdx.x] : -1;
    s_key[threadIdx.x] = (key >= 0 && key < rk.len) ? key : -1;
  }

  const int col = threadIdx.x / 2;
  const int half = threadIdx.x % 2;
  const float scale_log2 = a.scale * core::kLog2e;  // softmax.h works in base 2
  const int64_t channels = a.groups;
  const int64_t per_channel = a.hq / channels;  // query heads of a channel
  // The mean of a channel divides by all its n_q * Hq / C (query, head) rows.
  const float count = static_cast<float>(rq.len * per_channel);
  int64_t loaded = -1;  // the KV head whose keys s_k holds
  for (int64_t c = 0; c < channels; ++c) {
    float acc = 0.0f;
    const int64_t h_end = (c + 1) * per_channel;
    for (int64_t h = c * per_channel; h < h_end;) {
      // The segment: query heads [h, h + n) of the channel, all of KV head h / group.
      const int64_t kv_head = h / group;
      const int64_t kv_end = (kv_head + 1) * group;
      const int64_t n = (kv_end < h_end ? kv_end : h_end) - h;
      const RowMap map{rq.start, rq.len, rk.len, n, h, a.q_pos};
      h += n;
      if (kv_head != loaded) {
        loaded = kv_head;
        __syncthreads();  // s_key written / s_k of the previous KV head consumed
        const int64_t k_stride = a.k_stride_t;
        const T* k_first =
            static_cast<const T*>(a.k) + kv_head * a.k_stride_h + rk.start * k_stride;
        load_tile<T>(s_k, ld, dp, static_cast<int>(a.head_dim), a.vec,
                     [k_first, k_stride, s_key](int slot) -> const T* {
                       const int64_t key = s_key[slot];
                       return key >= 0 ? k_first + key * k_stride : nullptr;
                     });
      }
      const int64_t n_rows = map.rows();
      for (int64_t row0 = 0; row0 < n_rows; row0 += kRows) {
        if (threadIdx.x < kRows) {
          const int64_t r = row0 + threadIdx.x;
          s_pos[threadIdx.x] = map.pos(r);
          const int64_t at = r < n_rows ? map.token(r) * a.hq + map.head(r) : -1;
          s_max[threadIdx.x] = at >= 0 ? row_max[at] : kNegInf;
          s_sum[threadIdx.x] = at >= 0 ? row_sum[at] : 0.0f;
        }
        load_tile<T>(s_q, ld, dp, static_cast<int>(a.head_dim), a.vec,
                     [&a, &map, row0](int r) { return q_row<T>(a, map, row0 + r); });
        __syncthreads();
        logit_tile<T>(s_q, s_k, ld, dp, s_logit);
        __syncthreads();
        const int64_t key = s_key[col];
        if (key >= 0) {
          // Rows [32 * half, 32 * half + 32) of the tile, in order.
          for (int i = 0; i < kRows / 2; ++i) {
            const int r = half * (kRows / 2) + i;
            if (key <= s_pos[r]) {
              acc += core::softmax_prob(s_logit[r * kLogitLd + col], s_max[r], s_sum[r],
                                        scale_log2);
            }
          }
        }
        __syncthreads();  // s_q, s_logit and the row arrays are rewritten by the next row tile
      }
    }
    if (half == 1) s_part[col] = acc;
    __syncthreads();
    if (half == 0 && col < n_cols) {
      const float total = acc + s_part[col];
      a.out[(v0 + col) * channels + c] = rq.len > 0 ? total / count : 0.0f;
    }
    __syncthreads();  // s_part is rewritten for the next channel
  }
}

template <typename T>
cudaError_t launch(const AttentionArgs& a, const AttentionPlan& plan, float* ws,
                   cudaStream_t stream) {
  const int dp = padded_dim(a.head_dim);
  const size_t smem = tile_smem_bytes<T>(dp);
  static std::atomic<size_t> granted_stats[kMaxDevices];
  static std::atomic<size_t> granted_colsum[kMaxDevices];
  TP_RETURN_IF_ERROR(allow_dynamic_smem(row_stats_kernel<T>, smem, granted_stats, kMaxDevices));
  TP_RETURN_IF_ERROR(
      allow_dynamic_smem(visual_colsum_kernel<T>, smem, granted_colsum, kMaxDevices));
  const int64_t rows = a.tq * a.hq;
  float* part_max = ws;
  float* part_sum = part_max + rows * plan.splits;
  float* row_max = part_sum + rows * plan.splits;
  float* row_sum = row_max + rows;
  if (plan.row_tiles > 0) {
    const dim3 grid(static_cast<unsigned int>(plan.row_tiles), static_cast<unsigned int>(a.hk),
                    static_cast<unsigned int>(plan.splits));
    row_stats_kernel<T><<<grid, kBlock, smem, stream>>>(a, plan.splits, part_max, part_sum);
    TP_RETURN_IF_ERROR(cudaGetLastError());
    merge_stats_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
        part_max, part_sum, rows, plan.splits, a.scale * core::kLog2e, row_max, row_sum);
    TP_RETURN_IF_ERROR(cudaGetLastError());
  }
  visual_colsum_kernel<T><<<static_cast<unsigned int>(plan.visual_tiles), kBlock, smem, stream>>>(
      a, row_max, row_sum);
  return cudaGetLastError();
}

// Upper bound of the tiles of `per_tile` items over any split of `total` items into `batch`
// samples: sum_b cdiv(n_b, per_tile) <= (total + batch * (per_tile - 1)) / per_tile, and never
// more than `total` (a tile holds at least one item).
int64_t tiles_upper(int64_t total, int64_t batch, int64_t per_tile) {
  const int64_t bound = (total + batch * (per_tile - 1)) / per_tile;
  return bound < total ? bound : total;
}

}  // namespace

cudaError_t instruction_attention_plan(const AttentionArgs& a, int num_sms,
                                       int max_smem_per_block, AttentionPlan* plan) {
  if (a.hk <= 0 || a.hq % a.hk != 0 || a.head_dim <= 0 || a.groups <= 0 ||
      a.hq % a.groups != 0) {
    return cudaErrorInvalidValue;
  }
  const int dp = padded_dim(a.head_dim);
  switch (a.type) {
    case FloatType::kFloat32:
      plan->smem_bytes = tile_smem_bytes<float>(dp);
      break;
    case FloatType::kFloat16:
      plan->smem_bytes = tile_smem_bytes<__half>(dp);
      break;
    case FloatType::kBFloat16:
      plan->smem_bytes = tile_smem_bytes<__nv_bfloat16>(dp);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  plan->fits = plan->smem_bytes <= static_cast<size_t>(max_smem_per_block);
  const int64_t group = a.hq / a.hk;
  plan->row_tiles = tiles_upper(a.tq * group, a.batch, kRows);
  plan->visual_tiles = tiles_upper(a.tv, a.batch, kCols);
  // About two waves of pass-1 blocks, each split at least kMinKeysPerSplit keys.
  int64_t splits = 1;
  const int64_t blocks = plan->row_tiles * a.hk;
  if (blocks > 0) splits = (2 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  int64_t most = a.tk / kMinKeysPerSplit;
  most = most < kMaxSplits ? most : kMaxSplits;
  splits = splits < most ? splits : most;
  plan->splits = static_cast<int>(splits < 1 ? 1 : splits);
  const int64_t rows = a.tq * a.hq;
  plan->workspace_bytes = static_cast<size_t>(2 * rows * plan->splits + 2 * rows) * sizeof(float);
  return cudaSuccess;
}

cudaError_t instruction_attention(const AttentionArgs& a, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream) {
  if (a.tv <= 0 || a.batch <= 0) return cudaSuccess;
  if (!plan.fits) return cudaErrorInvalidConfiguration;
  float* ws = static_cast<float*>(workspace);
  switch (a.type) {
    case FloatType::kFloat32:
      return launch<float>(a, plan, ws, stream);
    case FloatType::kFloat16:
      return launch<__half>(a, plan, ws, stream);
    case FloatType::kBFloat16:
      return launch<__nv_bfloat16>(a, plan, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tokenprune::cuda
