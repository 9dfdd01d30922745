// Torch-free CUDA kernels of tokenprune::_gather_kept and tokenprune::_merge_kept.
//
// Only CUDA C++ here (see kernels.h): the glue in ops_cuda.cpp allocates, checks shapes and
// dtypes, converts index arrays to int64, and calls these launchers on the current stream.
//
// Row copies: one thread block per output row (grid-stride over rows), the block's threads
// stride over the row in the widest vector (16, 8, 4, 2 or 1 bytes) that divides the row size,
// both base addresses and every row stride. Position ids ride along: the first R threads of the
// block copy the row's R position ids.

#include "kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace tokenprune::cuda {
namespace {

constexpr int kThreads = 256;             // threads of the element-wise kernels
constexpr int64_t kMaxBlocks = 1 << 16;   // grid-stride loops cover the rest
constexpr int64_t kTextRow = -1;          // vmap: a text row
constexpr int64_t kPrunedRow = -2;        // vmap: a visual row that is not kept

#define TP_RETURN_IF_ERROR(expr)          \
  do {                                    \
    const cudaError_t tp_err_ = (expr);   \
    if (tp_err_ != cudaSuccess) {         \
      return tp_err_;                     \
    }                                     \
  } while (0)

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// The sample owning packed row i: the largest b in [0, batch) with cu[b] <= i (batch >= 1).
// Stays in bounds even when cu is not monotone (the check kernel reports that separately).
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

// ---------------------------------------------------------------------------------------------
// Argument checks: each thread ORs the error bits it finds into one word.

__global__ void check_gather_kernel(const int64_t* __restrict__ kept, int64_t tk, int64_t tv,
                                    uint32_t* err) {
  uint32_t bits = 0;
  for (int64_t i = global_thread(); i < tk; i += grid_threads()) {
    const int64_t k = kept[i];
    if (k < 0 || k >= tv) bits |= kErrKeptRange;
  }
  if (bits != 0) atomicOr(err, bits);
}

__device__ __forceinline__ uint32_t check_offsets_at(const int64_t* cu, int64_t batch, int64_t total,
                                                     int64_t i, uint32_t start, uint32_t order,
                                                     uint32_t end) {
  uint32_t bits = 0;
  if (i == 0 && cu[0] != 0) bits |= start;
  if (i > 0 && cu[i] < cu[i - 1]) bits |= order;
  if (i == batch && cu[batch] != total) bits |= end;
  return bits;
}

__global__ void check_merge_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                   int64_t batch, int64_t tl, const int64_t* __restrict__ vidx,
                                   int64_t tv, const int64_t* __restrict__ kept, int64_t tk,
                                   int64_t n, uint32_t* err) {
  uint32_t bits = 0;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    if (i <= batch) {
      bits |= check_offsets_at(cu, batch, tl, i, kErrCuStart, kErrCuOrder, kErrCuEnd);
      bits |= check_offsets_at(cu_v, batch, tv, i, kErrCuVStart, kErrCuVOrder, kErrCuVEnd);
    }
    if (i < tv && batch > 0) {
      const int64_t b = sample_of(cu_v, batch, i);
      const int64_t len = cu[b + 1] - cu[b];
      const int64_t p = vidx[i];
      if (p < 0 || p >= len) bits |= kErrVidxRange;
      if (i > cu_v[b] && vidx[i - 1] >= p) bits |= kErrVidxOrder;
    }
    if (i < tk) {
      const int64_t k = kept[i];
      if (k < 0 || k >= tv) bits |= kErrKeptRange;
      if (i > 0 && kept[i - 1] >= k) bits |= kErrKeptOrder;
    }
  }
  if (bits != 0) atomicOr(err, bits);
}

cudaError_t run_check(uint32_t* d_err, uint32_t* h_err, cudaStream_t stream) {
  TP_RETURN_IF_ERROR(cudaGetLastError());
  TP_RETURN_IF_ERROR(
      cudaMemcpyAsync(h_err, d_err, sizeof(uint32_t), cudaMemcpyDeviceToHost, stream));
  return cudaStreamSynchronize(stream);
}

// ---------------------------------------------------------------------------------------------
// Merge bookkeeping.

__global__ void mark_visual_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                   int64_t batch, const int64_t* __restrict__ vidx, int64_t tv,
                                   int64_t* __restrict__ vmap) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t b = sample_of(cu_v, batch, v);
    vmap[cu[b] + vidx[v]] = kPrunedRow;
  }
}

__global__ void mark_kept_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                 int64_t batch, const int64_t* __restrict__ vidx,
                                 const int64_t* __restrict__ kept, int64_t tk,
                                 int64_t* __restrict__ vmap) {
  for (int64_t j = global_thread(); j < tk; j += grid_threads()) {
    const int64_t v = kept[j];
    const int64_t b = sample_of(cu_v, batch, v);
    vmap[cu[b] + vidx[v]] = v;
  }
}

__global__ void keep_flags_kernel(const int64_t* __restrict__ vmap, int64_t tl,
                                  int64_t* __restrict__ keep) {
  for (int64_t r = global_thread(); r < tl; r += grid_threads()) {
    keep[r] = vmap[r] != kPrunedRow ? 1 : 0;
  }
}

__global__ void scatter_src_kernel(const int64_t* __restrict__ vmap,
                                   const int64_t* __restrict__ scan, int64_t tl,
                                   int64_t* __restrict__ src_idx) {
  for (int64_t r = global_thread(); r < tl; r += grid_threads()) {
    if (vmap[r] != kPrunedRow) src_idx[scan[r] - 1] = r;
  }
}

__global__ void out_offsets_kernel(const int64_t* __restrict__ cu, int64_t batch,
                                   const int64_t* __restrict__ scan, int64_t* __restrict__ cu_out) {
  for (int64_t b = global_thread(); b <= batch; b += grid_threads()) {
    const int64_t start = cu[b];
    cu_out[b] = start == 0 ? 0 : scan[start - 1];
  }
}

// ---------------------------------------------------------------------------------------------
// Row copies.

struct GatherSource {
  Rows src;
  const int64_t* idx;
  // Source row of output row o; *col receives the position-id column.
  __device__ __forceinline__ const char* row(int64_t o, int64_t* col) const {
    const int64_t r = idx[o];
    *col = r;
    return static_cast<const char*>(src.data) + r * src.row_stride;
  }
};

struct MergeSource {
  Rows text;
  Rows visual;
  const int64_t* src_idx;
  const int64_t* vmap;
  __device__ __forceinline__ const char* row(int64_t o, int64_t* col) const {
    const int64_t r = src_idx[o];
    *col = r;
    const int64_t v = vmap[r];
    return v >= 0 ? static_cast<const char*>(visual.data) + v * visual.row_stride
                  : static_cast<const char*>(text.data) + r * text.row_stride;
  }
};

__device__ __forceinline__ void copy_position_ids(const PositionIds& pos, int64_t o, int64_t col) {
  for (int64_t i = threadIdx.x; i < pos.rows; i += blockDim.x) {
    const int64_t s = i * pos.src_stride0 + col * pos.src_stride1;
    const int64_t d = i * pos.dst_cols + o;
    if (pos.elem_size == 8) {
      static_cast<int64_t*>(pos.dst)[d] = static_cast<const int64_t*>(pos.src)[s];
    } else {
      static_cast<int32_t*>(pos.dst)[d] = static_cast<const int32_t*>(pos.src)[s];
    }
  }
}

template <typename Vec, typename Source>
__global__ void copy_rows_kernel(Source source, int64_t n_rows, int64_t row_bytes,
                                 char* __restrict__ out, PositionIds pos) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(Vec));
  for (int64_t o = blockIdx.x; o < n_rows; o += gridDim.x) {
    int64_t col = 0;
    const Vec* __restrict__ from = reinterpret_cast<const Vec*>(source.row(o, &col));
    Vec* __restrict__ to = reinterpret_cast<Vec*>(out + o * row_bytes);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) to[i] = from[i];
    copy_position_ids(pos, o, col);
  }
}

// The widest power-of-two access (<= 16 bytes) that divides every value.
inline int vector_width(std::initializer_list<uint64_t> values) {
  uint64_t all = 16;
  for (uint64_t v : values) all |= v;
  return static_cast<int>(all & (~all + 1));  // lowest set bit, at most 16
}

template <typename Source>
cudaError_t launch_copy_rows(const Source& source, int64_t n_rows, int64_t row_bytes, void* out,
                             const PositionIds& pos, int width, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  const int64_t nvec = row_bytes / width;
  const int threads = static_cast<int>(std::clamp<int64_t>((nvec + 31) / 32 * 32, 32, 256));
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(n_rows, kMaxBlocks));
  char* dst = static_cast<char*>(out);
  switch (width) {
    case 16:
      copy_rows_kernel<uint4, Source><<<blocks, threads, 0, stream>>>(source, n_rows, row_bytes,
                                                                       dst, pos);
      break;
    case 8:
      copy_rows_kernel<uint2, Source><<<blocks, threads, 0, stream>>>(source, n_rows, row_bytes,
                                                                       dst, pos);
      break;
    case 4:
      copy_rows_kernel<uint32_t, Source><<<blocks, threads, 0, stream>>>(source, n_rows,
                                                                           row_bytes, dst, pos);
      break;
    case 2:
      copy_rows_kernel<uint16_t, Source><<<blocks, threads, 0, stream>>>(source, n_rows,
                                                                           row_bytes, dst, pos);
      break;
    default:
      copy_rows_kernel<uint8_t, Source><<<blocks, threads, 0, stream>>>(source, n_rows, row_bytes,
                                                                          dst, pos);
      break;
  }
  return cudaGetLastError();
}

inline uint64_t address(const void* p) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p));
}

}  // namespace

cudaError_t check_gather_kept(const int64_t* kept_idx, int64_t tk, int64_t tv, uint32_t* d_err,
                              uint32_t* h_err, cudaStream_t stream) {
  *h_err = 0;
  if (tk <= 0) return cudaSuccess;
  TP_RETURN_IF_ERROR(cudaMemsetAsync(d_err, 0, sizeof(uint32_t), stream));
  check_gather_kernel<<<blocks_for(tk), kThreads, 0, stream>>>(kept_idx, tk, tv, d_err);
  return run_check(d_err, h_err, stream);
}

cudaError_t gather_kept_rows(Rows src, const int64_t* kept_idx, int64_t tk, int64_t row_bytes,
                             void* out, PositionIds pos, cudaStream_t stream) {
  const int width = vector_width({static_cast<uint64_t>(row_bytes),
                                  static_cast<uint64_t>(src.row_stride), address(src.data),
                                  address(out)});
  return launch_copy_rows(GatherSource{src, kept_idx}, tk, row_bytes, out, pos, width, stream);
}

cudaError_t check_merge_kept(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                             const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                             int64_t tk, uint32_t* d_err, uint32_t* h_err, cudaStream_t stream) {
  *h_err = 0;
  const int64_t n = std::max({batch + 1, tv, tk});
  TP_RETURN_IF_ERROR(cudaMemsetAsync(d_err, 0, sizeof(uint32_t), stream));
  check_merge_kernel<<<blocks_for(n), kThreads, 0, stream>>>(cu, cu_v, batch, tl, visual_idx, tv,
                                                             kept_idx, tk, n, d_err);
  return run_check(d_err, h_err, stream);
}

cudaError_t merge_kept_mark(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                            const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                            int64_t tk, int64_t* vmap, int64_t* keep, cudaStream_t stream) {
  if (tl <= 0) return cudaSuccess;
  // All bytes 0xFF: every row starts as a text row (-1).
  static_assert(kTextRow == -1, "the memset below writes -1");
  TP_RETURN_IF_ERROR(cudaMemsetAsync(vmap, 0xFF, static_cast<size_t>(tl) * sizeof(int64_t), stream));
  if (tv > 0) {
    mark_visual_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(cu, cu_v, batch, visual_idx, tv,
                                                                vmap);
    TP_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (tk > 0) {
    mark_kept_kernel<<<blocks_for(tk), kThreads, 0, stream>>>(cu, cu_v, batch, visual_idx,
                                                              kept_idx, tk, vmap);
    TP_RETURN_IF_ERROR(cudaGetLastError());
  }
  keep_flags_kernel<<<blocks_for(tl), kThreads, 0, stream>>>(vmap, tl, keep);
  return cudaGetLastError();
}

cudaError_t merge_kept_rows(const int64_t* cu, int64_t batch, int64_t tl, const int64_t* vmap,
                            const int64_t* scan, int64_t t_out, Rows text, Rows visual,
                            int64_t row_bytes, int64_t* src_idx, int64_t* cu_out, void* out,
                            PositionIds pos, cudaStream_t stream) {
  if (tl <= 0) {  // no rows at all: every offset is 0
    return cudaMemsetAsync(cu_out, 0, static_cast<size_t>(batch + 1) * sizeof(int64_t), stream);
  }
  scatter_src_kernel<<<blocks_for(tl), kThreads, 0, stream>>>(vmap, scan, tl, src_idx);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  out_offsets_kernel<<<blocks_for(batch + 1), kThreads, 0, stream>>>(cu, batch, scan, cu_out);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  const int width = vector_width({static_cast<uint64_t>(row_bytes),
                                  static_cast<uint64_t>(text.row_stride), address(text.data),
                                  static_cast<uint64_t>(visual.row_stride), address(visual.data),
                                  address(out)});
  return launch_copy_rows(MergeSource{text, visual, src_idx, vmap}, t_out, row_bytes, out, pos,
                          width, stream);
}

}  // namespace tokenprune::cuda
