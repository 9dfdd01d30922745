// CPU kernel of tokenprune::_mapper_forward (contract.md, stage b).
//
// _mapper_forward(attn [Tv] or [Tv, G] float32, cu_seqlens_v [B+1], params (6 per block + 2),
//                 kernel_size, input_eps, grid [Tv, 2] float32 or None) -> [Tv] float32 logits
//
// Per sample of n tokens: x = log(n * attn + eps) per attention channel, then the grid's two
// channels when given (the first block's C_0 = G (+ 2) inputs); per block a depthwise conv (K taps, zero
// padding per sample, bias), a pointwise C_in -> C_out (bias), LayerNorm over channels and SiLU;
// then a pointwise head C_last -> 1 (core/mapper_block.h holds the per-token arithmetic).
//
// Windows. The packed token axis is cut into windows of kTile output tokens; a window computes
// its tokens plus a halo of H = blocks * (K / 2) tokens each side through every block, in
// thread-local buffers [rows, channels] (token-major, channels contiguous) that stay in the
// core's cache across the blocks. Block b computes only the rows the later blocks need (its
// output range shrinks by K / 2 per block down to the window's own tokens in the last block), so
// every row a depthwise tap reads was computed exactly: no garbage edge, no recomputation
// beyond the halo. A tap reads a row only inside the token's own sample (the per-sample zero
// padding, exact: nothing crosses samples, empty samples cost nothing). Windows cut the packed
// axis, so one window may hold several samples.
//
// Per block: the depthwise conv (vectorised over channels), then per kRowBlock rows the
// pointwise layer as one GEMM (oneDNN's fp32 brgemm micro-kernel through ATen; tiny C_in by
// plain loops) followed at once, while the rows are in L1/L2, by bias + LayerNorm + SiLU (the
// last block dots them with the head instead of storing them). Windows run in parallel; each
// output is computed by one window in a fixed order, so results do not depend on the number of
// threads.

#include "cpu_common.h"

#include "../core/mapper_block.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tokenprune::cpu {
namespace {

constexpr int64_t kTile = 128;     // output tokens per window
constexpr int64_t kRowBlock = 32;  // rows per pointwise GEMM
constexpr int64_t kSmallCin = 8;   // pointwise layers with fewer input channels skip the GEMM
constexpr int64_t kParamsPerBlock = 6;

// One block's parameters, repacked: the depthwise taps tap-major [K, C_in] and the pointwise
// weight transposed [C_in, C_out] (the GEMM's B operand).
struct Block {
  int64_t c_in, c_out;
  const float* dw;     // [K, C_in]
  const float* dw_b;   // [C_in]
  const float* pw;     // [C_in, C_out]
  const float* pw_b;   // [C_out]
  const float* gamma;  // [C_out]
  const float* beta;   // [C_out]
};

// ---- vectorised row arithmetic (cloned per ISA level) ----

// y[q, :] = bias + the taps of x inside [lo[q], hi[q]) for the rows q in [begin, end) (buffer
// rows; x and y [rows, c]).
TP_CPU_CLONES void depthwise_rows(const float* x, float* y, int64_t c, int64_t k,
                                  const float* w, const float* bias, int64_t begin, int64_t end,
                                  const int64_t* lo, const int64_t* hi) {
  const int64_t half = k / 2;
  for (int64_t q = begin; q < end; ++q) {
    float* yq = y + q * c;
    for (int64_t ch = 0; ch < c; ++ch) yq[ch] = bias[ch];
    for (int64_t t = 0; t < k; ++t) {
      const int64_t src = q + t - half;
      if (src < lo[q] || src >= hi[q]) continue;  // the sample's zero padding
      const float* xs = x + src * c;
      const float* wt = w + t * c;
      for (int64_t ch = 0; ch < c; ++ch) yq[ch] += wt[ch] * xs[ch];
    }
  }
}

// y [rows, c_out] = x [rows, c_in] . w [c_in, c_out] for small c_in (no bias).
TP_CPU_CLONES void small_pointwise(const float* x, const float* w, float* y, int64_t rows,
                                   int64_t c_in, int64_t c_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * c_out;
    for (int64_t o = 0; o < c_out; ++o) yr[o] = 0.0f;
    for (int64_t i = 0; i < c_in; ++i) {
      const float xi = x[r * c_in + i];
      const float* wi = w + i * c_out;
      for (int64_t o = 0; o < c_out; ++o) yr[o] += xi * wi[o];
    }
  }
}

// Bias, LayerNorm and SiLU of `rows` GEMM output rows y [rows, c] in place; with `head` the
// activations are instead dotted with it: logits[r] = head . silu(...) + head_bias.
TP_CPU_CLONES void norm_rows(float* y, int64_t rows, int64_t c, const float* bias,
                             const float* gamma, const float* beta, const float* head,
                             float head_bias, float* logits) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * c;
    float mean = 0.0f, rstd = 0.0f;
    core::bias_norm_moments(yr, bias, c, &mean, &rstd);
    if (head != nullptr) {
      logits[r] = core::norm_silu_head(yr, c, mean, rstd, gamma, beta, head, head_bias);
    } else {
      core::norm_silu_row(yr, c, mean, rstd, gamma, beta);
    }
  }
}

// ---- the kernel ----

std::vector<int64_t> check_params(at::TensorList params, int64_t kernel_size, int64_t c0) {
  const int64_t count = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(count >= kParamsPerBlock + 2 && (count - 2) % kParamsPerBlock == 0,
                    "params must hold 6 tensors per block plus 2 for the head (6 * num_blocks + "
                    "2), got ", count);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_TYPE(params[i].scalar_type() == c10::kFloat, "params[", i,
                     "] must be float32, got ", params[i].scalar_type());
    TORCH_CHECK_VALUE(params[i].device().is_cpu(), "params[", i, "] must be on cpu, got ",
                      params[i].device());
  }
  auto expect = [&](int64_t i, std::vector<int64_t> shape) {
    TORCH_CHECK_VALUE(params[i].sizes() == c10::IntArrayRef(shape), "params[", i,
                      "] must have shape ", c10::IntArrayRef(shape), ", got ", params[i].sizes());
  };
  std::vector<int64_t> widths;
  int64_t c_in = c0;
  for (int64_t b = 0; b < (count - 2) / kParamsPerBlock; ++b) {
    const int64_t base = b * kParamsPerBlock;
    expect(base, {c_in, 1, kernel_size});
    expect(base + 1, {c_in});
    const at::Tensor& pw = params[base + 2];
    TORCH_CHECK_VALUE(pw.dim() == 2 && pw.size(1) == c_in && pw.size(0) >= 1, "params[",
                      base + 2, "] must have shape [C_out, ", c_in, "], got ", pw.sizes());
    const int64_t c_out = pw.size(0);
    for (int64_t off = 3; off < kParamsPerBlock; ++off) expect(base + off, {c_out});
    widths.push_back(c_out);
    c_in = c_out;
  }
  expect(count - 2, {1, c_in});
  expect(count - 1, {1});
  return widths;
}

at::Tensor mapper_forward_cpu(const at::Tensor& attn, const at::Tensor& cu_seqlens_v,
                              at::TensorList params, int64_t kernel_size, double input_eps,
                              const std::optional<at::Tensor>& grid) {
  const c10::Device cpu(c10::kCPU);
  TORCH_CHECK_VALUE(attn.dim() == 1 || (attn.dim() == 2 && attn.size(1) >= 1),
                    "attn must be [Tv] or [Tv, G] with G >= 1, got ", attn.sizes());
  TORCH_CHECK_TYPE(attn.scalar_type() == c10::kFloat, "attn must be float32, got ",
                   attn.scalar_type());
  check_device(attn, "attn", cpu);
  const int64_t tv = attn.size(0);
  const int64_t groups = attn.dim() == 1 ? 1 : attn.size(1);
  const bool has_grid = grid.has_value();
  if (has_grid) {
    TORCH_CHECK_VALUE(grid->dim() == 2 && grid->size(0) == tv && grid->size(1) == 2,
                      "grid must be [Tv, 2], got ", grid->sizes());
    TORCH_CHECK_TYPE(grid->scalar_type() == c10::kFloat, "grid must be float32, got ",
                     grid->scalar_type());
    check_device(*grid, "grid", cpu);
  }
  const int64_t c0 = groups + (has_grid ? 2 : 0);
  const std::vector<int64_t> cu = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1,
                    "kernel_size must be an odd int >= 1, got ", kernel_size);
  TORCH_CHECK_VALUE(std::isfinite(input_eps) && input_eps > 0,
                    "input_eps must be a finite float > 0, got ", input_eps);
  const std::vector<int64_t> widths = check_params(params, kernel_size, c0);
  at::Tensor out = at::empty({tv}, attn.options());
  if (tv == 0) return out;

  // Repacked parameters, one buffer.
  const int64_t nblocks = static_cast<int64_t>(widths.size());
  const int64_t k = kernel_size;
  std::vector<int64_t> offsets;
  int64_t total = 0, c_in = c0, max_c = c0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c_out = widths[b];
    offsets.push_back(total);
    total += k * c_in + c_in + c_in * c_out + 3 * c_out;
    max_c = std::max(max_c, c_out);
    c_in = c_out;
  }
  const int64_t head_offset = total;
  total += c_in;
  std::vector<float> packed(static_cast<size_t>(total));
  std::vector<Block> blocks;
  c_in = c0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c_out = widths[b];
    float* base = packed.data() + offsets[b];
    const at::Tensor dw = params[b * kParamsPerBlock].contiguous();
    const at::Tensor pw = params[b * kParamsPerBlock + 2].contiguous();
    const float* dws = dw.const_data_ptr<float>();
    const float* pws = pw.const_data_ptr<float>();
    Block blk{c_in, c_out, base, base + k * c_in, base + k * c_in + c_in, nullptr, nullptr,
              nullptr};
    float* dw_t = base;
    for (int64_t ch = 0; ch < c_in; ++ch) {
      for (int64_t t = 0; t < k; ++t) dw_t[t * c_in + ch] = dws[ch * k + t];
    }
    float* pw_t = base + k * c_in + c_in;
    for (int64_t o = 0; o < c_out; ++o) {
      for (int64_t i = 0; i < c_in; ++i) pw_t[i * c_out + o] = pws[o * c_in + i];
    }
    float* vec = pw_t + c_in * c_out;
    blk.pw_b = vec;
    blk.gamma = vec + c_out;
    blk.beta = vec + 2 * c_out;
    const int64_t sources[4] = {1, 3, 4, 5};
    float* targets[4] = {base + k * c_in, vec, vec + c_out, vec + 2 * c_out};
    for (int i = 0; i < 4; ++i) {
      const at::Tensor src = params[b * kParamsPerBlock + sources[i]].contiguous();
      std::copy_n(src.const_data_ptr<float>(), src.numel(), targets[i]);
    }
    blocks.push_back(blk);
    c_in = c_out;
  }
  {
    const at::Tensor hw = params[nblocks * kParamsPerBlock].contiguous();
    std::copy_n(hw.const_data_ptr<float>(), c_in, packed.data() + head_offset);
  }
  const float* head = packed.data() + head_offset;
  const float head_bias = params[nblocks * kParamsPerBlock + 1].item<float>();

  // Sample of every token.
  std::vector<int64_t> sample_lo(static_cast<size_t>(tv)), sample_hi(static_cast<size_t>(tv));
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    for (int64_t q = cu[b]; q < cu[b + 1]; ++q) {
      sample_lo[q] = cu[b];
      sample_hi[q] = cu[b + 1];
    }
  }

  const float* a = attn.const_data_ptr<float>();
  const int64_t sa = attn.stride(0);
  const int64_t sa_g = attn.dim() == 2 ? attn.stride(1) : 0;
  const float* g = has_grid ? grid->const_data_ptr<float>() : nullptr;
  const int64_t sg = has_grid ? grid->stride(0) : 0;
  const int64_t sg_c = has_grid ? grid->stride(1) : 0;
  float* o = out.mutable_data_ptr<float>();
  const float eps = static_cast<float>(input_eps);
  const int64_t half = k / 2;
  const int64_t halo = nblocks * half;
  const int64_t max_rows = kTile + 2 * halo;
  const int64_t nwindows = (tv + kTile - 1) / kTile;

  parallel_pull(nwindows, [&](int64_t n, const auto& next) {
    std::vector<float> act(static_cast<size_t>(max_rows * max_c));
    std::vector<float> dwb(static_cast<size_t>(max_rows * max_c));
    std::vector<int64_t> lo(static_cast<size_t>(max_rows)), hi(static_cast<size_t>(max_rows));
    for (int64_t w = next(); w < n; w = next()) {
      const int64_t t0 = w * kTile;
      const int64_t t1 = std::min(tv, t0 + kTile);
      const int64_t base = std::max<int64_t>(0, t0 - halo);  // buffer row 0
      const int64_t top = std::min(tv, t1 + halo);
      for (int64_t q = base; q < top; ++q) {
        lo[q - base] = sample_lo[q] - base;
        hi[q - base] = sample_hi[q] - base;
        const float n = static_cast<float>(sample_hi[q] - sample_lo[q]);
        float* row = act.data() + (q - base) * c0;
        for (int64_t ch = 0; ch < groups; ++ch) {
          row[ch] = core::mapper_input(a[q * sa + ch * sa_g], n, eps);
        }
        if (has_grid) {
          row[groups] = g[q * sg];
          row[groups + 1] = g[q * sg + sg_c];
        }
      }
      for (int64_t b = 0; b < nblocks; ++b) {
        const Block& blk = blocks[b];
        const int64_t shrink = (nblocks - 1 - b) * half;
        const int64_t r0 = std::max<int64_t>(0, t0 - shrink) - base;
        const int64_t r1 = std::min(tv, t1 + shrink) - base;
        depthwise_rows(act.data(), dwb.data(), blk.c_in, k, blk.dw, blk.dw_b, r0, r1, lo.data(),
                       hi.data());
        const bool last = b + 1 == nblocks;
        for (int64_t r = r0; r < r1; r += kRowBlock) {
          const int64_t m = std::min(kRowBlock, r1 - r);
          const float* x = dwb.data() + r * blk.c_in;
          float* y = act.data() + r * blk.c_out;
          if (blk.c_in < kSmallCin) {
            small_pointwise(x, blk.pw, y, m, blk.c_in, blk.c_out);
          } else {
            at::native::cpublas::brgemm(m, blk.c_out, blk.c_in, blk.c_in, blk.c_out, blk.c_out,
                                        false, x, blk.pw, y, false);
          }
          norm_rows(y, m, blk.c_out, blk.pw_b, blk.gamma, blk.beta, last ? head : nullptr,
                    head_bias, last ? o + base + r : nullptr);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace tokenprune::cpu

TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("_mapper_forward", &tokenprune::cpu::mapper_forward_cpu);
}
