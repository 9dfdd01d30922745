// CUDA glue of tokenprune::_gather_kept and tokenprune::_merge_kept (compiled in CUDA builds only).
//
// Owns what needs torch: argument checks (the device-agnostic ones shared with the CPU kernels, in
// ../checks.h), allocation (caching allocator), the current stream and device guard, the int64
// conversion of index arrays and one cumsum. The kernels themselves are torch-free, in gather.cu,
// behind the launchers of kernels.h.
//
// Value checks (offsets monotone and ending at the packed length, indices in range and ordered)
// run on the device and come back as one 4-byte error word: each op synchronises its stream once,
// before any index is used to address memory, and raises ValueError naming the argument.

#include "../checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace tokenprune::cuda {
namespace {

// `t` itself when its rows are dense (last stride 1), else a contiguous copy.
at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

Rows rows_of(const at::Tensor& dense) {
  return Rows{dense.const_data_ptr(), dense.stride(0) * static_cast<int64_t>(dense.element_size())};
}

PositionIds position_ids_of(const at::Tensor& src, at::Tensor& dst) {
  PositionIds p;
  p.src = src.const_data_ptr();
  p.dst = dst.mutable_data_ptr();
  p.rows = src.size(0);
  p.src_stride0 = src.stride(0);
  p.src_stride1 = src.stride(1);
  p.dst_cols = dst.size(1);
  p.elem_size = static_cast<int>(src.element_size());
  return p;
}

at::Tensor as_int64(const at::Tensor& t) {
  return t.to(c10::kLong).contiguous();
}

uint32_t* error_word(const at::Tensor& scratch) {
  return reinterpret_cast<uint32_t*>(scratch.mutable_data_ptr<int32_t>());
}

std::tuple<at::Tensor, at::Tensor> gather_kept_cuda(const at::Tensor& visual_embeds,
                                                    const at::Tensor& position_ids,
                                                    const at::Tensor& kept_idx) {
  const GatherKeptSizes sizes =
      check_gather_kept_args(visual_embeds, position_ids, kept_idx, c10::kCUDA);
  const c10::Device device = sizes.device;
  const int64_t tv = sizes.tv;
  const int64_t hidden = sizes.hidden;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const at::Tensor idx = kept_idx.contiguous();
  const int64_t tk = idx.size(0);

  at::Tensor embeds = at::empty({tk, hidden}, visual_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), tk}, position_ids.options());
  if (tk == 0) return {embeds, pos};

  const at::Tensor scratch = at::empty({1}, idx.options().dtype(c10::kInt));
  uint32_t bits = 0;
  C10_CUDA_CHECK(check_gather_kept(idx.const_data_ptr<int64_t>(), tk, tv, error_word(scratch),
                                   &bits, stream));
  TORCH_CHECK_VALUE((bits & kErrKeptRange) == 0, "kept_idx has entries out of range for Tv = ", tv,
                    " visual tokens");

  const at::Tensor src = dense_rows(visual_embeds);
  const int64_t row_bytes = hidden * static_cast<int64_t>(visual_embeds.element_size());
  C10_CUDA_CHECK(gather_kept_rows(rows_of(src), idx.const_data_ptr<int64_t>(), tk, row_bytes,
                                  embeds.mutable_data_ptr(), position_ids_of(position_ids, pos),
                                  stream));
  return {embeds, pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_kept_cuda(
    const at::Tensor& inputs_embeds, const at::Tensor& position_ids, const at::Tensor& cu_seqlens,
    const at::Tensor& visual_embeds, const at::Tensor& visual_idx, const at::Tensor& cu_seqlens_v,
    const at::Tensor& kept_idx) {
  const MergeKeptSizes sizes =
      check_merge_kept_args(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                            cu_seqlens_v, kept_idx, c10::kCUDA);
  const c10::Device device = sizes.device;
  const int64_t tl = sizes.tl;
  const int64_t tv = sizes.tv;
  const int64_t hidden = sizes.hidden;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t batch = cu_seqlens.size(0) - 1;
  const at::Tensor cu = as_int64(cu_seqlens);
  const at::Tensor cu_v = as_int64(cu_seqlens_v);
  const at::Tensor vidx = as_int64(visual_idx);
  const at::Tensor kept = kept_idx.contiguous();
  const int64_t tk = kept.size(0);
  const at::TensorOptions long_opts = cu.options();

  const at::Tensor scratch = at::empty({1}, long_opts.dtype(c10::kInt));
  uint32_t bits = 0;
  C10_CUDA_CHECK(check_merge_kept(cu.const_data_ptr<int64_t>(), cu_v.const_data_ptr<int64_t>(),
                                  batch, tl, vidx.const_data_ptr<int64_t>(), tv,
                                  kept.const_data_ptr<int64_t>(), tk, error_word(scratch), &bits,
                                  stream));
  TORCH_CHECK_VALUE(!(bits & kErrCuStart), "cu_seqlens[0] must be 0");
  TORCH_CHECK_VALUE(!(bits & kErrCuOrder), "cu_seqlens must never decrease");
  TORCH_CHECK_VALUE(!(bits & kErrCuEnd), "cu_seqlens[-1] must equal Tl = ", tl);
  TORCH_CHECK_VALUE(!(bits & kErrCuVStart), "cu_seqlens_v[0] must be 0");
  TORCH_CHECK_VALUE(!(bits & kErrCuVOrder), "cu_seqlens_v must never decrease");
  TORCH_CHECK_VALUE(!(bits & kErrCuVEnd), "cu_seqlens_v[-1] must equal Tv = ", tv);
  TORCH_CHECK_VALUE(!(bits & kErrVidxRange),
                    "visual_idx has entries out of range for their sample's length");
  TORCH_CHECK_VALUE(!(bits & kErrVidxOrder),
                    "visual_idx must be strictly increasing within a sample");
  TORCH_CHECK_VALUE(!(bits & kErrKeptRange), "kept_idx has entries out of range for Tv = ", tv,
                    " visual tokens");
  TORCH_CHECK_VALUE(!(bits & kErrKeptOrder), "kept_idx must be strictly increasing");

  // Valid arguments: the visual rows are distinct rows of their samples, the kept ones too.
  const int64_t t_out = tl - tv + tk;
  const at::Tensor vmap = at::empty({tl}, long_opts);
  const at::Tensor keep = at::empty({tl}, long_opts);
  C10_CUDA_CHECK(merge_kept_mark(cu.const_data_ptr<int64_t>(), cu_v.const_data_ptr<int64_t>(),
                                 batch, tl, vidx.const_data_ptr<int64_t>(), tv,
                                 kept.const_data_ptr<int64_t>(), tk,
                                 vmap.mutable_data_ptr<int64_t>(), keep.mutable_data_ptr<int64_t>(),
                                 stream));
  const at::Tensor scan = at::cumsum(keep, 0);

  at::Tensor src_idx = at::empty({t_out}, long_opts);
  at::Tensor cu_out = at::empty({batch + 1}, long_opts);
  at::Tensor embeds = at::empty({t_out, hidden}, inputs_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), t_out}, position_ids.options());
  const at::Tensor text = dense_rows(inputs_embeds);
  const at::Tensor visual = dense_rows(visual_embeds);
  const int64_t row_bytes = hidden * static_cast<int64_t>(inputs_embeds.element_size());
  C10_CUDA_CHECK(merge_kept_rows(cu.const_data_ptr<int64_t>(), batch, tl,
                                 vmap.const_data_ptr<int64_t>(), scan.const_data_ptr<int64_t>(),
                                 t_out, rows_of(text), rows_of(visual), row_bytes,
                                 src_idx.mutable_data_ptr<int64_t>(),
                                 cu_out.mutable_data_ptr<int64_t>(), embeds.mutable_data_ptr(),
                                 position_ids_of(position_ids, pos), stream));
  if (cu_seqlens.scalar_type() != c10::kLong) cu_out = cu_out.to(cu_seqlens.scalar_type());
  return {embeds, pos, cu_out, src_idx};
}

}  // namespace
}  // namespace tokenprune::cuda

TORCH_LIBRARY_IMPL(tokenprune, CUDA, m) {
  m.impl("_gather_kept", &tokenprune::cuda::gather_kept_cuda);
  m.impl("_merge_kept", &tokenprune::cuda::merge_kept_cuda);
}
