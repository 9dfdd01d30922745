// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA glue (csrc/cuda/ops_cuda.cpp).
//
// The public Python ops validate their inputs before calling the private ops; these checks
// re-establish what memory safety needs (ranks, sizes, dtypes, devices) and name the argument.
// Wrong dtypes raise TypeError, everything else ValueError, as the contract says.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace tokenprune {

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16;
}

inline bool is_index_dtype(c10::ScalarType t) {
  return t == c10::kInt || t == c10::kLong;
}

inline void check_device(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " (like the other arguments), got ",
                    t.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_index_dtype(t.scalar_type()), name, " must be int32 or int64, got ",
                   t.scalar_type());
}

inline void check_int64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == c10::kLong, name, " must be int64, got ", t.scalar_type());
}

// `cu_seqlens`-style offsets: 1-D int32/int64 with at least one entry (B + 1 >= 1).
inline void check_offsets_meta(const at::Tensor& t, const char* name) {
  check_dim(t, name, 1, "[B+1]");
  check_index(t, name);
  TORCH_CHECK_VALUE(t.size(0) >= 1, name, " must have B+1 >= 1 entries, got 0");
}

// Scores [Tv]: 1-D float32/float16/bfloat16 on `device`. Returns Tv.
inline int64_t check_scores(const at::Tensor& scores, const c10::Device& device) {
  check_dim(scores, "scores", 1, "[Tv]");
  check_float(scores, "scores");
  check_device(scores, "scores", device);
  return scores.size(0);
}

// The adaptive rule's own arguments of _mass_keep_counts: keep_bounds [2, batch] int64 on
// `device`, keep_mass in (0, 1], relevance 'softmax' or 'normalize'. Returns whether the
// relevance is the softmax.
inline bool check_mass_args(const at::Tensor& keep_bounds, int64_t batch,
                            const c10::Device& device, double keep_mass,
                            c10::string_view relevance) {
  check_dim(keep_bounds, "keep_bounds", 2, "[2, B]");
  check_int64(keep_bounds, "keep_bounds");
  check_device(keep_bounds, "keep_bounds", device);
  TORCH_CHECK_VALUE(keep_bounds.size(0) == 2 && keep_bounds.size(1) == batch,
                    "keep_bounds must be [2, B = ", batch, "], got ", keep_bounds.sizes());
  TORCH_CHECK_VALUE(keep_mass > 0.0 && keep_mass <= 1.0, "keep_mass must be in (0, 1], got ",
                    keep_mass);
  const bool softmax = relevance == "softmax";
  TORCH_CHECK_VALUE(softmax || relevance == "normalize",
                    "relevance must be 'softmax' or 'normalize', got '", relevance, "'");
  return softmax;
}

// Embedding-like 2-D float tensor [T, H].
inline void check_rows(const at::Tensor& t, const char* name, const char* shape) {
  check_dim(t, name, 2, shape);
  check_float(t, name);
}

// Position ids [R, T] int32/int64 with T == `cols`.
inline void check_position_ids(const at::Tensor& t, const char* name, int64_t cols,
                               const char* cols_name) {
  check_dim(t, name, 2, "[R, T]");
  check_index(t, name);
  TORCH_CHECK_VALUE(t.size(1) == cols, name, " must have ", cols_name, " = ", cols,
                    " columns, got shape ", t.sizes());
}

// The first tensor argument of a backend's kernel lives on that backend; its device is the one
// every other argument must share. CPU kernels name the device, the others the device type.
inline c10::Device check_backend(const at::Tensor& t, const char* name, c10::DeviceType backend) {
  if (backend == c10::kCPU) {
    check_device(t, name, c10::Device(c10::kCPU));
  } else {
    TORCH_CHECK_VALUE(t.device().type() == backend, name, " must be a ", c10::DeviceTypeName(backend),
                      " tensor, got device ", t.device());
  }
  return t.device();
}

// kept_idx [Tk] int64 (its values are checked by each backend, where the data lives).
inline void check_kept_idx_meta(const at::Tensor& kept_idx, const c10::Device& device) {
  check_dim(kept_idx, "kept_idx", 1, "[Tk]");
  check_int64(kept_idx, "kept_idx");
  check_device(kept_idx, "kept_idx", device);
}

// The sizes of _gather_kept's arguments (contract.md, d), their metadata validated.
struct GatherKeptSizes {
  c10::Device device;
  int64_t tv;
  int64_t hidden;
};

// Device-agnostic checks of the rows a gather reads: visual_embeds [Tv, H] and position_ids
// [R, Tv] (`backend` is the device type of the calling kernel).
inline GatherKeptSizes check_gather_inputs(const at::Tensor& visual_embeds,
                                           const at::Tensor& position_ids,
                                           c10::DeviceType backend) {
  check_rows(visual_embeds, "visual_embeds", "[Tv, H]");
  const c10::Device device = check_backend(visual_embeds, "visual_embeds", backend);
  const int64_t tv = visual_embeds.size(0);
  check_position_ids(position_ids, "position_ids", tv, "Tv");
  check_device(position_ids, "position_ids", device);
  return {device, tv, visual_embeds.size(1)};
}

// Device-agnostic checks of _gather_kept: ranks, dtypes, sizes and devices (`backend` is the
// device type of the calling kernel). The values of kept_idx are left to the backend.
inline GatherKeptSizes check_gather_kept_args(const at::Tensor& visual_embeds,
                                              const at::Tensor& position_ids,
                                              const at::Tensor& kept_idx,
                                              c10::DeviceType backend) {
  const GatherKeptSizes sizes = check_gather_inputs(visual_embeds, position_ids, backend);
  check_kept_idx_meta(kept_idx, sizes.device);
  return sizes;
}

// The sizes of _merge_kept's arguments (contract.md, e), their metadata validated.
struct MergeKeptSizes {
  c10::Device device;
  int64_t tl;
  int64_t tv;
  int64_t hidden;
};

// Device-agnostic checks of the inputs of a merge, in argument order (`backend` is the device
// type of the calling kernel): everything of _merge_kept but kept_idx. The values of the offsets
// and visual_idx are left to the backend, which reads them where they live.
inline MergeKeptSizes check_merge_inputs(const at::Tensor& inputs_embeds,
                                         const at::Tensor& position_ids,
                                         const at::Tensor& cu_seqlens,
                                         const at::Tensor& visual_embeds,
                                         const at::Tensor& visual_idx,
                                         const at::Tensor& cu_seqlens_v, c10::DeviceType backend) {
  check_rows(inputs_embeds, "inputs_embeds", "[Tl, H]");
  const c10::Device device = check_backend(inputs_embeds, "inputs_embeds", backend);
  const int64_t tl = inputs_embeds.size(0);
  const int64_t hidden = inputs_embeds.size(1);
  check_position_ids(position_ids, "position_ids", tl, "Tl");
  check_device(position_ids, "position_ids", device);
  check_offsets_meta(cu_seqlens, "cu_seqlens");
  check_device(cu_seqlens, "cu_seqlens", device);
  check_rows(visual_embeds, "visual_embeds", "[Tv, H]");
  check_device(visual_embeds, "visual_embeds", device);
  TORCH_CHECK_TYPE(visual_embeds.scalar_type() == inputs_embeds.scalar_type(),
                   "visual_embeds must have the dtype of inputs_embeds (",
                   inputs_embeds.scalar_type(), "), got ", visual_embeds.scalar_type());
  TORCH_CHECK_VALUE(visual_embeds.size(1) == hidden, "visual_embeds must have H = ", hidden,
                    " columns like inputs_embeds, got shape ", visual_embeds.sizes());
  const int64_t tv = visual_embeds.size(0);
  check_dim(visual_idx, "visual_idx", 1, "[Tv]");
  check_index(visual_idx, "visual_idx");
  check_device(visual_idx, "visual_idx", device);
  TORCH_CHECK_VALUE(visual_idx.size(0) == tv, "visual_idx must have Tv = ", tv, " entries, got ",
                    visual_idx.size(0));
  check_offsets_meta(cu_seqlens_v, "cu_seqlens_v");
  check_device(cu_seqlens_v, "cu_seqlens_v", device);
  TORCH_CHECK_VALUE(cu_seqlens_v.size(0) == cu_seqlens.size(0), "cu_seqlens_v must have the B+1 = ",
                    cu_seqlens.size(0), " entries of cu_seqlens, got ", cu_seqlens_v.size(0));
  return {device, tl, tv, hidden};
}

// Device-agnostic checks of _merge_kept: ranks, dtypes, sizes and devices, in argument order
// (`backend` is the device type of the calling kernel). The values of the offsets, visual_idx and
// kept_idx are left to the backend, which reads them where they live.
inline MergeKeptSizes check_merge_kept_args(const at::Tensor& inputs_embeds,
                                            const at::Tensor& position_ids,
                                            const at::Tensor& cu_seqlens,
                                            const at::Tensor& visual_embeds,
                                            const at::Tensor& visual_idx,
                                            const at::Tensor& cu_seqlens_v,
                                            const at::Tensor& kept_idx, c10::DeviceType backend) {
  const MergeKeptSizes sizes = check_merge_inputs(inputs_embeds, position_ids, cu_seqlens,
                                                  visual_embeds, visual_idx, cu_seqlens_v, backend);
  check_kept_idx_meta(kept_idx, sizes.device);
  return sizes;
}

}  // namespace tokenprune
