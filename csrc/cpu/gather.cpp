// CPU kernels of tokenprune::_gather_kept and tokenprune::_merge_kept (contract.md, d and e).
//
// Both are row copies: every output row is one memcpy of H elements from a source row, and the
// position ids are gathered column by column. Rows are split across the intra-op threads.

#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace tokenprune::cpu {
namespace {

constexpr int64_t kCopyBytesPerTask = 64 * 1024;  // grain of the row copies

// Rows of a 2-D tensor whose last dimension is dense, as bytes. Other layouts are made contiguous.
struct RowView {
  at::Tensor owner;  // keeps a contiguous copy alive when one was needed
  const char* data = nullptr;
  int64_t row_stride = 0;  // bytes
};

inline RowView row_view(const at::Tensor& t) {
  RowView v;
  v.owner = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  v.data = static_cast<const char*>(v.owner.const_data_ptr());
  v.row_stride = v.owner.stride(0) * static_cast<int64_t>(v.owner.element_size());
  return v;
}

inline int64_t rows_per_task(int64_t row_bytes) {
  return std::max<int64_t>(1, kCopyBytesPerTask / std::max<int64_t>(row_bytes, 1));
}

// Row o < n of `out` (dense rows of `row_bytes`) = the `row_bytes` at `source(o)`: one memcpy per
// row, the rows split across the intra-op threads.
template <class Source>
void copy_rows(at::Tensor& out, int64_t n, int64_t row_bytes, const Source& source) {
  if (row_bytes == 0) return;
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, n, rows_per_task(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      std::memcpy(dst + o * row_bytes, source(o), static_cast<size_t>(row_bytes));
    }
  });
}

// out[i, o] = pos[i, src[o]] for i < R, o < n_out.
template <typename index_t>
void gather_columns(const at::Tensor& pos, const int64_t* src, int64_t n_out, at::Tensor& out) {
  const int64_t rows = pos.size(0);
  const index_t* p = pos.const_data_ptr<index_t>();
  const int64_t s0 = pos.stride(0);
  const int64_t s1 = pos.stride(1);
  index_t* q = out.mutable_data_ptr<index_t>();
  at::parallel_for(0, n_out, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < rows; ++i) {
      const index_t* pi = p + i * s0;
      index_t* qi = q + i * n_out;
      for (int64_t o = begin; o < end; ++o) qi[o] = pi[src[o] * s1];
    }
  });
}

void gather_position_ids(const at::Tensor& pos, const int64_t* src, int64_t n_out,
                         at::Tensor& out) {
  if (pos.scalar_type() == c10::kLong) {
    gather_columns<int64_t>(pos, src, n_out, out);
  } else {
    gather_columns<int32_t>(pos, src, n_out, out);
  }
}

// kept_idx as a contiguous int64 tensor, its entries checked on the host: each indexes the `tv`
// visual tokens and, with `ascending`, each is larger than the one before.
at::Tensor checked_kept_idx(const at::Tensor& kept_idx, int64_t tv, bool ascending) {
  at::Tensor t = kept_idx.contiguous();
  const int64_t* kept = t.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < t.size(0); ++j) {
    TORCH_CHECK_VALUE(kept[j] >= 0 && kept[j] < tv, "kept_idx[", j, "] = ", kept[j],
                      " is out of range for Tv = ", tv, " visual tokens");
    TORCH_CHECK_VALUE(!ascending || j == 0 || kept[j] > kept[j - 1],
                      "kept_idx must be strictly increasing, got kept_idx[", j - 1, "] = ",
                      kept[j - 1], " >= kept_idx[", j, "] = ", kept[j]);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> gather_kept_cpu(const at::Tensor& visual_embeds,
                                                   const at::Tensor& position_ids,
                                                   const at::Tensor& kept_idx) {
  const GatherKeptSizes sizes =
      check_gather_kept_args(visual_embeds, position_ids, kept_idx, c10::kCPU);
  const int64_t tv = sizes.tv;
  const int64_t hidden = sizes.hidden;

  const at::Tensor idx_t = checked_kept_idx(kept_idx, tv, /*ascending=*/false);
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();
  const int64_t tk = idx_t.size(0);

  at::Tensor embeds = at::empty({tk, hidden}, visual_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), tk}, position_ids.options());
  if (tk == 0) return {embeds, pos};

  const RowView src = row_view(visual_embeds);
  const int64_t row_bytes = hidden * static_cast<int64_t>(visual_embeds.element_size());
  copy_rows(embeds, tk, row_bytes, [&](int64_t o) { return src.data + idx[o] * src.row_stride; });
  gather_position_ids(position_ids, idx, tk, pos);
  return {embeds, pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_kept_cpu(
    const at::Tensor& inputs_embeds, const at::Tensor& position_ids, const at::Tensor& cu_seqlens,
    const at::Tensor& visual_embeds, const at::Tensor& visual_idx, const at::Tensor& cu_seqlens_v,
    const at::Tensor& kept_idx) {
  const MergeKeptSizes sizes =
      check_merge_kept_args(inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx,
                            cu_seqlens_v, kept_idx, c10::kCPU);
  const int64_t tl = sizes.tl;
  const int64_t tv = sizes.tv;
  const int64_t hidden = sizes.hidden;

  // The values, read on the host: offsets, then visual_idx per sample, then kept_idx.
  const std::vector<int64_t> cu = read_offsets(cu_seqlens, "cu_seqlens", tl, "Tl");
  const std::vector<int64_t> cu_v = read_offsets(cu_seqlens_v, "cu_seqlens_v", tv, "Tv");
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  const std::vector<int64_t> vidx = to_int64_vector(visual_idx);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    for (int64_t v = cu_v[b]; v < cu_v[b + 1]; ++v) {
      TORCH_CHECK_VALUE(vidx[v] >= 0 && vidx[v] < n, "visual_idx[", v, "] = ", vidx[v],
                        " is out of range for sample ", b, " of length ", n);
      TORCH_CHECK_VALUE(v == cu_v[b] || vidx[v] > vidx[v - 1],
                        "visual_idx must be strictly increasing within a sample, got visual_idx[",
                        v - 1, "] = ", vidx[v - 1], " >= visual_idx[", v, "] = ", vidx[v]);
    }
  }

  const at::Tensor kept_t = checked_kept_idx(kept_idx, tv, /*ascending=*/true);
  const int64_t* kept = kept_t.const_data_ptr<int64_t>();
  const int64_t tk = kept_t.size(0);

  // Output offsets: the text rows of each sample plus its kept visual rows.
  std::vector<int64_t> cu_k(static_cast<size_t>(batch + 1));
  std::vector<int64_t> cu_out(static_cast<size_t>(batch + 1));
  for (int64_t b = 0; b <= batch; ++b) {
    cu_k[b] = std::lower_bound(kept, kept + tk, cu_v[b]) - kept;
    cu_out[b] = cu[b] - cu_v[b] + cu_k[b];
  }
  const int64_t t_out = cu_out[batch];

  at::Tensor src_idx = at::empty({t_out}, kept_idx.options());
  at::Tensor embeds = at::empty({t_out, hidden}, inputs_embeds.options());
  at::Tensor pos = at::empty({position_ids.size(0), t_out}, position_ids.options());
  at::Tensor cu_out_t = offsets_tensor(cu_out, cu_seqlens.scalar_type());
  if (t_out == 0) return {embeds, pos, cu_out_t, src_idx};

  // Source of each output row: src[o] the full-sequence row, vsrc[o] the visual row or -1.
  int64_t* src = src_idx.mutable_data_ptr<int64_t>();
  std::vector<int64_t> vsrc(static_cast<size_t>(t_out));
  at::parallel_for(0, batch, std::max<int64_t>(1, batch * 8192 / std::max<int64_t>(tl, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) {
                       const int64_t n = cu[b + 1] - cu[b];
                       int64_t o = cu_out[b];
                       int64_t j = cu_k[b];
                       int64_t r = 0;
                       for (int64_t v = cu_v[b]; v < cu_v[b + 1]; ++v) {
                         for (; r < vidx[v]; ++r, ++o) {
                           src[o] = cu[b] + r;
                           vsrc[o] = -1;
                         }
                         if (j < cu_k[b + 1] && kept[j] == v) {
                           src[o] = cu[b] + r;
                           vsrc[o] = v;
                           ++o;
                           ++j;
                         }
                         ++r;
                       }
                       for (; r < n; ++r, ++o) {
                         src[o] = cu[b] + r;
                         vsrc[o] = -1;
                       }
                     }
                   });

  const RowView text = row_view(inputs_embeds);
  const RowView vis = row_view(visual_embeds);
  const int64_t row_bytes = hidden * static_cast<int64_t>(inputs_embeds.element_size());
  copy_rows(embeds, t_out, row_bytes, [&](int64_t o) {
    return vsrc[o] >= 0 ? vis.data + vsrc[o] * vis.row_stride
                        : text.data + src[o] * text.row_stride;
  });
  gather_position_ids(position_ids, src, t_out, pos);
  return {embeds, pos, cu_out_t, src_idx};
}

}  // namespace
}  // namespace tokenprune::cpu

TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("_gather_kept", &tokenprune::cpu::gather_kept_cpu);
  m.impl("_merge_kept", &tokenprune::cpu::merge_kept_cpu);
}
