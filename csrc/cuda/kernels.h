// Host launchers of the torch-free CUDA kernels in csrc/cuda/*.cu.
//
// Plain CUDA C++: no torch/ATen/c10 header may be included here or in the .cu files, so that
// `nvcc -c` compiles them on a machine with a CPU-only torch (tests/csrc/test_build.py does).
// Every launcher takes raw device pointers, sizes and a stream, checks its own launches and
// returns the first CUDA error (cudaSuccess when all went well). The glue that owns tensors,
// allocation and argument checks is csrc/cuda/ops_cuda.cpp.
//
// No launcher synchronises with the host: output sizes come from host-known sizes, index values
// are trusted (the public ops validate them, once per call, before the private ops run), and every
// kernel bounds-checks each index it dereferences, so wrong values give wrong (unspecified)
// output but never an access outside the buffers. This keeps the ops capturable in CUDA graphs.
//
// Index arrays (offsets, visual_idx, kept_idx, keep_counts, src_idx) are int64 and contiguous:
// the glue converts them. Embedding rows are copied as raw bytes, so their type does not matter.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tokenprune::cuda {

// Element type of a floating-point input.
enum class FloatType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 1-D float array of any dtype and stride (elements).
struct FloatVector {
  const void* data;
  int64_t stride;
  FloatType type;
};

// A byte view of 2-D rows: row r < count starts at data + r * row_stride.
struct Rows {
  const void* data;
  int64_t row_stride;  // bytes
  int64_t count;       // rows; a row index outside [0, count) reads as zeros
};

// Position ids [R, T_src] (int32 or int64, any strides) gathered to a contiguous [R, T_out].
struct PositionIds {
  const void* src;
  void* dst;
  int64_t rows;         // R
  int64_t src_cols;     // T_src; a column outside [0, T_src) reads as 0
  int64_t src_stride0;  // elements
  int64_t src_stride1;  // elements
  int64_t dst_cols;     // T_out
  int elem_size;        // 4 or 8
};

// ---- gather / merge (gather.cu) -------------------------------------------------------------

// out[o, :] = src[kept_idx[o], :] (row_bytes bytes each), pos.dst[:, o] = pos.src[:, kept_idx[o]].
cudaError_t gather_kept_rows(Rows src, const int64_t* kept_idx, int64_t tk, int64_t row_bytes,
                             void* out, PositionIds pos, cudaStream_t stream);

// First half of merge_kept. Writes, for every full-sequence row r < tl:
//   vmap[r] = -1 for a text row, v for the kept visual token v, -2 for a pruned visual token;
//   keep[r] = 1 if the row is in the output (vmap[r] != -2), else 0.
// The kept visual tokens are kept_idx[0, tk).
cudaError_t merge_kept_mark(const int64_t* cu, const int64_t* cu_v, int64_t batch, int64_t tl,
                            const int64_t* visual_idx, int64_t tv, const int64_t* kept_idx,
                            int64_t tk, int64_t* vmap, int64_t* keep, cudaStream_t stream);

// The same, with the kept visual tokens given as flags [tv] (1 kept, 0 pruned), as select_kept
// writes them: the selection feeds the merge without a list of indices in between.
cudaError_t merge_kept_mark_flags(const int64_t* cu, const int64_t* cu_v, int64_t batch,
                                  int64_t tl, const int64_t* visual_idx, int64_t tv,
                                  const int32_t* flags, int64_t* vmap, int64_t* keep,
                                  cudaStream_t stream);

// Second half: from the inclusive prefix sum `scan` [tl] of `keep` and `vmap`, writes
// src_idx [t_out] (the full-sequence row of each output row), cu_out [batch + 1] (int64),
// the output rows out [t_out, row_bytes] (visual rows from `visual`, text rows from `text`) and
// the gathered position ids.
cudaError_t merge_kept_rows(const int64_t* cu, int64_t batch, int64_t tl, const int64_t* vmap,
                            const int64_t* scan, int64_t t_out, Rows text, Rows visual,
                            int64_t row_bytes, int64_t* src_idx, int64_t* cu_out, void* out,
                            PositionIds pos, cudaStream_t stream);

// ---- select (select.cu) ---------------------------------------------------------------------

// Bytes of device scratch select_kept needs for tv scores in `batch` samples (tv < 2^31).
// Host-only arithmetic (CUB's temp-storage queries): no device work, no synchronisation.
cudaError_t select_workspace_bytes(int64_t tv, int64_t batch, size_t* bytes);

// Deterministic per-sample top-k (docs/contract.md, stage c). Sample b owns scores
// [cu_v[b], cu_v[b + 1]) and keeps its keep_counts[b] best by (core::order_key desc, index asc),
// found by one CUB radix sort of 64-bit keys (sample, ~order_key) with the indices as values.
// Writes flags [tv] (1 kept, 0 not) and, when not null, kept_idx [total_kept] (the flagged
// indices, ascending) and cu_kept [batch + 1] (0 then the running sums of keep_counts).
// `total_kept` is the sum of keep_counts, known on the host.
cudaError_t select_kept(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                        const int64_t* keep_counts, int64_t total_kept, void* workspace,
                        size_t workspace_bytes, int32_t* flags, int64_t* kept_idx,
                        int64_t* cu_kept, cudaStream_t stream);

// Bytes of device scratch mass_keep_counts needs (host-only arithmetic, as above).
cudaError_t mass_workspace_bytes(int64_t tv, int64_t batch, size_t* bytes);

// Per-sample keep counts of the adaptive rule (docs/contract.md, stage c, keep_mass): the same
// sort as select_kept, then the mass weights (core/mass.h, relative to each sample's first
// sorted score), an inclusive scan of them in sorted order, and per sample the fewest leading
// tokens whose weights reach keep_mass * the sample's total, clamped to keep_bounds [2, batch]
// (row 0 the least, row 1 the most tokens); 0 for an empty sample. Writes counts [batch]. No
// host synchronisation (the caller reads the total it needs to size a selection).
cudaError_t mass_keep_counts(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                             const int64_t* keep_bounds, double keep_mass, bool softmax,
                             void* workspace, size_t workspace_bytes, int64_t* counts,
                             cudaStream_t stream);

// ---- spread rule (spread.cu) ----------------------------------------------------------------

// Bytes of device scratch spread_select needs for tv scores in `batch` samples (tv < 2^31) and
// `radius` (1 to 3: a neighbour table of (2r + 1)^2 - 1 int32 per token is part of it).
// Host-only arithmetic (CUB's temp-storage queries): no device work, no synchronisation.
cudaError_t spread_workspace_bytes(int64_t tv, int64_t batch, int64_t radius, size_t* bytes);

// The selection under the spread rule (docs/contract.md, stage c, "Spread rule"). Sample b owns
// tokens [cu_v[b], cu_v[b + 1]) with coords [tv, 3] int64 (segment, row, col), strictly
// increasing within the sample; it keeps the first keep_counts[b] of (its accepted tokens, then
// its suppressed ones) in the selection order (core::order_key desc, index asc), a token being
// suppressed when a token accepted before it lies in its segment within Chebyshev distance
// `radius` (>= 0) on (row, col). Writes kept_idx [total_kept] (ascending) and cu_kept
// [batch + 1] (0 then the running sums of keep_counts). `total_kept` is the sum of keep_counts,
// known on the host.
cudaError_t spread_select(FloatVector scores, int64_t tv, const int64_t* cu_v, int64_t batch,
                          const int64_t* keep_counts, const int64_t* coords, int64_t radius,
                          int64_t total_kept, void* workspace, size_t workspace_bytes,
                          int64_t* kept_idx, int64_t* cu_kept, cudaStream_t stream);

// ---- instruction attention (attention.cu) ---------------------------------------------------

// Arguments of tokenprune::_instruction_attention (groups = 1) and _instruction_attention_heads
// (groups = head_groups). q [tq, hq, head_dim] and k [tk, hk, head_dim] of one float type, last
// dimension contiguous, other strides in elements; `vec` when both base pointers, every stride
// and head_dim allow 16-byte loads. Offsets and indices int64 contiguous; q_pos null when the
// queries are the last n_q keys of their sample. out [tv, groups] float32, contiguous.
struct AttentionArgs {
  const void* q;
  int64_t q_stride_t;
  int64_t q_stride_h;
  const void* k;
  int64_t k_stride_t;
  int64_t k_stride_h;
  FloatType type;
  bool vec;
  int64_t tq;
  int64_t tk;
  int64_t tv;
  int64_t hq;
  int64_t hk;
  int64_t head_dim;
  int64_t batch;
  const int64_t* cu_q;
  const int64_t* cu_k;
  const int64_t* cu_v;
  const int64_t* visual_idx;
  const int64_t* q_pos;
  float scale;
  int64_t groups = 1;  // output channels C >= 1 dividing hq (1: the mean over every head)
  float* out;
};

// Launch configuration of one call, from shapes and the device only (host arithmetic).
struct AttentionPlan {
  int64_t row_tiles = 0;       // pass-1 grid x (an upper bound; spare blocks exit at once)
  int64_t visual_tiles = 0;    // pass-3 grid
  int splits = 1;              // key splits of pass 1
  size_t smem_bytes = 0;       // dynamic shared memory per block
  bool fits = false;           // smem_bytes <= the device's per-block opt-in limit
  size_t workspace_bytes = 0;  // float scratch: partial and final row statistics
};

// Fails with cudaErrorInvalidValue for hq not a multiple of hk >= 1, head_dim < 1, or groups not
// a divisor >= 1 of hq.
cudaError_t instruction_attention_plan(const AttentionArgs& args, int num_sms,
                                       int max_smem_per_block, AttentionPlan* plan);

// Writes args.out [tv, groups]: per visual token and channel c, the mean over the query heads
// [c hq / groups, (c + 1) hq / groups) and the sample's queries of the causal softmax over all
// keys a query sees, at the token's key (docs/contract.md, stages a and a'; groups = 1 is stage
// a's mean over every head, bit for bit the same kernel). Fails with cudaErrorInvalidValue (from
// the plan) unless groups >= 1 divides hq. `workspace`: plan.workspace_bytes of device memory.
cudaError_t instruction_attention(const AttentionArgs& args, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream);

// ---- mapper (mapper.cu) ---------------------------------------------------------------------

constexpr int kMapperMaxBlocks = 16;  // mapper blocks the CUDA kernel takes

// Arguments of tokenprune::_mapper_forward: attn [total, groups] float32 (strides attn_stride,
// attn_group_stride; groups = 1 for the paper's [total] input), grid [total, 2] float32 or null
// (strides grid_stride, grid_col_stride), the offsets cu_v [batch + 1] int64, the flat float32
// parameter list (contiguous tensors, op order: per block dw_weight, dw_bias, pw_weight,
// pw_bias, ln_weight, ln_bias, then head_weight, head_bias) with widths[0] = groups (+ 2 with a
// grid) and widths[l] = C_l, and out [total] float32.
struct MapperArgs {
  const float* attn;
  int64_t attn_stride;
  int64_t attn_groups;
  int64_t attn_group_stride;
  const float* grid;
  int64_t grid_stride;
  int64_t grid_col_stride;
  int64_t total;
  const int64_t* cu_v;
  int64_t batch;
  int num_blocks;
  int kernel_size;
  float input_eps;
  int64_t widths[kMapperMaxBlocks + 1];
  const float* params[6 * kMapperMaxBlocks + 2];
  float* out;
};

// Float offsets of one block's tensors in the packed parameter buffer.
struct MapperBlockOffsets {
  int64_t dw_w;  // [C_in, K]
  int64_t dw_b;  // [C_in]
  int64_t w_hi;  // [pad16(C_out), pad16(C_in)] tf32 high half of the pointwise weight
  int64_t w_lo;  // same shape, the tf32 low half (w - w_hi)
  int64_t pw_b;  // [C_out]
  int64_t ln_w;  // [C_out]
  int64_t ln_b;  // [C_out]
};

// Launch configuration of one call, from shapes and the device only (host arithmetic).
struct MapperPlan {
  MapperBlockOffsets blocks[kMapperMaxBlocks];
  int64_t head_w = 0;
  int64_t head_b = 0;
  int64_t packed_floats = 0;  // size of the packed parameter buffer (the workspace)
  int64_t tile = 0;           // output tokens per window
  int64_t window_rows = 0;    // tile + 2 * (K / 2) * num_blocks
  int64_t x_floats = 0;       // shared-memory activation buffer
  int64_t dw_floats = 0;      // shared-memory depthwise buffer
  size_t smem_bytes = 0;
  bool fits = false;          // some tile >= 16 fits the device's shared memory per block
  int64_t grid = 0;           // persistent blocks (one window at a time each)
};

// Fails with cudaErrorInvalidValue for an unsupported config (more than kMapperMaxBlocks blocks,
// even kernel_size, widths[0] other than attn_groups (+ 2 with a grid)).
cudaError_t mapper_plan(const MapperArgs& args, int num_sms, int max_smem_per_block,
                        MapperPlan* plan);

// Writes args.out [total]: the mapper logits (docs/contract.md, stage b). `packed`:
// plan.packed_floats floats of device scratch.
cudaError_t mapper_forward(const MapperArgs& args, const MapperPlan& plan, float* packed,
                           cudaStream_t stream);

}  // namespace tokenprune::cuda
