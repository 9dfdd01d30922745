// Torch-free CUDA kernels of tokenprune::_mapper_forward (docs/contract.md, stage b): the whole
// mapper over the packed visual tokens in one launch (plus one packing launch), every
// intermediate on chip.
//
// Windows with halo. The packed token axis is cut into windows of T output tokens. With L blocks
// of depthwise kernel K (h = K / 2), a window computes rows rho in [0, M), M = T + 2 h L, token
// w0 - h L + rho; block l (1..L) only computes the rows that still matter, [h l, M - h l) (n_l =
// M - 2 h l rows), so the wide late blocks run on little more than the T output rows. Nothing
// leaks across samples: a depthwise tap reads a row only if its token is in the same sample, so
// windows may span samples, and rows outside any sample are ignored.
//
// Per block, in shared memory (a window's working set, sized on the host to fit):
//   1. depthwise: DW[i][c] = bias + sum of the K taps of the block input X in the sample;
//   2. pointwise: X[i][n] = DW[i][:] . W[n][:] on tensor cores in 3xTF32 (a = a_hi + a_lo,
//      w = w_hi + w_lo, a.w ~ a_lo w_hi + a_hi w_lo + a_hi w_hi: about fp32 accuracy), WMMA
//      m16n16k8 fragments, fp32 accumulation; each warp owns 16 output channels and runs all the
//      row tiles of the window with them, so the weights are read once per window (from L2);
//   3. bias and LayerNorm moments per row (core::bias_norm_moments, fixed order), then norm +
//      SiLU (core::norm_silu) in place; in the last block norm + SiLU + the head per row
//      (core::norm_silu_head), the last activations never stored.
// X holds the block input and, once DW is built, the block output; both are sized for the
// largest block. The input feature is core::mapper_input. Weights are packed once per call by
// pack_params_kernel: zero-padded to multiples of 16, the pointwise weights split into tf32
// hi/lo halves. Deterministic (no atomics; fixed orders).

#include "../core/mapper_block.h"
#include "device_common.cuh"
#include "kernels.h"

#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tokenprune::cuda {
namespace {

constexpr int kMapperThreads = 256;
constexpr int kMapperWarps = kMapperThreads / 32;
constexpr int kRowGroup = 4;  // row tiles (16 rows each) a warp accumulates at once
constexpr int kPackAlign = 32;  // floats: every packed tensor starts on 128 bytes

__host__ __device__ constexpr int64_t pad16(int64_t c) {
  return (c + 15) / 16 * 16;
}

__host__ __device__ constexpr int64_t align_floats(int64_t n) {
  return (n + kPackAlign - 1) / kPackAlign * kPackAlign;
}

// Rows computed by block l (0: the input rows) of a window of m rows.
__host__ __device__ constexpr int64_t block_rows(int64_t m, int halo, int l) {
  return m - 2 * static_cast<int64_t>(halo) * l;
}

// ---------------------------------------------------------------------------------------------
// Parameter packing.

__device__ __forceinline__ float to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return nvcuda::wmma::__float_to_tf32(x);
#else
  return x;
#endif
}

// Copies every parameter into the zero-filled packed buffer (one thread per element).
__global__ void pack_params_kernel(MapperArgs a, MapperPlan p, float* __restrict__ packed) {
  const int64_t tid = global_thread();
  const int64_t step = grid_threads();
  const int k = a.kernel_size;
  for (int l = 0; l < a.num_blocks; ++l) {
    const int64_t cin = a.widths[l];
    const int64_t cout = a.widths[l + 1];
    const int64_t kp = pad16(cin);
    const float* const* w = a.params + 6 * l;
    const MapperBlockOffsets& o = p.blocks[l];
    for (int64_t i = tid; i < cin * k; i += step) packed[o.dw_w + i] = w[0][i];
    for (int64_t i = tid; i < cin; i += step) packed[o.dw_b + i] = w[1][i];
    for (int64_t i = tid; i < cout * cin; i += step) {
      const float x = w[2][i];
      const float hi = to_tf32(x);
      const int64_t at = (i / cin) * kp + i % cin;  // [C_out, C_in] -> [C_out, pad16(C_in)]
      packed[o.w_hi + at] = hi;
      packed[o.w_lo + at] = to_tf32(x - hi);
    }
    for (int64_t i = tid; i < cout; i += step) {
      packed[o.pw_b + i] = w[3][i];
      packed[o.ln_w + i] = w[4][i];
      packed[o.ln_b + i] = w[5][i];
    }
  }
  const int64_t last = a.widths[a.num_blocks];
  const float* const* head = a.params + 6 * a.num_blocks;
  for (int64_t i = tid; i < last; i += step) packed[p.head_w + i] = head[0][i];
  if (tid == 0) packed[p.head_b] = head[1][0];
}

// ---------------------------------------------------------------------------------------------
// The window kernel.

// out[i][n] = sum_k dw[i][k] * W[n][k] for rows i < rows_pad (multiple of 16) and n < n_pad,
// k < k_pad (multiples of 16); W given as its tf32 hi/lo halves [n_pad, k_pad].
__device__ __forceinline__ void pointwise_3xtf32(const float* __restrict__ dw,
                                                 const float* __restrict__ w_hi,
                                                 const float* __restrict__ w_lo,
                                                 float* __restrict__ out, int64_t rows_pad,
                                                 int64_t k_pad, int64_t n_pad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  const int warp = threadIdx.x / 32;
  const int64_t row_tiles = rows_pad / 16;
  for (int64_t n0 = 16 * warp; n0 < n_pad; n0 += 16 * kMapperWarps) {
    for (int64_t g = 0; g < row_tiles; g += kRowGroup) {
      const int tiles = static_cast<int>(row_tiles - g < kRowGroup ? row_tiles - g : kRowGroup);
      FragC acc[kRowGroup];
#pragma unroll
      for (int t = 0; t < kRowGroup; ++t) wmma::fill_fragment(acc[t], 0.0f);
      for (int64_t k0 = 0; k0 < k_pad; k0 += 8) {
        FragB b_hi;
        FragB b_lo;
        wmma::load_matrix_sync(b_hi, w_hi + n0 * k_pad + k0, static_cast<unsigned>(k_pad));
        wmma::load_matrix_sync(b_lo, w_lo + n0 * k_pad + k0, static_cast<unsigned>(k_pad));
#pragma unroll
        for (int t = 0; t < kRowGroup; ++t) {
          if (t < tiles) {
            FragA a_hi;
            FragA a_lo;
            wmma::load_matrix_sync(a_hi, dw + (g + t) * 16 * k_pad + k0,
                                   static_cast<unsigned>(k_pad));
#pragma unroll
            for (int e = 0; e < a_hi.num_elements; ++e) {
              const float x = a_hi.x[e];
              a_hi.x[e] = wmma::__float_to_tf32(x);
              a_lo.x[e] = wmma::__float_to_tf32(x - a_hi.x[e]);
            }
            wmma::mma_sync(acc[t], a_lo, b_hi, acc[t]);
            wmma::mma_sync(acc[t], a_hi, b_lo, acc[t]);
            wmma::mma_sync(acc[t], a_hi, b_hi, acc[t]);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < kRowGroup; ++t) {
        if (t < tiles) {
          wmma::store_matrix_sync(out + (g + t) * 16 * n_pad + n0, acc[t],
                                  static_cast<unsigned>(n_pad), wmma::mem_row_major);
        }
      }
    }
  }
#else
  (void)dw;
  (void)w_hi;
  (void)w_lo;
  (void)out;
  (void)rows_pad;
  (void)k_pad;
  (void)n_pad;
  __trap();  // the extension is built for sm_80 and newer only
#endif
}

__global__ void __launch_bounds__(kMapperThreads)
    mapper_window_kernel(MapperArgs a, MapperPlan p, const float* __restrict__ packed) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t m = p.window_rows;
  const int halo = a.kernel_size / 2;
  const int depth = a.num_blocks;
  float* x = reinterpret_cast<float*>(smem);                 // [x_floats]
  float* dw = x + p.x_floats;                                // [dw_floats]
  float* s_mean = dw + p.dw_floats;                          // [m]
  float* s_rstd = s_mean + pad16(m);                         // [m]
  int64_t* s_lo = reinterpret_cast<int64_t*>(s_rstd + pad16(m));  // [m] sample start, -1: none
  int64_t* s_hi = s_lo + pad16(m);                                 // [m] sample end

  const int64_t windows = (a.total + p.tile - 1) / p.tile;
  for (int64_t win = blockIdx.x; win < windows; win += gridDim.x) {
    const int64_t t0 = win * p.tile - static_cast<int64_t>(halo) * depth;  // token of row 0
    __syncthreads();  // the previous window is done with every buffer
    // Rows' samples and the input features (block 0 output: widths[0] channels, padded to 16).
    for (int64_t r = threadIdx.x; r < m; r += blockDim.x) {
      const int64_t t = t0 + r;
      int64_t lo = -1;
      int64_t hi = -1;
      if (t >= 0 && t < a.total) {
        const int64_t b = sample_of(a.cu_v, a.batch, t);
        lo = a.cu_v[b];
        hi = a.cu_v[b + 1];
        if (t < lo || t >= hi) lo = hi = -1;  // offsets that do not cover t (invalid input)
      }
      s_lo[r] = lo;
      s_hi[r] = hi;
    }
    const int64_t in_pad = pad16(a.widths[0]);
    for (int64_t e = threadIdx.x; e < m * in_pad; e += blockDim.x) {
      const int64_t r = e / in_pad;
      const int64_t c = e % in_pad;
      const int64_t t = t0 + r;
      float v = 0.0f;
      if (c < a.attn_groups && t >= 0 && t < a.total) {
        const int64_t b = sample_of(a.cu_v, a.batch, t);
        const float n = static_cast<float>(a.cu_v[b + 1] - a.cu_v[b]);
        v = core::mapper_input(a.attn[t * a.attn_stride + c * a.attn_group_stride], n,
                               a.input_eps);
      } else if (a.grid != nullptr && c < a.widths[0] && t >= 0 && t < a.total) {
        v = a.grid[t * a.grid_stride + (c - a.attn_groups) * a.grid_col_stride];
      }
      x[r * in_pad + c] = v;
    }
    __syncthreads();

    for (int l = 1; l <= depth; ++l) {
      const MapperBlockOffsets& o = p.blocks[l - 1];
      const int64_t cin = a.widths[l - 1];
      const int64_t cout = a.widths[l];
      const int64_t kp = pad16(cin);
      const int64_t np = pad16(cout);
      const int64_t rows = block_rows(m, halo, l);  // output rows i <-> window row h l + i
      const int64_t rows_pad = pad16(rows);
      const int64_t row_base = static_cast<int64_t>(halo) * l;
      // 1. Depthwise: DW[i][c] from input rows i .. i + K - 1 (relative to block l - 1's rows).
      for (int64_t e = threadIdx.x; e < rows_pad * kp; e += blockDim.x) {
        const int64_t i = e / kp;
        const int64_t c = e % kp;
        float acc = 0.0f;
        if (i < rows && c < cin) {
          const int64_t rho = row_base + i;
          const int64_t lo = s_lo[rho];
          const int64_t hi = s_hi[rho];
          acc = packed[o.dw_b + c];
          for (int j = 0; j < a.kernel_size; ++j) {  // taps outside the sample read zeros
            const int64_t t = t0 + rho - halo + j;
            if (t >= lo && t < hi) {
              acc += packed[o.dw_w + c * a.kernel_size + j] * x[(i + j) * kp + c];
            }
          }
        }
        dw[i * kp + c] = acc;
      }
      __syncthreads();
      // 2. Pointwise on tensor cores: X[i][n] for i < rows_pad, n < pad16(C_out).
      pointwise_3xtf32(dw, packed + o.w_hi, packed + o.w_lo, x, rows_pad, kp, np);
      __syncthreads();
      // 3. Bias and the LayerNorm moments, one thread per row.
      for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
        core::bias_norm_moments(x + i * np, packed + o.pw_b, cout, s_mean + i, s_rstd + i);
      }
      __syncthreads();
      if (l == depth) break;  // the last block's norm and SiLU go into the head below
      // 4. Norm, affine and SiLU in place, every thread over the rows' channels; pad channels
      //    (the next block's zero-padded reduction) set to 0.
      for (int64_t e = threadIdx.x; e < rows * np; e += blockDim.x) {
        const int64_t i = e / np;
        const int64_t c = e % np;
        x[e] = c < cout ? core::norm_silu(x[e], s_mean[i], s_rstd[i], packed[o.ln_w + c],
                                          packed[o.ln_b + c])
                        : 0.0f;
      }
      __syncthreads();
    }

    // The last block's norm and SiLU dotted with the head, on the T centre rows (the last
    // block's rows are exactly them): one thread per row.
    const MapperBlockOffsets& last = p.blocks[depth - 1];
    const int64_t cl = a.widths[depth];
    const int64_t lp = pad16(cl);
    const int64_t out_rows = block_rows(m, halo, depth);
    for (int64_t i = threadIdx.x; i < out_rows; i += blockDim.x) {
      const int64_t t = win * p.tile + i;
      if (t < a.total) {
        a.out[t] = core::norm_silu_head(x + i * lp, cl, s_mean[i], s_rstd[i],
                                        packed + last.ln_w, packed + last.ln_b,
                                        packed + p.head_w, packed[p.head_b]);
      }
    }
  }
}

}  // namespace

cudaError_t mapper_plan(const MapperArgs& a, int num_sms, int max_smem_per_block,
                        MapperPlan* p) {
  if (a.num_blocks < 1 || a.num_blocks > kMapperMaxBlocks || a.kernel_size < 1 ||
      a.kernel_size % 2 == 0 || a.attn_groups < 1 ||
      a.widths[0] != a.attn_groups + (a.grid != nullptr ? 2 : 0)) {
    return cudaErrorInvalidValue;
  }
  const int halo = a.kernel_size / 2;
  // Packed parameter offsets (floats).
  int64_t at = 0;
  auto place = [&](int64_t n) {
    const int64_t here = at;
    at += align_floats(n);
    return here;
  };
  for (int l = 0; l < a.num_blocks; ++l) {
    const int64_t cin = a.widths[l];
    const int64_t cout = a.widths[l + 1];
    MapperBlockOffsets& o = p->blocks[l];
    o.dw_w = place(cin * a.kernel_size);
    o.dw_b = place(cin);
    o.w_hi = place(pad16(cout) * pad16(cin));
    o.w_lo = place(pad16(cout) * pad16(cin));
    o.pw_b = place(cout);
    o.ln_w = place(cout);
    o.ln_b = place(cout);
  }
  p->head_w = place(a.widths[a.num_blocks]);
  p->head_b = place(1);
  p->packed_floats = at;

  // The largest tile (a multiple of 16 output tokens, at most 256) whose window fits on chip.
  const int64_t depth_halo = 2 * static_cast<int64_t>(halo) * a.num_blocks;
  p->fits = false;
  for (int64_t tile = 256; tile >= 16; tile -= 16) {
    const int64_t m = tile + depth_halo;
    int64_t x_floats = pad16(m) * pad16(a.widths[0]);
    int64_t dw_floats = 0;
    for (int l = 1; l <= a.num_blocks; ++l) {
      const int64_t rows_pad = pad16(block_rows(m, halo, l));
      const int64_t out = rows_pad * pad16(a.widths[l]);
      const int64_t in = rows_pad * pad16(a.widths[l - 1]);
      x_floats = out > x_floats ? out : x_floats;
      dw_floats = in > dw_floats ? in : dw_floats;
    }
    const size_t bytes = static_cast<size_t>(x_floats + dw_floats + 2 * pad16(m)) * sizeof(float) +
                         static_cast<size_t>(2 * pad16(m)) * sizeof(int64_t);
    if (bytes <= static_cast<size_t>(max_smem_per_block)) {
      p->tile = tile;
      p->window_rows = m;
      p->x_floats = align_floats(x_floats);
      p->dw_floats = align_floats(dw_floats);
      p->smem_bytes = static_cast<size_t>(p->x_floats + p->dw_floats + 2 * pad16(m)) *
                          sizeof(float) +
                      static_cast<size_t>(2 * pad16(m)) * sizeof(int64_t);
      p->fits = p->smem_bytes <= static_cast<size_t>(max_smem_per_block);
      if (p->fits) break;
    }
  }
  const int64_t windows = p->fits ? (a.total + p->tile - 1) / p->tile : 0;
  p->grid = windows < num_sms ? windows : num_sms;
  return cudaSuccess;
}

cudaError_t mapper_forward(const MapperArgs& a, const MapperPlan& p, float* packed,
                           cudaStream_t stream) {
  if (a.total <= 0 || a.batch <= 0) return cudaSuccess;
  if (!p.fits) return cudaErrorInvalidConfiguration;
  TP_RETURN_IF_ERROR(cudaMemsetAsync(
      packed, 0, static_cast<size_t>(p.packed_floats) * sizeof(float), stream));
  pack_params_kernel<<<blocks_for(p.packed_floats / 4), kThreads, 0, stream>>>(a, p, packed);
  TP_RETURN_IF_ERROR(cudaGetLastError());
  static std::atomic<size_t> granted[kMaxDevices];
  TP_RETURN_IF_ERROR(
      allow_dynamic_smem(mapper_window_kernel, p.smem_bytes, granted, kMaxDevices));
  mapper_window_kernel<<<static_cast<unsigned int>(p.grid), kMapperThreads, p.smem_bytes,
                         stream>>>(a, p, packed);
  return cudaGetLastError();
}

}  // namespace tokenprune::cuda
