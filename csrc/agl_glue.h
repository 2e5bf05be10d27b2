// The one glue layer between torch and the kernels of csrc/agl_kernels.h, shared by the per-layer op
// (csrc/agl_ops.cpp), the grouped op (csrc/agl_grouped_ops.cpp) and the grouped CUDA override
// (csrc/cuda/agl_grouped_glue.cpp). A per-layer call is a Call of one layer: both ops run the same validation,
// the same dtype dispatch and the same launch / workspace / stream code per device (csrc/agl_glue.cpp), which is
// why row l of a grouped call is bitwise the per-layer op on layer l.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "agl_kernels.h"

namespace agl {
namespace glue {

using at::Tensor;
using std::optional;

inline bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Raise a TypeError / ValueError naming `name` unless t is a 2-D float32/float64/bfloat16/float16 matrix.
void check_matrix(const Tensor& t, const std::string& name);

// The argument names used in error messages: "B", "A", ... for the per-layer op, "Bs[3]", "As[3]", ... for layer 3
// of a grouped call.
struct Names {
  std::string B = "B", A = "A", B_align = "B_align", A_align = "A_align", fisher = "fisher",
              task_metric = "task_metric", align_mask = "align_mask", scale = "scale";
  static Names layer(size_t l);
};

// Validated, contiguous inputs of one layer (metrics converted to the metric dtype). An (m, 0) x (0, n) align
// pair is no pair (D_A = 0): Ba / Aa are left undefined for it, so the kernels see it as absent.
struct Prepared {
  Tensor B, A, Ba, Aa, F, H, M;  // undefined when absent
  int64_t m = 0, n = 0, r = 0, ra = 0;
  at::ScalarType factor = at::kFloat, metric = at::kFloat, acc = at::kFloat;
  double scale = 1;
};

// beta, tau, sharpness, eps: shared by all layers of a call.
void check_params(double beta, double tau, double sharpness, double eps);

Prepared prepare(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align, const optional<Tensor>& A_align,
                 const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
                 const optional<Tensor>& align_mask, double scale, const Names& nm);

// One call of either op: L >= 1 validated layers, their shared parameters and, in projection mode (grouped op with
// Us / Vs), the projections that form each layer's align pair (B_align = U (Uᵀ B), A_align = (A V) Vᵀ).
struct Call {
  std::vector<Prepared> layers;
  std::vector<Tensor> U, V;  // per layer (projection mode), contiguous, undefined when None
  bool project = false;
  bool single = false;            // the per-layer op: outputs (4,) / (5,), not (L, 4) / (L, 5); no CUDA override
  at::ScalarType out = at::kFloat;  // float64 when any layer has float64 factors, else float32
  double beta = 0, tau = 0, sharpness = 0, eps = 0;
  std::string op;     // "agl::terms" or "agl::terms_grouped" (device messages)
  std::string first;  // the first layer's B as messages name it: "B" or "Bs[0]"
  int64_t size() const { return static_cast<int64_t>(layers.size()); }
  void params(double beta, double tau, double sharpness, double eps);  // checks (check_params) and sets them
  void add(Prepared p);                                                  // appends a layer, updates `out`
  // The shape of an output or incoming tensor of `width` entries per layer.
  std::vector<int64_t> shape(int64_t width) const;
};

// Factor-gradient buffers of one layer: the op's outputs and, in projection mode, the kernels' align-pair
// gradients before they are chained back through the projections.
struct BwdOut {
  Tensor dB, dA, dBa, dAa;  // (m, r), (r, n), (m, ra), (ra, n) with ra = 0 without an align pair
};
struct LayerGrads {
  BwdOut out;     // returned
  BwdOut kernel;  // what the kernels write (== out, or with dBa/dAa temporaries in projection mode)
};

// grad_terms / sums of a backward: shape c.shape(width), floating point, on the device of the first layer.
void check_incoming(const Tensor& t, int64_t width, const char* name, const Call& c);

// The device paths: validation is done (Call built, incoming checked); these check the device, form the projected
// align pairs, allocate outputs and workspace and launch the kernels on the current stream.
std::tuple<Tensor, Tensor> fwd_cpu(Call& c);
std::vector<LayerGrads> bwd_cpu(Call& c, const Tensor& grad_terms, const Tensor& sums);
#ifdef AGL_WITH_CUDA
void* current_stream();  // the current CUDA stream (a cudaStream_t), as the kernels' launchers take it
std::tuple<Tensor, Tensor> fwd_cuda(Call& c);
std::vector<LayerGrads> bwd_cuda(Call& c, const Tensor& grad_terms, const Tensor& sums);
#endif

// ---- the one dtype dispatcher ----
template <typename T, typename TM, typename Acc>
struct Combo {
  using t = T;
  using tm = TM;
  using acc = Acc;
};

// Calls f(Combo<T, TM, Acc>{}) for the combination (t, tm) of AGL_FOR_EACH_TERMS_COMBO; false when there is none.
template <typename F>
bool dispatch_combo(at::ScalarType t, at::ScalarType tm, F&& f) {
#define AGL_DISPATCH_CASE(T, TM, ACC)                                                               \
  if (t == c10::CppTypeToScalarType<T>::value && tm == c10::CppTypeToScalarType<TM>::value) {       \
    f(Combo<T, TM, ACC>{});                                                                          \
    return true;                                                                                     \
  }
  AGL_FOR_EACH_TERMS_COMBO(AGL_DISPATCH_CASE)
#undef AGL_DISPATCH_CASE
  return false;
}

// The metric dtype that pairs with a factor dtype when there is no metric (or it does not matter).
inline at::ScalarType default_metric(at::ScalarType factor) {
  return factor == at::kDouble ? at::kDouble : at::kFloat;
}

// f(Combo) for a layer's (factor, metric) dtypes: prepare() only produces listed combinations.
template <typename F>
void dispatch(const Prepared& p, F&& f) {
  TORCH_CHECK(dispatch_combo(p.factor, p.metric, f), "agl: unsupported dtypes: factors ", p.factor, ", metrics ",
              p.metric);
}

template <typename X>
const X* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const X*>(t.data_ptr()) : nullptr;
}

template <typename T, typename TM, typename Acc>
TermsArgs<T, TM, Acc> make_args(const Prepared& p, const Call& c) {
  TermsArgs<T, TM, Acc> a;
  a.m = p.m;
  a.n = p.n;
  a.r = p.r;
  a.ra = p.Ba.defined() ? p.ra : 0;
  a.B = cptr<T>(p.B);
  a.A = cptr<T>(p.A);
  a.Ba = cptr<T>(p.Ba);
  a.Aa = cptr<T>(p.Aa);
  a.F = cptr<TM>(p.F);
  a.H = cptr<TM>(p.H);
  a.M = cptr<TM>(p.M);
  a.scale = static_cast<Acc>(p.scale);
  a.eps = static_cast<Acc>(c.eps);
  a.eta.beta = static_cast<Acc>(c.beta);
  a.eta.tau = static_cast<Acc>(c.tau);
  a.eta.kappa = static_cast<Acc>(c.sharpness);
  return a;
}

// The backward's output pointers; the caller fills in the incoming gradients (gs, or gt_dev and S_dev).
template <typename T, typename Acc>
TermsGrads<T, Acc> grads_outputs(BwdOut& o) {
  TermsGrads<T, Acc> gr;
  gr.dB = static_cast<T*>(o.dB.data_ptr());
  gr.dA = static_cast<T*>(o.dA.data_ptr());
  gr.dBa = o.dBa.numel() > 0 ? static_cast<T*>(o.dBa.data_ptr()) : nullptr;
  gr.dAa = o.dAa.numel() > 0 ? static_cast<T*>(o.dAa.data_ptr()) : nullptr;
  return gr;
}

}  // namespace glue
}  // namespace agl
