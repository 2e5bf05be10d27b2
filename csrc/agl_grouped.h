// Interface between the grouped-op glue (csrc/agl_ops.cpp, which owns the schema, validation and the CPU path) and an
// optional CUDA implementation that handles all layers of a call in one launch per pass (csrc/cuda/, opt-in).
//
// The glue validates every layer once, makes tensors contiguous, applies the U/V projections
// (B_align = U (Uᵀ B), A_align = (A V) Vᵀ) and allocates the outputs, then offers the call to the registered CUDA
// override. An override may decline (return false: e.g. a dtype mix it does not handle); the glue then runs the
// verified per-layer CUDA kernels in a loop, which is also what happens when no override is registered or the
// opt-in switch is off. Overrides register themselves at static-initialisation time:
//
//   static const bool registered = (agl::grouped_cuda_override() = {&my_fwd, &my_bwd, "name"}, true);
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace agl {

// One layer of a grouped call, as the kernels see it. All tensors on the same CUDA device, contiguous.
struct GroupedLayer {
  at::Tensor B, A;                                // (m, r), (r, n)
  std::optional<at::Tensor> B_align, A_align;     // (m, r'), (r', n): after the U/V projections; none = no align part
  std::optional<at::Tensor> fisher, task_metric;  // (m, n) each, or none (weight 1)
  double scale = 1.0;
};

struct GroupedParams {
  double beta = 4.0, tau = 0.01, sharpness = 100.0, eps = 1e-12;
};

// fwd: fill terms (L, 4) and sums (L, 5) (preallocated, dtype = the call's output dtype: float64 when any layer has
//      float64 factors, else float32). Row l must equal what agl::terms_fwd returns for layer l alone.
// bwd: given grad_terms (L, 4) and the forward's sums (L, 5), write the factor gradients into the preallocated
//      grad_B[l] (m, r), grad_A[l] (r, n), grad_B_align[l] (m, r'), grad_A_align[l] (r', n) (factor dtypes;
//      undefined tensors for layers without an align part). Gradients w.r.t. B_align/A_align only: the glue chains
//      them through the U/V projections.
using GroupedFwdFn = bool (*)(const std::vector<GroupedLayer>& layers, const GroupedParams& p, at::Tensor& terms,
                              at::Tensor& sums);
using GroupedBwdFn = bool (*)(const std::vector<GroupedLayer>& layers, const GroupedParams& p,
                              const at::Tensor& grad_terms, const at::Tensor& sums, std::vector<at::Tensor>& grad_B,
                              std::vector<at::Tensor>& grad_A, std::vector<at::Tensor>& grad_B_align,
                              std::vector<at::Tensor>& grad_A_align);

struct GroupedCudaOverride {
  GroupedFwdFn fwd = nullptr;
  GroupedBwdFn bwd = nullptr;
  const char* name = nullptr;  // reported by agl.ops (e.g. "grouped-tc")
};

// The registry (defined in csrc/agl_ops.cpp). Used only when the opt-in switch is on: environment variable
// AGL_CUDA_GROUPED=1 at import, or torch.ops.agl.set_cuda_grouped(True) (see agl.ops.set_cuda_grouped).
GroupedCudaOverride& grouped_cuda_override();

}  // namespace agl
