// Torch-free CUDA kernels of tokenprune::_gather_kept and tokenprune::_merge_kept, and the merge
// half of the fused select + merge (tokenprune::_select_merge_kept).
//
// Only CUDA C++ here (see kernels.h): the glue in ops_cuda.cpp allocates, checks shapes and
// dtypes, converts index arrays to int64, and calls these launchers on the current stream.
//
// Row copies: one thread block per output row (grid-stride over rows), the block's threads
// stride over the row in the widest vector (16, 8, 4, 2 or 1 bytes) that divides the row size,
// both base addresses and every row stride. Position ids ride along: the first R threads of the
// block copy the row's R position ids.
//
// No value checks and no host synchronisation: the public ops validate the index values before
// these run. Every index read from device memory is bounds-checked before it addresses memory
// (a visual row outside its sample is not marked, an out-of-range source row is copied as zeros),
// so invalid values give unspecified output, never an out-of-bounds access.

#include "device_common.cuh"
#include "kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace tokenprune::cuda {
namespace {

constexpr int64_t kTextRow = -1;    // vmap: a text row
constexpr int64_t kPrunedRow = -2;  // vmap: a visual row that is not kept

// The packed full-sequence row of visual token v (sample b), or -1 when visual_idx[v] is outside
// the sample (or the offsets outside [0, tl]).
__device__ __forceinline__ int64_t visual_row(const int64_t* cu, int64_t b, int64_t tl,
                                              const int64_t* vidx, int64_t v) {
  const int64_t start = cu[b];
  const int64_t end = cu[b + 1];
  const int64_t row = start + vidx[v];
  return (row >= start && row < end && row >= 0 && row < tl) ? row : -1;
}

// ---------------------------------------------------------------------------------------------
// Merge bookkeeping.

__global__ void mark_visual_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                   int64_t batch, int64_t tl, const int64_t* __restrict__ vidx,
                                   int64_t tv, int64_t* __restrict__ vmap) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t row = visual_row(cu, sample_of(cu_v, batch, v), tl, vidx, v);
    if (row >= 0) vmap[row] = kPrunedRow;
  }
}

__global__ void mark_kept_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                 int64_t batch, int64_t tl, const int64_t* __restrict__ vidx,
                                 int64_t tv, const int64_t* __restrict__ kept, int64_t tk,
                                 int64_t* __restrict__ vmap) {
  for (int64_t j = global_thread(); j < tk; j += grid_threads()) {
    const int64_t v = kept[j];
    if (v < 0 || v >= tv) continue;
    const int64_t row = visual_row(cu, sample_of(cu_v, batch, v), tl, vidx, v);
    if (row >= 0) vmap[row] = v;
  }
}

// Every visual row at once from the selection's flags: kept (v) or pruned.
__global__ void mark_flags_kernel(const int64_t* __restrict__ cu, const int64_t* __restrict__ cu_v,
                                  int64_t batch, int64_t tl, const int64_t* __restrict__ vidx,
                                  int64_t tv, const int32_t* __restrict__ flags,
                                  int64_t* __restrict__ vmap) {
  for (int64_t v = global_thread(); v < tv; v += grid_threads()) {
    const int64_t row = visual_row(cu, sample_of(cu_v, batch, v), tl, vidx, v);
    if (row >= 0) vmap[row] = flags[v] != 0 ? v : kPrunedRow;
  }
}

__global__ void keep_flags_kernel(const int64_t* __restrict__ vmap, int64_t tl,
                                  int64_t* __restrict__ keep) {
  for (int64_t r = global_thread(); r < tl; r += grid_threads()) {
    keep[r] = vmap[r] != kPrunedRow ? 1 : 0;
  }
}

__global__ void scatter_src_kernel(const int64_t* __restrict__ vmap,
                                   const int64_t* __restrict__ scan, int64_t tl, int64_t t_out,
                                   int64_t* __restrict__ src_idx) {
  for (int64_t r = global_thread(); r < tl; r += grid_threads()) {
    const int64_t o = scan[r] - 1;
    if (vmap[r] != kPrunedRow && o >= 0 && o < t_out) src_idx[o] = r;
  }
}

__global__ void out_offsets_kernel(const int64_t* __restrict__ cu, int64_t batch, int64_t tl,
                                   const int64_t* __restrict__ scan, int64_t* __restrict__ cu_out) {
  for (int64_t b = global_thread(); b <= batch; b += grid_threads()) {
    const int64_t start = cu[b] < 0 ? 0 : (cu[b] > tl ? tl : cu[b]);
    cu_out[b] = start == 0 ? 0 : scan[start - 1];
  }
}

// ---------------------------------------------------------------------------------------------
// Row copies.

// Row r of `rows`, or null when r is outside [0, rows.count).
__device__ __forceinline__ const char* row_at(const Rows& rows, int64_t r) {
  return (r >= 0 && r < rows.count) ? static_cast<const char*>(rows.data) + r * rows.row_stride
                                    : nullptr;
}

struct GatherSource {
  Rows src;
  const int64_t* idx;
  // Source row of output row o (null: copy zeros); *col receives the position-id column.
  __device__ __forceinline__ const char* row(int64_t o, int64_t* col) const {
    const int64_t r = idx[o];
    *col = r;
    return row_at(src, r);
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
    if (r < 0 || r >= text.count) return nullptr;
    const int64_t v = vmap[r];
    return v >= 0 ? row_at(visual, v) : row_at(text, r);
  }
};

__device__ __forceinline__ void copy_position_ids(const PositionIds& pos, int64_t o, int64_t col) {
  const bool valid = col >= 0 && col < pos.src_cols;
  for (int64_t i = threadIdx.x; i < pos.rows; i += blockDim.x) {
    const int64_t s = i * pos.src_stride0 + col * pos.src_stride1;
    const int64_t d = i * pos.dst_cols + o;
    if (pos.elem_size == 8) {
      static_cast<int64_t*>(pos.dst)[d] = valid ? static_cast<const int64_t*>(pos.src)[s] : 0;
    } else {
      static_cast<int32_t*>(pos.dst)[d] = valid ? static_cast<const int32_t*>(pos.src)[s] : 0;
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
    if (from != nullptr) {
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) to[i] = from[i];
    } else {
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) to[i] = Vec{};
    }
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

cudaError_t gather_kept_rows(Rows src, const int64_t* kept_idx, int64_t tk, int64_t row_bytes,
                             void* out, PositionIds pos, cudaStream_t stream) {
  const int width = vector_width({static_cast<uint64_t>(row_bytes),
                                  static_cast<uint64_t>(src.row_stride), address(src.data),
                                  address(out)});
  return launch_copy_rows(GatherSource{src, kept_idx}, tk, row_bytes, out, pos, width, stream);
}

namespace {

// vmap [tl] all -1 (text rows): every byte 0xFF.
cudaError_t clear_vmap(int64_t* vmap, int64_t tl, cudaStream_t stream) {
  static_assert(kTextRow == -1, "the memset below writes -1");
  return cudaMemsetAsync(vmap, 0xFF, static_cast<size_t>(tl) * sizeof(int64_t), stream);
}

}  // namespace

cudaError_t merge_kept_mark(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                            const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                            int64_t tk, int64_t* vmap, int64_t* keep, cudaStream_t stream) {
  if (tl <= 0) return cudaSuccess;
  TP_RETURN_IF_ERROR(clear_vmap(vmap, tl, stream));
  if (tv > 0 && batch > 0) {
    mark_visual_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(cu, cu_v, batch, tl, visual_idx,
                                                                tv, vmap);
    TP_RETURN_IF_ERROR(cudaGetLastError());
    if (tk > 0) {
      mark_kept_kernel<<<blocks_for(tk), kThreads, 0, stream>>>(cu, cu_v, batch, tl, visual_idx,
                                                                tv, kept_idx, tk, vmap);
      TP_RETURN_IF_ERROR(cudaGetLastError());
    }
  }
  keep_flags_kernel<<<blocks_for(tl), kThreads, 0, stream>>>(vmap, tl, keep);
  return cudaGetLastError();
}

cudaError_t merge_kept_mark_flags(const int64_t* cu, const int64_t* cu_v, int64_t batch,
                                  int64_t tl, const int64_t* visual_idx, int64_t tv,
                                  const int32_t* flags, int64_t* vmap, int64_t* keep,
                                  cudaStream_t stream) {
  if (tl <= 0) return cudaSuccess;
  TP_RETURN_IF_ERROR(clear_vmap(vmap, tl, stream));
  if (tv > 0 && batch > 0) {
    mark_flags_kernel<<<blocks_for(tv), kThreads, 0, stream>>>(cu, cu_v, batch, tl, visual_idx,
                                                               tv, flags, vmap);
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
  scatter_src_kernel<<<blocks_for(tl), kThreads, 0, stream>>>(vmap, scan, tl, t_out, src_idx);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  out_offsets_kernel<<<blocks_for(batch + 1), kThreads, 0, stream>>>(cu, batch, tl, scan, cu_out);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  const int width = vector_width({static_cast<uint64_t>(row_bytes),
                                  static_cast<uint64_t>(text.row_stride), address(text.data),
                                  static_cast<uint64_t>(visual.row_stride), address(visual.data),
                                  address(out)});
  return launch_copy_rows(MergeSource{text, visual, src_idx, vmap}, t_out, row_bytes, out, pos,
                          width, stream);
}

}  // namespace tokenprune::cuda
