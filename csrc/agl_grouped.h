// Interface between the glue (csrc/agl_glue.cpp, which validates and owns the launch paths) and an optional CUDA
// implementation of the grouped op that handles all layers of a call in one launch per pass (csrc/cuda/, opt-in).
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

// The inputs of the grouped op's schemas (agl::terms_grouped_*, and the bench build's agl_bench::terms_grouped_null).
#define AGL_GROUPED_INPUTS                                                                                       \
  "Tensor[] Bs, Tensor[] As, Tensor?[] B_aligns, Tensor?[] A_aligns, Tensor?[] Us, Tensor?[] Vs, Tensor?[] fishers, " \
  "Tensor?[] task_metrics, float[] scales, float beta, float tau, float sharpness, float eps"

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

// The registry, its opt-in switch (environment variable AGL_CUDA_GROUPED=1 at import, or agl._C.set_cuda_grouped,
// see agl.ops.set_cuda_grouped) and the status all live in csrc/agl_module.cpp.
GroupedCudaOverride& grouped_cuda_override();
// The registered override while the switch is on and both functions are registered, else nullptr.
const GroupedCudaOverride* active_grouped_override();

}  // namespace agl
