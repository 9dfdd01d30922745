// Schemas of the private ops in torch.ops.tokenprune, and the Python module `tokenprune_kernels._C`.
//
// Each private op (the compiled kernels of one stage, called by the op layer once it has
// validated the public op's arguments) is defined here and nowhere else. Their CPU kernels are in
// csrc/cpu/*.cpp, their CUDA kernels (CUDA builds) in csrc/cuda/ops_cuda.cpp; the op table in
// tokenprune_kernels/backend.py says which stage each implements, and names its fake. The public
// ops (instruction_attention, select_topk, ...) are defined in Python, each in its stage module
// tokenprune_kernels/ops/<stage>.py.
//
// Importing `tokenprune_kernels._C` loads this shared object, which runs the static
// registrations; the module itself exposes no functions. It uses only the stable Python C API, so
// one build serves every CPython >= 3.10 (py_limited_api).

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tokenprune, m) {
  m.def(
      "_select_topk(Tensor scores, Tensor cu_seqlens_v, Tensor keep_counts, "
      "int? total_kept=None) -> (Tensor, Tensor)");
  m.def(
      "_mass_keep_counts(Tensor scores, Tensor cu_seqlens_v, Tensor keep_bounds, "
      "float keep_mass, str relevance) -> Tensor");
  m.def(
      "_spread_select(Tensor scores, Tensor cu_seqlens_v, Tensor keep_counts, Tensor coords, "
      "int radius, int? total_kept=None) -> (Tensor, Tensor)");
  m.def(
      "_gather_kept(Tensor visual_embeds, Tensor position_ids, Tensor kept_idx) "
      "-> (Tensor, Tensor)");
  m.def(
      "_merge_kept(Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, "
      "Tensor visual_embeds, Tensor visual_idx, Tensor cu_seqlens_v, Tensor kept_idx) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Defined here only (no copy in schemas.py): the schemas of the public ops of the same name.
  m.def(
      "_instruction_attention(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor visual_idx, Tensor cu_seqlens_v, Tensor? q_pos=None, float? softmax_scale=None) "
      "-> Tensor");
  m.def(
      "_instruction_attention_heads(Tensor q, Tensor k, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, Tensor visual_idx, Tensor cu_seqlens_v, Tensor? q_pos=None, "
      "float? softmax_scale=None, int head_groups=1) -> Tensor");
  m.def(
      "_mapper_forward(Tensor attn, Tensor cu_seqlens_v, Tensor[] params, int kernel_size, "
      "float input_eps, Tensor? grid=None) -> Tensor");
  // CUDA only (csrc/cuda/ops_cuda.cpp): the selection fused with the gather / the merge, sized
  // by the host-known total_kept (no synchronisation). position_ids is [R, T].
  m.def(
      "_select_gather_kept(Tensor scores, Tensor cu_seqlens_v, Tensor keep_counts, "
      "int total_kept, Tensor visual_embeds, Tensor position_ids) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_select_merge_kept(Tensor scores, Tensor cu_seqlens_v, Tensor keep_counts, "
      "int total_kept, Tensor inputs_embeds, Tensor position_ids, Tensor cu_seqlens, "
      "Tensor visual_embeds, Tensor visual_idx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

PyModuleDef tokenprune_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of tokenprune_kernels; importing it registers torch.ops.tokenprune's private "
    "ops.",
    -1,
    nullptr,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&tokenprune_module);
}
