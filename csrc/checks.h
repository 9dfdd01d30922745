// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA glue (csrc/cuda/ops_cuda.cpp).
//
// The public Python ops validate their inputs before calling the private ops; these checks
// re-establish what memory safety needs (ranks, sizes, dtypes, devices) and name the argument.
// Wrong dtypes raise TypeError, everything else ValueError, as the contract says.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace tokenprune
