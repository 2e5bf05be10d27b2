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

#include "agl_glue.h"
#include "agl_grouped.h"
#include "agl_kernels.h"

#ifdef AGL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace agl {

std::pair<bool, const char*> cuda_grouped_status();  // csrc/agl_grouped_ops.cpp

// The registry of an opt-in single-launch CUDA implementation of the grouped op (csrc/agl_grouped.h).
GroupedCudaOverride& grouped_cuda_override() {
  static GroupedCudaOverride o;
  return o;
}

namespace {

using at::Tensor;
using std::optional;
using namespace glue;

// grad_terms (4,) and sums (5,): floating point, on the device of B.
void check_vector(const Tensor& t, int64_t len, const char* name, const Prepared& p) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, "agl: `", name, "` must have shape (", len, ",), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name, "` must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == p.B.device(), "agl: `", name, "` is on ", t.device(), " but `B` is on ",
                    p.B.device(), "; all tensors must share a device");
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

// (enabled, name): whether the opt-in single-launch CUDA grouped implementation is switched on, and its name (None
// when no implementation is registered in this build).
PyObject* agl_cuda_grouped_status(PyObject*, PyObject*) {
  const auto st = agl::cuda_grouped_status();
  if (st.second == nullptr) return Py_BuildValue("(OO)", st.first ? Py_True : Py_False, Py_None);
  return Py_BuildValue("(Os)", st.first ? Py_True : Py_False, st.second);
}

PyMethodDef agl_methods[] = {
    {"with_cuda", agl_with_cuda, METH_NOARGS, "True when this build compiled the CUDA kernels of agl::terms_*."},
    {"cuda_grouped_status", agl_cuda_grouped_status, METH_NOARGS,
     "(enabled, name) of the opt-in single-launch CUDA implementation of agl::terms_grouped_*."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef agl_module = {PyModuleDef_HEAD_INIT, "_C",
                          "agl's compiled kernels: importing registers torch.ops.agl.terms_* (per layer and grouped).", -1,
                          agl_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&agl_module); }
