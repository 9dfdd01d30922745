// CUDA glue of the private ops (compiled in CUDA builds only):
//   _instruction_attention, _instruction_attention_heads, _mapper_forward, _select_topk,
//   _mass_keep_counts, _spread_select, _gather_kept, _merge_kept and the fused selections
//   _select_gather_kept / _select_merge_kept (CUDA only).
//
// Owns what needs torch: argument checks of metadata (ranks, dtypes, sizes, devices; the
// device-agnostic ones shared with the CPU kernels are in ../checks.h), allocation (caching
// allocator), the current stream and device guard, the int64 conversion of index arrays and one
// cumsum. The kernels themselves are torch-free, in *.cu, behind the launchers of kernels.h.
//
// No op here synchronises with the host: output sizes come from shapes or from host integers
// (total_kept), and index VALUES are not checked here - the public ops validate them once per
// call (tokenprune_kernels/validation.py) before any private op runs, and the kernels
// bounds-check every index they dereference, so wrong values give unspecified output, never an
// out-of-bounds access. Every op can therefore be captured in a CUDA graph.

#include "../checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace tokenprune::cuda {
namespace {

// `t` itself when its rows are dense (last stride 1), else a contiguous copy.
at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

Rows rows_of(const at::Tensor& dense) {
  return Rows{dense.const_data_ptr(), dense.stride(0) * static_cast<int64_t>(dense.element_size()),
              dense.size(0)};
}

PositionIds position_ids_of(const at::Tensor& src, at::Tensor& dst) {
  PositionIds p;
  p.src = src.const_data_ptr();
  p.dst = dst.mutable_data_ptr();
  p.rows = src.size(0);
  p.src_cols = src.size(1);
  p.src_stride0 = src.stride(0);
  p.src_stride1 = src.stride(1);
  p.dst_cols = dst.size(1);
  p.elem_size = static_cast<int>(src.element_size());
  return p;
}

at::Tensor as_int64(const at::Tensor& t) {
  return t.to(c10::kLong).contiguous();
}

FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case c10::kFloat:
      return FloatType::kFloat32;
    case c10::kHalf:
      return FloatType::kFloat16;
    default:
      return FloatType::kBFloat16;  // check_float admits nothing else
  }
}

cudaStream_t stream_of(const c10::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

at::Tensor workspace(int64_t bytes, const c10::Device& device) {
  return at::empty({bytes > 0 ? bytes : 1}, at::TensorOptions().dtype(c10::kByte).device(device));
}

// ------------------------------------------------------------------------------------ gather

std::tuple<at::Tensor, at::Tensor> gather_kept_cuda(const at::Tensor& visual_embeds,
                                                    const at::Tensor& position_ids,
                                                    const at::Tensor& kept_idx) {
  const GatherKeptSizes sizes =
      check_gather_kept_args(visual_embeds, position_ids, kept_idx, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(sizes.device);
  const at::Tensor idx = kept_idx.contiguous();
  const int64_t tk = idx.size(0);
  at::Tensor embeds = at::empty({tk, sizes.hidden}, visual_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), tk}, position_ids.options());
  if (tk == 0) return {embeds, pos};
  const at::Tensor src = dense_rows(visual_embeds);
  const int64_t row_bytes = sizes.hidden * static_cast<int64_t>(visual_embeds.element_size());
  C10_CUDA_CHECK(gather_kept_rows(rows_of(src), idx.const_data_ptr<int64_t>(), tk, row_bytes,
                                  embeds.mutable_data_ptr(), position_ids_of(position_ids, pos),
                                  stream_of(sizes.device)));
  return {embeds, pos};
}

// ------------------------------------------------------------------------------------- merge

// t_out = tl - tv + tk rows; valid arguments have tv <= tl (distinct rows) and tk <= tv.
int64_t merged_rows(const MergeKeptSizes& sizes, int64_t tk) {
  TORCH_CHECK_VALUE(sizes.tv <= sizes.tl, "visual_embeds has Tv = ", sizes.tv,
                    " rows, more than the Tl = ", sizes.tl, " rows of inputs_embeds");
  TORCH_CHECK_VALUE(tk <= sizes.tv, "kept_idx has ", tk, " entries, more than Tv = ", sizes.tv,
                    " visual tokens");
  return sizes.tl - sizes.tv + tk;
}

// The rows of the merge once vmap and keep ([tl] int64) are marked: scan, copy, offsets.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_rows(
    const MergeKeptSizes& sizes, const at::Tensor& inputs_embeds, const at::Tensor& position_ids,
    const at::Tensor& cu_seqlens, const at::Tensor& cu, const at::Tensor& visual_embeds,
    const at::Tensor& vmap, const at::Tensor& keep, int64_t t_out) {
  const at::Tensor scan = at::cumsum(keep, 0);
  const int64_t batch = cu.size(0) - 1;
  const at::TensorOptions long_opts = cu.options();
  at::Tensor src_idx = at::empty({t_out}, long_opts);
  at::Tensor cu_out = at::empty({batch + 1}, long_opts);
  at::Tensor embeds = at::empty({t_out, sizes.hidden}, inputs_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), t_out}, position_ids.options());
  const at::Tensor text = dense_rows(inputs_embeds);
  const at::Tensor visual = dense_rows(visual_embeds);
  const int64_t row_bytes = sizes.hidden * static_cast<int64_t>(inputs_embeds.element_size());
  C10_CUDA_CHECK(merge_kept_rows(cu.const_data_ptr<int64_t>(), batch, sizes.tl,
                                 vmap.const_data_ptr<int64_t>(), scan.const_data_ptr<int64_t>(),
                                 t_out, rows_of(text), rows_of(visual), row_bytes,
                                 src_idx.mutable_data_ptr<int64_t>(),
                                 cu_out.mutable_data_ptr<int64_t>(), embeds.mutable_data_ptr(),
                                 position_ids_of(position_ids, pos), stream_of(sizes.device)));
  if (cu_seqlens.scalar_type() != c10::kLong) cu_out = cu_out.to(cu_seqlens.scalar_type());
  return {embeds, pos, cu_out, src_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_kept_cuda(
    const at::Tensor& inputs_embeds, const at::Tensor& position_ids, const at::Tensor& cu_seqlens,
    const at::Tensor& visual_embeds, const at::Tensor& visual_idx, const at::Tensor& cu_seqlens_v,
    const at::Tensor& kept_idx) {
  const MergeKeptSizes sizes =
      check_merge_kept_args(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                            cu_seqlens_v, kept_idx, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(sizes.device);
  const at::Tensor kept = kept_idx.contiguous();
  const int64_t tk = kept.size(0);
  const int64_t t_out = merged_rows(sizes, tk);
  const at::Tensor cu = as_int64(cu_seqlens);
  const at::Tensor cu_v = as_int64(cu_seqlens_v);
  const at::Tensor vidx = as_int64(visual_idx);
  const at::Tensor vmap = at::empty({sizes.tl}, cu.options());
  const at::Tensor keep = at::empty({sizes.tl}, cu.options());
  C10_CUDA_CHECK(merge_kept_mark(cu.const_data_ptr<int64_t>(), cu_v.const_data_ptr<int64_t>(),
                                 cu.size(0) - 1, sizes.tl, vidx.const_data_ptr<int64_t>(),
                                 sizes.tv, kept.const_data_ptr<int64_t>(), tk,
                                 vmap.mutable_data_ptr<int64_t>(),
                                 keep.mutable_data_ptr<int64_t>(), stream_of(sizes.device)));
  return merge_rows(sizes, inputs_embeds, position_ids, cu_seqlens, cu, visual_embeds, vmap, keep,
                    t_out);
}

// ------------------------------------------------------------------------------------ select

// Scores [Tv] (Tv < 2^31: the sort's indices are int32) and their offsets [B+1] on `device`:
// (Tv, B).
std::tuple<int64_t, int64_t> check_ranked(const at::Tensor& scores, const at::Tensor& cu_seqlens_v,
                                          const c10::Device& device) {
  const int64_t tv = check_scores(scores, device);
  TORCH_CHECK_VALUE(tv <= INT32_MAX, "scores must have fewer than 2^31 entries, got ", tv);
  check_offsets_meta(cu_seqlens_v, "cu_seqlens_v");
  check_device(cu_seqlens_v, "cu_seqlens_v", device);
  return {tv, cu_seqlens_v.size(0) - 1};
}

// The selection's arguments, checked: scores [Tv] float, offsets [B+1], keep_counts [B] int64,
// all on `device`; total_kept in [0, Tv].
struct Selection {
  at::Tensor cu_v;         // int64 contiguous
  at::Tensor keep_counts;  // int64 contiguous
  int64_t tv;
  int64_t batch;
  int64_t total_kept;
};

Selection check_selection(const at::Tensor& scores, const at::Tensor& cu_seqlens_v,
                          const at::Tensor& keep_counts, std::optional<int64_t> total_kept,
                          const c10::Device& device) {
  const auto [tv, batch] = check_ranked(scores, cu_seqlens_v, device);
  check_dim(keep_counts, "keep_counts", 1, "[B]");
  check_int64(keep_counts, "keep_counts");
  check_device(keep_counts, "keep_counts", device);
  TORCH_CHECK_VALUE(keep_counts.size(0) == batch, "keep_counts must have B = ", batch,
                    " entries (len(cu_seqlens_v) - 1), got ", keep_counts.size(0));
  int64_t total = 0;
  if (total_kept.has_value()) {
    total = *total_kept;
  } else {
    // Only when the caller did not pass the total: one device read (a synchronisation).
    total = batch > 0 ? keep_counts.sum().item<int64_t>() : 0;
  }
  TORCH_CHECK_VALUE(total >= 0 && total <= tv, "total_kept must be in [0, Tv = ", tv, "], got ",
                    total);
  return {as_int64(cu_seqlens_v), keep_counts.contiguous(), tv, batch, total};
}

// Runs the selection: flags [Tv] int32 always; kept_idx / cu_kept when asked for.
at::Tensor run_selection(const at::Tensor& scores, const Selection& s, const c10::Device& device,
                         at::Tensor* kept_idx, at::Tensor* cu_kept) {
  const cudaStream_t stream = stream_of(device);
  at::Tensor flags = at::empty({s.tv}, s.cu_v.options().dtype(c10::kInt));
  size_t bytes = 0;
  C10_CUDA_CHECK(select_workspace_bytes(s.tv, s.batch, &bytes));
  const at::Tensor ws = workspace(static_cast<int64_t>(bytes), device);
  const FloatVector sv{scores.const_data_ptr(), scores.stride(0), float_type(scores)};
  C10_CUDA_CHECK(select_kept(sv, s.tv, s.cu_v.const_data_ptr<int64_t>(), s.batch,
                             s.keep_counts.const_data_ptr<int64_t>(), s.total_kept,
                             ws.mutable_data_ptr(), bytes, flags.mutable_data_ptr<int32_t>(),
                             kept_idx ? kept_idx->mutable_data_ptr<int64_t>() : nullptr,
                             cu_kept ? cu_kept->mutable_data_ptr<int64_t>() : nullptr, stream));
  return flags;
}

std::tuple<at::Tensor, at::Tensor> select_topk_cuda(const at::Tensor& scores,
                                                    const at::Tensor& cu_seqlens_v,
                                                    const at::Tensor& keep_counts,
                                                    std::optional<int64_t> total_kept) {
  const c10::Device device = check_backend(scores, "scores", c10::kCUDA);
  const c10::cuda::CUDAGuard guard(device);
  const Selection s = check_selection(scores, cu_seqlens_v, keep_counts, total_kept, device);
  at::Tensor kept = at::empty({s.total_kept}, s.cu_v.options());
  at::Tensor cu_kept = at::empty({s.batch + 1}, s.cu_v.options());
  run_selection(scores, s, device, &kept, &cu_kept);
  if (cu_seqlens_v.scalar_type() != c10::kLong) cu_kept = cu_kept.to(cu_seqlens_v.scalar_type());
  return {kept, cu_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_gather_kept_cuda(
    const at::Tensor& scores, const at::Tensor& cu_seqlens_v, const at::Tensor& keep_counts,
    int64_t total_kept, const at::Tensor& visual_embeds, const at::Tensor& position_ids) {
  const GatherKeptSizes sizes = check_gather_inputs(visual_embeds, position_ids, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(sizes.device);
  const Selection s = check_selection(scores, cu_seqlens_v, keep_counts, total_kept, sizes.device);
  TORCH_CHECK_VALUE(s.tv == sizes.tv, "scores must have Tv = ", sizes.tv,
                    " entries (the rows of visual_embeds), got ", s.tv);
  at::Tensor kept = at::empty({s.total_kept}, s.cu_v.options());
  at::Tensor cu_kept = at::empty({s.batch + 1}, s.cu_v.options());
  run_selection(scores, s, sizes.device, &kept, &cu_kept);
  at::Tensor embeds = at::empty({s.total_kept, sizes.hidden}, visual_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), s.total_kept}, position_ids.options());
  if (s.total_kept > 0) {
    const at::Tensor src = dense_rows(visual_embeds);
    const int64_t row_bytes = sizes.hidden * static_cast<int64_t>(visual_embeds.element_size());
    C10_CUDA_CHECK(gather_kept_rows(rows_of(src), kept.const_data_ptr<int64_t>(), s.total_kept,
                                    row_bytes, embeds.mutable_data_ptr(),
                                    position_ids_of(position_ids, pos), stream_of(sizes.device)));
  }
  if (cu_seqlens_v.scalar_type() != c10::kLong) cu_kept = cu_kept.to(cu_seqlens_v.scalar_type());
  return {embeds, pos, kept, cu_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_merge_kept_cuda(
    const at::Tensor& scores, const at::Tensor& cu_seqlens_v, const at::Tensor& keep_counts,
    int64_t total_kept, const at::Tensor& inputs_embeds, const at::Tensor& position_ids,
    const at::Tensor& cu_seqlens, const at::Tensor& visual_embeds, const at::Tensor& visual_idx) {
  const MergeKeptSizes sizes = check_merge_inputs(inputs_embeds, position_ids, cu_seqlens,
                                                  visual_embeds, visual_idx, cu_seqlens_v,
                                                  c10::kCUDA);
  const c10::cuda::CUDAGuard guard(sizes.device);
  const Selection s = check_selection(scores, cu_seqlens_v, keep_counts, total_kept, sizes.device);
  TORCH_CHECK_VALUE(s.tv == sizes.tv, "scores must have Tv = ", sizes.tv,
                    " entries (the rows of visual_embeds), got ", s.tv);
  const int64_t t_out = merged_rows(sizes, s.total_kept);
  at::Tensor kept = at::empty({s.total_kept}, s.cu_v.options());
  const at::Tensor flags = run_selection(scores, s, sizes.device, &kept, nullptr);
  const at::Tensor cu = as_int64(cu_seqlens);
  const at::Tensor vidx = as_int64(visual_idx);
  const at::Tensor vmap = at::empty({sizes.tl}, cu.options());
  const at::Tensor keep = at::empty({sizes.tl}, cu.options());
  C10_CUDA_CHECK(merge_kept_mark_flags(
      cu.const_data_ptr<int64_t>(), s.cu_v.const_data_ptr<int64_t>(), s.batch, sizes.tl,
      vidx.const_data_ptr<int64_t>(), sizes.tv, flags.const_data_ptr<int32_t>(),
      vmap.mutable_data_ptr<int64_t>(), keep.mutable_data_ptr<int64_t>(), stream_of(sizes.device)));
  auto [embeds, pos, cu_out, src_idx] = merge_rows(sizes, inputs_embeds, position_ids, cu_seqlens,
                                                   cu, visual_embeds, vmap, keep, t_out);
  return {embeds, pos, cu_out, src_idx, kept};
}

// The selection under the spread rule: the selection's checks, then coords [Tv, 3] int32/int64
// on the device (converted to int64 contiguous) and radius >= 0.
std::tuple<at::Tensor, at::Tensor> spread_select_cuda(const at::Tensor& scores,
                                                      const at::Tensor& cu_seqlens_v,
                                                      const at::Tensor& keep_counts,
                                                      const at::Tensor& coords, int64_t radius,
                                                      std::optional<int64_t> total_kept) {
  const c10::Device device = check_backend(scores, "scores", c10::kCUDA);
  const c10::cuda::CUDAGuard guard(device);
  const Selection s = check_selection(scores, cu_seqlens_v, keep_counts, total_kept, device);
  check_dim(coords, "coords", 2, "[Tv, 3]");
  check_index(coords, "coords");
  check_device(coords, "coords", device);
  TORCH_CHECK_VALUE(coords.size(0) == s.tv && coords.size(1) == 3, "coords must be [Tv = ", s.tv,
                    ", 3], got shape ", coords.sizes());
  TORCH_CHECK_VALUE(radius >= 0, "radius must be >= 0, got ", radius);
  const at::Tensor xy = as_int64(coords);
  at::Tensor kept = at::empty({s.total_kept}, s.cu_v.options());
  at::Tensor cu_kept = at::empty({s.batch + 1}, s.cu_v.options());
  size_t bytes = 0;
  C10_CUDA_CHECK(spread_workspace_bytes(s.tv, s.batch, radius, &bytes));
  const at::Tensor ws = workspace(static_cast<int64_t>(bytes), device);
  const FloatVector sv{scores.const_data_ptr(), scores.stride(0), float_type(scores)};
  C10_CUDA_CHECK(spread_select(sv, s.tv, s.cu_v.const_data_ptr<int64_t>(), s.batch,
                               s.keep_counts.const_data_ptr<int64_t>(),
                               xy.const_data_ptr<int64_t>(), radius, s.total_kept,
                               ws.mutable_data_ptr(), bytes, kept.mutable_data_ptr<int64_t>(),
                               cu_kept.mutable_data_ptr<int64_t>(), stream_of(device)));
  if (cu_seqlens_v.scalar_type() != c10::kLong) cu_kept = cu_kept.to(cu_seqlens_v.scalar_type());
  return {kept, cu_kept};
}

// The adaptive rule's per-sample counts. No synchronisation here either: the op layer reads
// their total (the one sync of the keep_mass rule) to size the selection it then runs.
at::Tensor mass_keep_counts_cuda(const at::Tensor& scores, const at::Tensor& cu_seqlens_v,
                                 const at::Tensor& keep_bounds, double keep_mass,
                                 c10::string_view relevance) {
  const c10::Device device = check_backend(scores, "scores", c10::kCUDA);
  const c10::cuda::CUDAGuard guard(device);
  const auto [tv, batch] = check_ranked(scores, cu_seqlens_v, device);
  const bool softmax = check_mass_args(keep_bounds, batch, device, keep_mass, relevance);
  const at::Tensor cu_v = as_int64(cu_seqlens_v);
  const at::Tensor bounds = keep_bounds.contiguous();
  at::Tensor counts = at::empty({batch}, cu_v.options());
  size_t bytes = 0;
  C10_CUDA_CHECK(mass_workspace_bytes(tv, batch, &bytes));
  const at::Tensor ws = workspace(static_cast<int64_t>(bytes), device);
  const FloatVector sv{scores.const_data_ptr(), scores.stride(0), float_type(scores)};
  C10_CUDA_CHECK(mass_keep_counts(sv, tv, cu_v.const_data_ptr<int64_t>(), batch,
                                  bounds.const_data_ptr<int64_t>(), keep_mass, softmax,
                                  ws.mutable_data_ptr(), bytes, counts.mutable_data_ptr<int64_t>(),
                                  stream_of(device)));
  return counts;
}

// --------------------------------------------------------------------------------- attention

// What a launch configuration depends on: the SM count and the opt-in shared memory per block.
struct DeviceLimits {
  int num_sms = 0;
  int max_smem = 0;
};

DeviceLimits limits(const c10::Device& device) {
  DeviceLimits d;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device.index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device.index()));
  return d;
}

// Last dimension contiguous (a copy otherwise).
at::Tensor dense_last(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

bool aligned16(const at::Tensor& t) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
         (t.stride(0) * es) % 16 == 0 && (t.stride(1) * es) % 16 == 0 &&
         (t.size(2) * es) % 16 == 0;
}

// Both attention ops: `groups` output channels (1: the mean over every head), out [Tv, groups],
// or [Tv] when `flat` (the mean op, groups = 1).
at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& cu_seqlens_k, const at::Tensor& visual_idx,
                          const at::Tensor& cu_seqlens_v, const std::optional<at::Tensor>& q_pos,
                          std::optional<double> softmax_scale, int64_t groups, bool flat) {
  check_dim(q, "q", 3, "[Tq, Hq, D]");
  check_float(q, "q");
  const c10::Device device = check_backend(q, "q", c10::kCUDA);
  check_dim(k, "k", 3, "[Tk, Hk, D]");
  check_device(k, "k", device);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), "k must have the head dim D = ", q.size(2),
                    " of q, got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.size(1) >= 1 && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                    "the query heads Hq = ", q.size(1),
                    " must be a positive multiple of the key heads Hk = ", k.size(1));
  TORCH_CHECK_VALUE(q.size(2) >= 1, "head dim D must be >= 1, got ", q.size(2));
  TORCH_CHECK_VALUE(groups >= 1 && q.size(1) % groups == 0,
                    "head_groups must be an int >= 1 dividing the query heads (", q.size(1),
                    "), got ", groups);
  for (const auto& [t, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"},
                                std::pair{&cu_seqlens_k, "cu_seqlens_k"},
                                std::pair{&cu_seqlens_v, "cu_seqlens_v"}}) {
    check_offsets_meta(*t, name);
    check_device(*t, name, device);
    TORCH_CHECK_VALUE(t->size(0) == cu_seqlens_q.size(0), name, " must have the B+1 = ",
                      cu_seqlens_q.size(0), " entries of cu_seqlens_q, got ", t->size(0));
  }
  check_dim(visual_idx, "visual_idx", 1, "[Tv]");
  check_index(visual_idx, "visual_idx");
  check_device(visual_idx, "visual_idx", device);
  if (q_pos.has_value()) {
    check_dim(*q_pos, "q_pos", 1, "[Tq]");
    check_index(*q_pos, "q_pos");
    check_device(*q_pos, "q_pos", device);
    TORCH_CHECK_VALUE(q_pos->size(0) == q.size(0), "q_pos must have Tq = ", q.size(0),
                      " entries, got ", q_pos->size(0));
  }
  const double scale =
      softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(q.size(2)));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "softmax_scale must be a finite number > 0, got ",
                    scale);

  const c10::cuda::CUDAGuard guard(device);
  const at::TensorOptions float32 = q.options().dtype(c10::kFloat);
  at::Tensor out = flat ? at::empty({visual_idx.size(0)}, float32)
                        : at::empty({visual_idx.size(0), groups}, float32);
  const at::Tensor qd = dense_last(q);
  const at::Tensor kd = dense_last(k);
  const at::Tensor cu_q = as_int64(cu_seqlens_q);
  const at::Tensor cu_k = as_int64(cu_seqlens_k);
  const at::Tensor cu_v = as_int64(cu_seqlens_v);
  const at::Tensor vidx = as_int64(visual_idx);
  const at::Tensor pos = q_pos.has_value() ? as_int64(*q_pos) : at::Tensor();

  AttentionArgs a{};
  a.q = qd.const_data_ptr();
  a.q_stride_t = qd.stride(0);
  a.q_stride_h = qd.stride(1);
  a.k = kd.const_data_ptr();
  a.k_stride_t = kd.stride(0);
  a.k_stride_h = kd.stride(1);
  a.type = float_type(q);
  a.vec = aligned16(qd) && aligned16(kd);
  a.tq = q.size(0);
  a.tk = k.size(0);
  a.tv = visual_idx.size(0);
  a.hq = q.size(1);
  a.hk = k.size(1);
  a.head_dim = q.size(2);
  a.batch = cu_q.size(0) - 1;
  a.cu_q = cu_q.const_data_ptr<int64_t>();
  a.cu_k = cu_k.const_data_ptr<int64_t>();
  a.cu_v = cu_v.const_data_ptr<int64_t>();
  a.visual_idx = vidx.const_data_ptr<int64_t>();
  a.q_pos = q_pos.has_value() ? pos.const_data_ptr<int64_t>() : nullptr;
  a.scale = static_cast<float>(scale);
  a.groups = groups;
  a.out = out.mutable_data_ptr<float>();

  const DeviceLimits dev = limits(device);
  AttentionPlan plan;
  C10_CUDA_CHECK(instruction_attention_plan(a, dev.num_sms, dev.max_smem, &plan));
  TORCH_CHECK_VALUE(plan.fits, "head dim D = ", a.head_dim, " (", q.scalar_type(), ") needs ",
                    plan.smem_bytes, " bytes of shared memory per block; this GPU has ",
                    dev.max_smem);
  const at::Tensor ws = workspace(static_cast<int64_t>(plan.workspace_bytes), device);
  C10_CUDA_CHECK(instruction_attention(a, plan, ws.mutable_data_ptr(), stream_of(device)));
  return out;
}

at::Tensor instruction_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k,
                                      const at::Tensor& visual_idx,
                                      const at::Tensor& cu_seqlens_v,
                                      const std::optional<at::Tensor>& q_pos,
                                      std::optional<double> softmax_scale) {
  return attention_cuda(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos,
                        softmax_scale, 1, true);
}

at::Tensor instruction_attention_heads_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& visual_idx, const at::Tensor& cu_seqlens_v,
    const std::optional<at::Tensor>& q_pos, std::optional<double> softmax_scale,
    int64_t head_groups) {
  return attention_cuda(q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos,
                        softmax_scale, head_groups, false);
}

// ------------------------------------------------------------------------------------ mapper

at::Tensor mapper_forward_cuda(const at::Tensor& attn, const at::Tensor& cu_seqlens_v,
                               at::TensorList params, int64_t kernel_size, double input_eps,
                               const std::optional<at::Tensor>& grid) {
  TORCH_CHECK_VALUE(attn.dim() == 1 || (attn.dim() == 2 && attn.size(1) >= 1),
                    "attn must be [Tv] or [Tv, G] with G >= 1, got ", attn.sizes());
  TORCH_CHECK_TYPE(attn.scalar_type() == c10::kFloat, "attn must be float32, got ",
                   attn.scalar_type());
  const c10::Device device = check_backend(attn, "attn", c10::kCUDA);
  if (grid.has_value()) {
    TORCH_CHECK_VALUE(grid->dim() == 2 && grid->size(0) == attn.size(0) && grid->size(1) == 2,
                      "grid must be [Tv, 2], got ", grid->sizes());
    TORCH_CHECK_TYPE(grid->scalar_type() == c10::kFloat, "grid must be float32, got ",
                     grid->scalar_type());
    check_device(*grid, "grid", device);
  }
  const int64_t groups = attn.dim() == 1 ? 1 : attn.size(1);
  check_offsets_meta(cu_seqlens_v, "cu_seqlens_v");
  check_device(cu_seqlens_v, "cu_seqlens_v", device);
  const int64_t count = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(count >= 8 && (count - 2) % 6 == 0,
                    "params must hold 6 tensors per block plus 2 for the head, got ", count);
  const int64_t depth = (count - 2) / 6;
  TORCH_CHECK_VALUE(depth <= kMapperMaxBlocks, "the CUDA mapper takes at most ", kMapperMaxBlocks,
                    " blocks, got ", depth);
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1,
                    "kernel_size must be an odd int >= 1, got ", kernel_size);

  const c10::cuda::CUDAGuard guard(device);
  MapperArgs a{};
  std::vector<at::Tensor> dense;
  dense.reserve(params.size());
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(p.scalar_type() == c10::kFloat, "params[", i, "] must be float32, got ",
                     p.scalar_type());
    check_device(p, "params", device);
    dense.push_back(p.contiguous());
    a.params[i] = dense.back().const_data_ptr<float>();
  }
  // Widths and the element counts every kernel relies on.
  a.widths[0] = groups + (grid.has_value() ? 2 : 0);
  for (int64_t l = 0; l < depth; ++l) {
    const at::Tensor& pw = dense[6 * l + 2];
    TORCH_CHECK_VALUE(pw.dim() == 2 && pw.size(1) == a.widths[l],
                      "params[", 6 * l + 2, "] (pointwise weight of block ", l,
                      ") must be [C_out, ", a.widths[l], "], got shape ", pw.sizes());
    const int64_t cin = a.widths[l];
    const int64_t cout = pw.size(0);
    a.widths[l + 1] = cout;
    const int64_t want[6] = {cin * kernel_size, cin, cout * cin, cout, cout, cout};
    for (int j = 0; j < 6; ++j) {
      TORCH_CHECK_VALUE(dense[6 * l + j].numel() == want[j], "params[", 6 * l + j,
                        "] must have ", want[j], " elements, got shape ",
                        dense[6 * l + j].sizes());
    }
  }
  TORCH_CHECK_VALUE(dense[6 * depth].numel() == a.widths[depth] && dense[6 * depth + 1].numel() == 1,
                    "the head must be [1, ", a.widths[depth], "] and [1]");
  const at::Tensor cu_v = as_int64(cu_seqlens_v);
  at::Tensor out = at::empty({attn.size(0)}, attn.options());
  a.attn = attn.const_data_ptr<float>();
  a.attn_stride = attn.stride(0);
  a.attn_groups = groups;
  a.attn_group_stride = attn.dim() == 2 ? attn.stride(1) : 0;
  a.grid = grid.has_value() ? grid->const_data_ptr<float>() : nullptr;
  a.grid_stride = grid.has_value() ? grid->stride(0) : 0;
  a.grid_col_stride = grid.has_value() ? grid->stride(1) : 0;
  a.total = attn.size(0);
  a.cu_v = cu_v.const_data_ptr<int64_t>();
  a.batch = cu_v.size(0) - 1;
  a.num_blocks = static_cast<int>(depth);
  a.kernel_size = static_cast<int>(kernel_size);
  a.input_eps = static_cast<float>(input_eps);
  a.out = out.mutable_data_ptr<float>();

  const DeviceLimits dev = limits(device);
  MapperPlan plan;
  C10_CUDA_CHECK(mapper_plan(a, dev.num_sms, dev.max_smem, &plan));
  TORCH_CHECK_VALUE(plan.fits, "the mapper's widths need more shared memory than this GPU's ",
                    dev.max_smem, " bytes per block");
  at::Tensor packed = at::empty({plan.packed_floats}, attn.options());
  C10_CUDA_CHECK(mapper_forward(a, plan, packed.mutable_data_ptr<float>(), stream_of(device)));
  return out;
}

}  // namespace
}  // namespace tokenprune::cuda

TORCH_LIBRARY_IMPL(tokenprune, CUDA, m) {
  m.impl("_instruction_attention", &tokenprune::cuda::instruction_attention_cuda);
  m.impl("_instruction_attention_heads", &tokenprune::cuda::instruction_attention_heads_cuda);
  m.impl("_mapper_forward", &tokenprune::cuda::mapper_forward_cuda);
  m.impl("_select_topk", &tokenprune::cuda::select_topk_cuda);
  m.impl("_mass_keep_counts", &tokenprune::cuda::mass_keep_counts_cuda);
  m.impl("_spread_select", &tokenprune::cuda::spread_select_cuda);
  m.impl("_gather_kept", &tokenprune::cuda::gather_kept_cuda);
  m.impl("_merge_kept", &tokenprune::cuda::merge_kept_cuda);
  m.impl("_select_gather_kept", &tokenprune::cuda::select_gather_kept_cuda);
  m.impl("_select_merge_kept", &tokenprune::cuda::select_merge_kept_cuda);
}
