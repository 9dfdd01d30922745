// Host launchers of the torch-free CUDA kernels in csrc/cuda/*.cu.
//
// Plain CUDA C++: no torch/ATen/c10 header may be included here or in the .cu files, so that
// `nvcc -c` compiles them on a machine with a CPU-only torch (tests/csrc/test_build.py does).
// Every launcher takes raw device pointers, sizes and a stream, checks its own launches and
// returns the first CUDA error (cudaSuccess when all went well). The glue that owns tensors,
// allocation and argument checks is csrc/cuda/ops_cuda.cpp.
//
// Index arrays (offsets, visual_idx, kept_idx, src_idx) are int64 and contiguous: the glue
// converts them. Embedding rows are copied as raw bytes, so the element type does not matter.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tokenprune::cuda {

// Bits of the error word written by the check_* launchers.
enum CheckError : uint32_t {
  kErrCuStart = 1u << 0,     // cu_seqlens[0] != 0
  kErrCuOrder = 1u << 1,     // cu_seqlens decreases
  kErrCuEnd = 1u << 2,       // cu_seqlens[-1] != Tl
  kErrCuVStart = 1u << 3,    // cu_seqlens_v[0] != 0
  kErrCuVOrder = 1u << 4,    // cu_seqlens_v decreases
  kErrCuVEnd = 1u << 5,      // cu_seqlens_v[-1] != Tv
  kErrVidxRange = 1u << 6,   // visual_idx outside [0, sample length)
  kErrVidxOrder = 1u << 7,   // visual_idx not strictly increasing within a sample
  kErrKeptRange = 1u << 8,   // kept_idx outside [0, Tv)
  kErrKeptOrder = 1u << 9,   // kept_idx not strictly increasing
};

// A byte view of 2-D rows: row r starts at data + r * row_stride.
struct Rows {
  const void* data;
  int64_t row_stride;  // bytes
};

// Position ids [R, T_src] (int32 or int64, any strides) gathered to a contiguous [R, T_out].
struct PositionIds {
  const void* src;
  void* dst;
  int64_t rows;        // R
  int64_t src_stride0;  // elements
  int64_t src_stride1;  // elements
  int64_t dst_cols;    // T_out
  int elem_size;       // 4 or 8
};

// Validates kept_idx [tk] against [0, tv): sets *h_err (host) to the error bits.
// Synchronises `stream` (one 4-byte copy). d_err: one device uint32 of scratch.
cudaError_t check_gather_kept(const int64_t* kept_idx, int64_t tk, int64_t tv, uint32_t* d_err,
                              uint32_t* h_err, cudaStream_t stream);

// out[o, :] = src[kept_idx[o], :] (row_bytes bytes each), pos.dst[:, o] = pos.src[:, kept_idx[o]].
// Indices must have been validated.
cudaError_t gather_kept_rows(Rows src, const int64_t* kept_idx, int64_t tk, int64_t row_bytes,
                             void* out, PositionIds pos, cudaStream_t stream);

// Validates the arguments of merge_kept (offsets over [0, tl] and [0, tv] with batch + 1 entries,
// visual_idx per sample, kept_idx) and sets *h_err to the error bits. Synchronises `stream`.
cudaError_t check_merge_kept(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                             const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                             int64_t tk, uint32_t* d_err, uint32_t* h_err, cudaStream_t stream);

// First half of merge_kept, on validated arguments. Writes, for every full-sequence row r < tl:
//   vmap[r] = -1 for a text row, v for the kept visual token v, -2 for a pruned visual token;
//   keep[r] = 1 if the row is in the output (vmap[r] != -2), else 0.
cudaError_t merge_kept_mark(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                            const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                            int64_t tk, int64_t* vmap, int64_t* keep, cudaStream_t stream);

// Second half: from the inclusive prefix sum `scan` [tl] of `keep` and `vmap`, writes
// src_idx [t_out] (the full-sequence row of each output row), cu_out [batch + 1] (int64),
// the output rows out [t_out, row_bytes] (visual rows from `visual`, text rows from `text`) and
// the gathered position ids.
cudaError_t merge_kept_rows(const int64_t* cu, int64_t batch, int64_t tl, const int64_t* vmap,
                            const int64_t* scan, int64_t t_out, Rows text, Rows visual,
                            int64_t row_bytes, int64_t* src_idx, int64_t* cu_out, void* out,
                            PositionIds pos, cudaStream_t stream);

}  // namespace tokenprune::cuda
