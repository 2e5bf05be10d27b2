// Torch-facing helpers shared by the glue of the per-layer ops (csrc/agl_ops.cpp) and of the grouped ops
// (csrc/agl_grouped_ops.cpp): argument checks with messages that name the argument (and, grouped, the layer),
// contiguous inputs, dtype dispatch, and the plain kernel structs of csrc/agl_kernels.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "agl_kernels.h"

namespace agl {
namespace glue {

using at::Tensor;
using std::optional;

inline bool is_factor_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_matrix(const Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name,
                   "` must be float32, float64, bfloat16 or float16, got ", t.scalar_type(), " with shape ",
                   t.sizes());
  TORCH_CHECK_VALUE(t.dim() == 2, "agl: `", name, "` must be a 2-D matrix, got shape ", t.sizes());
}

inline void check_scalar(double v, const std::string& name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "agl: `", name, "` must be finite, got ", v);
}

// The argument names used in error messages: "B", "A", ... for the per-layer op, "Bs[3]", "As[3]", ... for layer 3
// of a grouped call.
struct Names {
  std::string B = "B", A = "A", B_align = "B_align", A_align = "A_align", fisher = "fisher",
              task_metric = "task_metric", align_mask = "align_mask", scale = "scale";
  static Names layer(size_t l) {
    const std::string i = "[" + std::to_string(l) + "]";
    Names n;
    n.B = "Bs" + i;
    n.A = "As" + i;
    n.B_align = "B_aligns" + i;
    n.A_align = "A_aligns" + i;
    n.fisher = "fishers" + i;
    n.task_metric = "task_metrics" + i;
    n.align_mask = "align_masks" + i;
    n.scale = "scales" + i;
    return n;
  }
};

// Validated, contiguous inputs of one layer.
struct Prepared {
  Tensor B, A, Ba, Aa, F, H, M;  // undefined when absent
  int64_t m = 0, n = 0, r = 0, ra = 0;
  at::ScalarType factor = at::kFloat, metric = at::kFloat, acc = at::kFloat;
  double scale = 1, beta = 0, tau = 0, sharpness = 0, eps = 0;
};

// beta, tau, sharpness, eps: shared by all layers of a call.
inline void check_params(double beta, double tau, double sharpness, double eps) {
  check_scalar(beta, "beta");
  check_scalar(tau, "tau");
  check_scalar(sharpness, "sharpness");
  TORCH_CHECK_VALUE(sharpness >= 0, "agl: `sharpness` must be >= 0, got ", sharpness);
  check_scalar(eps, "eps");
  TORCH_CHECK_VALUE(eps >= 0, "agl: `eps` must be >= 0, got ", eps);
}

inline Prepared prepare(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
                        const optional<Tensor>& A_align, const optional<Tensor>& fisher,
                        const optional<Tensor>& task_metric, const optional<Tensor>& align_mask, double scale,
                        double beta, double tau, double sharpness, double eps, const Names& nm = Names()) {
  check_matrix(B, nm.B);
  check_matrix(A, nm.A);
  const int64_t m = B.size(0), r = B.size(1), n = A.size(1);
  TORCH_CHECK_VALUE(A.size(0) == r, "agl: `", nm.A, "` must have shape (r, n) with r = ", nm.B, ".shape[1] = ", r,
                    "; got ", nm.B, " ", B.sizes(), ", ", nm.A, " ", A.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "agl: `", nm.A, "` and `", nm.B, "` must share a dtype, got ",
                   nm.A, " ", A.scalar_type(), " and ", nm.B, " ", B.scalar_type());
  const bool hb = given(B_align), ha = given(A_align), hm = given(align_mask);
  TORCH_CHECK_VALUE(hb == ha, "agl: `", nm.B_align, "` and `", nm.A_align, "` must be given together (or both None)");
  TORCH_CHECK_VALUE(!(hm && hb), "agl: give either `", nm.align_mask, "` or (`", nm.B_align, "`, `", nm.A_align,
                    "`), not both");
  int64_t ra = 0;
  if (hb) {
    check_matrix(*B_align, nm.B_align);
    check_matrix(*A_align, nm.A_align);
    TORCH_CHECK_VALUE(B_align->size(0) == m && A_align->size(1) == n && B_align->size(1) == A_align->size(0), "agl: `",
                      nm.B_align, "` must be (m, r') and `", nm.A_align, "` (r', n) with m=", m, ", n=", n, "; got ",
                      nm.B_align, " ", B_align->sizes(), ", ", nm.A_align, " ", A_align->sizes());
    TORCH_CHECK_TYPE(B_align->scalar_type() == B.scalar_type() && A_align->scalar_type() == B.scalar_type(), "agl: `",
                     nm.B_align, "` and `", nm.A_align, "` must have the dtype of `", nm.B, "` (", B.scalar_type(),
                     "), got ", B_align->scalar_type(), " and ", A_align->scalar_type());
    ra = B_align->size(1);
  }
  const std::pair<const optional<Tensor>*, const std::string*> metrics[] = {
      {&fisher, &nm.fisher}, {&task_metric, &nm.task_metric}, {&align_mask, &nm.align_mask}};
  for (const auto& pm : metrics) {
    if (!given(*pm.first)) continue;
    const Tensor& t = **pm.first;
    check_matrix(t, *pm.second);
    TORCH_CHECK_VALUE(t.size(0) == m && t.size(1) == n, "agl: `", *pm.second, "` must have shape (m, n) = (", m, ", ",
                      n, ") like ", nm.B, " @ ", nm.A, ", got ", t.sizes());
  }
  const std::pair<const optional<Tensor>*, const std::string*> all[] = {
      {&B_align, &nm.B_align}, {&A_align, &nm.A_align}, {&fisher, &nm.fisher}, {&task_metric, &nm.task_metric},
      {&align_mask, &nm.align_mask}};
  TORCH_CHECK_VALUE(A.device() == B.device(), "agl: `", nm.A, "` is on ", A.device(), " but `", nm.B, "` is on ",
                    B.device(), "; all tensors must share a device");
  for (const auto& pt : all) {
    if (!given(*pt.first)) continue;
    TORCH_CHECK_VALUE((*pt.first)->device() == B.device(), "agl: `", *pt.second, "` is on ", (*pt.first)->device(),
                      " but `", nm.B, "` is on ", B.device(), "; all tensors must share a device");
  }
  check_scalar(scale, nm.scale);
  check_params(beta, tau, sharpness, eps);

  Prepared p;
  p.m = m;
  p.n = n;
  p.r = r;
  p.ra = ra;
  p.factor = B.scalar_type();
  p.acc = p.factor == at::kDouble ? at::kDouble : at::kFloat;
  // One metric dtype for fisher/task_metric/align_mask: double with double factors; otherwise their shared dtype
  // when they all have the same 16/32-bit float dtype, else float32.
  std::vector<at::ScalarType> mts;
  for (const auto& pm : metrics)
    if (given(*pm.first)) mts.push_back((*pm.first)->scalar_type());
  if (p.factor == at::kDouble) {
    p.metric = at::kDouble;
  } else {
    p.metric = at::kFloat;
    if (!mts.empty() && mts[0] != at::kDouble) {
      bool same = true;
      for (auto t : mts) same = same && t == mts[0];
      if (same) p.metric = mts[0];
    }
  }
  p.B = B.contiguous();
  p.A = A.contiguous();
  if (hb) {
    p.Ba = B_align->contiguous();
    p.Aa = A_align->contiguous();
  }
  auto metric = [&](const optional<Tensor>& t) -> Tensor {
    if (!given(t)) return Tensor();
    return t->to(p.metric).contiguous();
  };
  p.F = metric(fisher);
  p.H = metric(task_metric);
  p.M = metric(align_mask);
  p.scale = scale;
  p.beta = beta;
  p.tau = tau;
  p.sharpness = sharpness;
  p.eps = eps;
  return p;
}

template <typename T, typename TM, typename Acc>
struct Combo {
  using t = T;
  using tm = TM;
  using acc = Acc;
};

// Calls f(Combo<T, TM, Acc>{}) for the (factor, metric) dtypes of p; the combos are AGL_FOR_EACH_TERMS_COMBO's.
template <typename TM, typename F>
void dispatch_factor(at::ScalarType factor, F&& f) {
  switch (factor) {
    case at::kFloat: f(Combo<float, TM, float>{}); break;
    case at::kHalf: f(Combo<c10::Half, TM, float>{}); break;
    case at::kBFloat16: f(Combo<c10::BFloat16, TM, float>{}); break;
    default: TORCH_CHECK(false, "agl: unsupported factor dtype ", factor);
  }
}
template <typename F>
void dispatch(const Prepared& p, F&& f) {
  if (p.factor == at::kDouble) {
    f(Combo<double, double, double>{});
    return;
  }
  switch (p.metric) {
    case at::kFloat: dispatch_factor<float>(p.factor, f); break;
    case at::kHalf: dispatch_factor<c10::Half>(p.factor, f); break;
    case at::kBFloat16: dispatch_factor<c10::BFloat16>(p.factor, f); break;
    default: TORCH_CHECK(false, "agl: unsupported metric dtype ", p.metric);
  }
}

template <typename X>
const X* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const X*>(t.data_ptr()) : nullptr;
}

template <typename T, typename TM, typename Acc>
TermsArgs<T, TM, Acc> make_args(const Prepared& p) {
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
  a.eps = static_cast<Acc>(p.eps);
  a.eta.beta = static_cast<Acc>(p.beta);
  a.eta.tau = static_cast<Acc>(p.tau);
  a.eta.kappa = static_cast<Acc>(p.sharpness);
  return a;
}

// The factor gradients of one layer: (m, r), (r, n), (m, ra), (ra, n) with ra = 0 without an align pair.
struct BwdOut {
  Tensor dB, dA, dBa, dAa;
};

inline BwdOut alloc_bwd(const Prepared& p) {
  BwdOut o;
  auto opt = p.B.options();
  o.dB = at::empty({p.m, p.r}, opt);
  o.dA = at::empty({p.r, p.n}, opt);
  const int64_t ra = p.Ba.defined() ? p.ra : 0;
  o.dBa = at::empty({p.m, ra}, opt);
  o.dAa = at::empty({ra, p.n}, opt);
  return o;
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
