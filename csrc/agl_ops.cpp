// Torch-facing glue of the fused AGL op: schemas, argument checks, dtype dispatch, CPU (and, in a CUDA build, CUDA)
// implementations, and the Python module init so that `import agl._C` registers the ops.
//
//   agl::terms_fwd(B, A, B_align?, A_align?, fisher?, task_metric?, align_mask?, scale, beta, tau, sharpness, eps)
//       -> (terms (4,) [align, task, overlap, geodesic],
//           sums (5,)  [sum G D_A^2, sum H D_T^2, sum eta |D_A||D_T|, sum G D_A D_T, sum G D_T^2])
//   agl::terms_bwd(grad_terms, sums, <same inputs>) -> (grad_B, grad_A, grad_B_align, grad_A_align)
//
// Terms and sums come in the accumulation dtype (float64 for float64 factors, float32 otherwise). The sums are the
// forward's by-product that the backward needs (they are not differentiated); agl/ops.py wires the backward with
// torch.library.register_autograd. Forming the terms (and, backward, the grads of the sums) inside the op keeps a
// call at one dispatch each way: a dozen tiny torch ops per call cost more than the kernels on small layers.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "agl_kernels.h"

#ifdef AGL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace agl {
namespace {

using at::Tensor;
using std::optional;

bool is_factor_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name,
                   "` must be float32, float64, bfloat16 or float16, got ", t.scalar_type(), " with shape ",
                   t.sizes());
  TORCH_CHECK_VALUE(t.dim() == 2, "agl: `", name, "` must be a 2-D matrix, got shape ", t.sizes());
}

void check_scalar(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "agl: `", name, "` must be finite, got ", v);
}

// Validated, contiguous inputs of one call.
struct Prepared {
  Tensor B, A, Ba, Aa, F, H, M;  // undefined when absent
  int64_t m = 0, n = 0, r = 0, ra = 0;
  at::ScalarType factor = at::kFloat, metric = at::kFloat, acc = at::kFloat;
  double scale = 1, beta = 0, tau = 0, sharpness = 0, eps = 0;
};

Prepared prepare(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align, const optional<Tensor>& A_align,
                 const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
                 const optional<Tensor>& align_mask, double scale, double beta, double tau, double sharpness,
                 double eps) {
  check_matrix(B, "B");
  check_matrix(A, "A");
  const int64_t m = B.size(0), r = B.size(1), n = A.size(1);
  TORCH_CHECK_VALUE(A.size(0) == r, "agl: `A` must have shape (r, n) with r = B.shape[1] = ", r, "; got B ",
                    B.sizes(), ", A ", A.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "agl: `A` and `B` must share a dtype, got A ",
                   A.scalar_type(), " and B ", B.scalar_type());
  const bool hb = B_align.has_value() && B_align->defined(), ha = A_align.has_value() && A_align->defined();
  TORCH_CHECK_VALUE(hb == ha, "agl: `B_align` and `A_align` must be given together (or both None)");
  const bool hm = align_mask.has_value() && align_mask->defined();
  TORCH_CHECK_VALUE(!(hm && hb), "agl: give either `align_mask` or (`B_align`, `A_align`), not both");
  int64_t ra = 0;
  if (hb) {
    check_matrix(*B_align, "B_align");
    check_matrix(*A_align, "A_align");
    TORCH_CHECK_VALUE(B_align->size(0) == m && A_align->size(1) == n && B_align->size(1) == A_align->size(0),
                      "agl: `B_align` must be (m, r') and `A_align` (r', n) with m=", m, ", n=", n, "; got B_align ",
                      B_align->sizes(), ", A_align ", A_align->sizes());
    TORCH_CHECK_TYPE(B_align->scalar_type() == B.scalar_type() && A_align->scalar_type() == B.scalar_type(),
                     "agl: `B_align` and `A_align` must have the dtype of `B` (", B.scalar_type(), "), got ",
                     B_align->scalar_type(), " and ", A_align->scalar_type());
    ra = B_align->size(1);
  }
  const std::pair<const optional<Tensor>*, const char*> metrics[] = {
      {&fisher, "fisher"}, {&task_metric, "task_metric"}, {&align_mask, "align_mask"}};
  for (const auto& pm : metrics) {
    if (!pm.first->has_value() || !(*pm.first)->defined()) continue;
    const Tensor& t = **pm.first;
    check_matrix(t, pm.second);
    TORCH_CHECK_VALUE(t.size(0) == m && t.size(1) == n, "agl: `", pm.second, "` must have shape (m, n) = (", m, ", ",
                      n, ") like B @ A, got ", t.sizes());
  }
  const std::pair<const Tensor*, const char*> all[] = {
      {&A, "A"},
      {hb ? &*B_align : nullptr, "B_align"},
      {ha ? &*A_align : nullptr, "A_align"},
      {fisher.has_value() && fisher->defined() ? &*fisher : nullptr, "fisher"},
      {task_metric.has_value() && task_metric->defined() ? &*task_metric : nullptr, "task_metric"},
      {hm ? &*align_mask : nullptr, "align_mask"}};
  for (const auto& pt : all) {
    if (pt.first == nullptr) continue;
    TORCH_CHECK_VALUE(pt.first->device() == B.device(), "agl: `", pt.second, "` is on ", pt.first->device(),
                      " but `B` is on ", B.device(), "; all tensors must share a device");
  }
  check_scalar(scale, "scale");
  check_scalar(beta, "beta");
  check_scalar(tau, "tau");
  check_scalar(sharpness, "sharpness");
  TORCH_CHECK_VALUE(sharpness >= 0, "agl: `sharpness` must be >= 0, got ", sharpness);
  check_scalar(eps, "eps");
  TORCH_CHECK_VALUE(eps >= 0, "agl: `eps` must be >= 0, got ", eps);

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
    if (pm.first->has_value() && (*pm.first)->defined()) mts.push_back((*pm.first)->scalar_type());
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
    if (!t.has_value() || !t->defined()) return Tensor();
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

struct BwdOut {
  Tensor dB, dA, dBa, dAa;
};

BwdOut alloc_bwd(const Prepared& p) {
  BwdOut o;
  auto opt = p.B.options();
  o.dB = at::empty({p.m, p.r}, opt);
  o.dA = at::empty({p.r, p.n}, opt);
  const int64_t ra = p.Ba.defined() ? p.ra : 0;
  o.dBa = at::empty({p.m, ra}, opt);
  o.dAa = at::empty({ra, p.n}, opt);
  return o;
}

// grad_terms (4,) and sums (5,): floating point, on the device of B.
void check_vector(const Tensor& t, int64_t len, const char* name, const Prepared& p) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, "agl: `", name, "` must have shape (", len, ",), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name, "` must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == p.B.device(), "agl: `", name, "` is on ", t.device(), " but `B` is on ",
                    p.B.device(), "; all tensors must share a device");
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

// A (len,) tensor as `len` host values of type Acc.
template <typename Acc>
void host_values(const Tensor& t, Acc* out) {
  Tensor h = t.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* v = h.data_ptr<double>();
  for (int64_t k = 0; k < h.numel(); ++k) out[k] = static_cast<Acc>(v[k]);
}

// CPU: the five grads of the sums as host scalars, formed from dL/dterms and the sums.
template <typename T, typename Acc>
TermsGrads<T, Acc> make_grads(const Tensor& grad_terms, const Tensor& sums, const Prepared& p, BwdOut& o) {
  Acc gt[kNumTerms], S[kNumSums];
  host_values(grad_terms, gt);
  host_values(sums, S);
  TermsGrads<T, Acc> gr = grads_outputs<T, Acc>(o);
  grad_sums_from_grad_terms(S, gt, static_cast<Acc>(p.m) * static_cast<Acc>(p.n), static_cast<Acc>(p.eps), gr.gs);
  return gr;
}

std::tuple<Tensor, Tensor> terms_fwd_cpu_impl(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
                                              const optional<Tensor>& A_align, const optional<Tensor>& fisher,
                                              const optional<Tensor>& task_metric,
                                              const optional<Tensor>& align_mask, double scale, double beta,
                                              double tau, double sharpness, double eps) {
  Prepared p = prepare(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  TORCH_CHECK_VALUE(p.B.device().is_cpu(), "agl::terms_fwd (CPU kernel): `B` is on ", p.B.device());
  Tensor sums = at::empty({kNumSums}, p.B.options().dtype(p.acc));
  Tensor terms = at::empty({kNumTerms}, p.B.options().dtype(p.acc));
  dispatch(p, [&](auto c) {
    using C = decltype(c);
    using Acc = typename C::acc;
    auto a = make_args<typename C::t, typename C::tm, Acc>(p);
    Acc* S = static_cast<Acc*>(sums.data_ptr());
    terms_fwd_cpu(a, S);
    terms_from_sums(S, static_cast<Acc>(p.m) * static_cast<Acc>(p.n), a.eps, static_cast<Acc*>(terms.data_ptr()));
  });
  return {terms, sums};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> terms_bwd_cpu_impl(
    const Tensor& grad_terms, const Tensor& sums, const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
    const optional<Tensor>& A_align, const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
    const optional<Tensor>& align_mask, double scale, double beta, double tau, double sharpness, double eps) {
  Prepared p = prepare(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  check_vector(grad_terms, kNumTerms, "grad_terms", p);
  check_vector(sums, kNumSums, "sums", p);
  BwdOut o = alloc_bwd(p);
  dispatch(p, [&](auto c) {
    using C = decltype(c);
    using T = typename C::t;
    using Acc = typename C::acc;
    auto a = make_args<T, typename C::tm, Acc>(p);
    auto gr = make_grads<T, Acc>(grad_terms, sums, p, o);
    terms_bwd_cpu(a, gr);
  });
  return {o.dB, o.dA, o.dBa, o.dAa};
}

#ifdef AGL_WITH_CUDA
std::tuple<Tensor, Tensor> terms_fwd_cuda_impl(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
                                               const optional<Tensor>& A_align, const optional<Tensor>& fisher,
                                               const optional<Tensor>& task_metric,
                                               const optional<Tensor>& align_mask, double scale, double beta,
                                               double tau, double sharpness, double eps) {
  TORCH_CHECK_VALUE(B.is_cuda(), "agl::terms_fwd (CUDA kernel): `B` is on ", B.device());
  c10::cuda::CUDAGuard guard(B.device());
  Prepared p = prepare(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  Tensor terms = at::empty({kNumTerms}, p.B.options().dtype(p.acc));
  Tensor sums = at::empty({kNumSums}, p.B.options().dtype(p.acc));
  dispatch(p, [&](auto c) {
    using C = decltype(c);
    using Acc = typename C::acc;
    auto a = make_args<typename C::t, typename C::tm, Acc>(p);
    const size_t ws = terms_fwd_cuda_workspace(a);
    Tensor work = at::empty({static_cast<int64_t>(ws)}, p.B.options().dtype(at::kByte));
    terms_fwd_cuda(a, static_cast<Acc*>(terms.data_ptr()), static_cast<Acc*>(sums.data_ptr()),
                   ws ? work.data_ptr() : nullptr, static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
  });
  return {terms, sums};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> terms_bwd_cuda_impl(
    const Tensor& grad_terms, const Tensor& sums, const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
    const optional<Tensor>& A_align, const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
    const optional<Tensor>& align_mask, double scale, double beta, double tau, double sharpness, double eps) {
  TORCH_CHECK_VALUE(B.is_cuda(), "agl::terms_bwd (CUDA kernel): `B` is on ", B.device());
  c10::cuda::CUDAGuard guard(B.device());
  Prepared p = prepare(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  check_vector(grad_terms, kNumTerms, "grad_terms", p);
  check_vector(sums, kNumSums, "sums", p);
  BwdOut o = alloc_bwd(p);
  // The kernels read dL/dterms and the sums from device memory: converted (and made contiguous) on the device, in
  // stream order, so a backward never waits for a device->host copy. No-ops when already Acc and contiguous.
  const Tensor gt_dev = grad_terms.detach().to(p.acc).contiguous();
  const Tensor S_dev = sums.detach().to(p.acc).contiguous();
  dispatch(p, [&](auto c) {
    using C = decltype(c);
    using T = typename C::t;
    using Acc = typename C::acc;
    auto a = make_args<T, typename C::tm, Acc>(p);
    auto gr = grads_outputs<T, Acc>(o);
    gr.gt_dev = static_cast<const Acc*>(gt_dev.data_ptr());
    gr.S_dev = static_cast<const Acc*>(S_dev.data_ptr());
    const size_t ws = terms_bwd_cuda_workspace(a);
    Tensor work = at::empty({static_cast<int64_t>(ws)}, p.B.options().dtype(at::kByte));
    terms_bwd_cuda(a, gr, ws ? work.data_ptr() : nullptr,
                   static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
  });
  return {o.dB, o.dA, o.dBa, o.dAa};
}
#endif

}  // namespace

TORCH_LIBRARY(agl, m) {
  m.def(
      "terms_fwd(Tensor B, Tensor A, Tensor? B_align, Tensor? A_align, Tensor? fisher, Tensor? task_metric, "
      "Tensor? align_mask, float scale, float beta, float tau, float sharpness, float eps) -> (Tensor, Tensor)");
  m.def(
      "terms_bwd(Tensor grad_terms, Tensor sums, Tensor B, Tensor A, Tensor? B_align, Tensor? A_align, "
      "Tensor? fisher, Tensor? task_metric, Tensor? align_mask, float scale, float beta, float tau, float sharpness, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(agl, CPU, m) {
  m.impl("terms_fwd", &terms_fwd_cpu_impl);
  m.impl("terms_bwd", &terms_bwd_cpu_impl);
}

#ifdef AGL_WITH_CUDA
TORCH_LIBRARY_IMPL(agl, CUDA, m) {
  m.impl("terms_fwd", &terms_fwd_cuda_impl);
  m.impl("terms_bwd", &terms_bwd_cuda_impl);
}
#endif

}  // namespace agl

// ---- Python module: importing agl._C runs the static registrations above. ----
namespace {

PyObject* agl_with_cuda(PyObject*, PyObject*) {
#ifdef AGL_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef agl_methods[] = {
    {"with_cuda", agl_with_cuda, METH_NOARGS, "True when this build compiled the CUDA kernels of agl::terms_*."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef agl_module = {PyModuleDef_HEAD_INIT, "_C",
                          "agl's compiled kernels: importing registers torch.ops.agl.terms_fwd / terms_bwd.", -1,
                          agl_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&agl_module); }
