// The two ops, agl::terms_* (one layer) and agl::terms_grouped_* (L layers in one call): their schemas, the
// structure of their inputs, and their CPU (and, in a CUDA build, CUDA) implementations. Both build the glue's Call
// (csrc/agl_glue.h) and run its one path per device: the per-layer op is the one-layer case of the grouped one.
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
//
//   agl::terms_grouped_fwd(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
//                          eps) -> (terms (L, 4) [align, task, overlap, geodesic], sums (L, 5))
//   agl::terms_grouped_bwd(grad_terms (L, 4), sums (L, 5), <same inputs>) -> (grad_Bs, grad_As, grad_B_aligns,
//                                                                             grad_A_aligns)
//
// Lists: Bs, As, scales hold one entry per layer; the optional lists are empty (absent) or hold one entry (or None)
// per layer. With Us or Vs non-empty every layer's alignment pair is formed inside the op:
//   B_align = U (Uᵀ B) (B when U is None),  A_align = (A V) Vᵀ (A when V is None),
// and its gradient is chained back into grad_B / grad_A (grad_B_aligns / grad_A_aligns are then empty (m, 0) /
// (0, n)); giving B_aligns/A_aligns too is an error. Output dtype: float64 when any layer has float64 factors, else
// float32. Row l equals what agl::terms_fwd returns for layer l alone, bit for bit (the same Call path: the same CPU
// tasks, the same per-layer CUDA kernels), so grouping changes the cost, never the numbers. On CUDA the grouped op
// offers the call to the opt-in single-launch override first (csrc/agl_grouped.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "agl_glue.h"
#include "agl_grouped.h"

namespace agl {
namespace {

using at::Tensor;
using at::TensorList;
using std::optional;
using namespace glue;
using Grads4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using OptList = c10::List<optional<Tensor>>;
using Lists = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

// ------------------------------------------------------------------------------------------------ one layer
Call single_call(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align, const optional<Tensor>& A_align,
                 const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
                 const optional<Tensor>& align_mask, double scale, double beta, double tau, double sharpness,
                 double eps) {
  Call c;
  c.single = true;
  c.op = "agl::terms";
  c.first = "B";
  c.add(prepare(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, Names()));
  c.params(beta, tau, sharpness, eps);
  return c;
}

template <std::tuple<Tensor, Tensor> (*Fwd)(Call&)>
std::tuple<Tensor, Tensor> terms_fwd(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align,
                                     const optional<Tensor>& A_align, const optional<Tensor>& fisher,
                                     const optional<Tensor>& task_metric, const optional<Tensor>& align_mask,
                                     double scale, double beta, double tau, double sharpness, double eps) {
  Call c = single_call(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  return Fwd(c);
}

template <std::vector<LayerGrads> (*Bwd)(Call&, const Tensor&, const Tensor&)>
Grads4 terms_bwd(const Tensor& grad_terms, const Tensor& sums, const Tensor& B, const Tensor& A,
                 const optional<Tensor>& B_align, const optional<Tensor>& A_align, const optional<Tensor>& fisher,
                 const optional<Tensor>& task_metric, const optional<Tensor>& align_mask, double scale, double beta,
                 double tau, double sharpness, double eps) {
  Call c = single_call(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps);
  check_incoming(grad_terms, kNumTerms, "grad_terms", c);
  check_incoming(sums, kNumSums, "sums", c);
  const BwdOut o = Bwd(c, grad_terms, sums)[0].out;
  return {o.dB, o.dA, o.dBa, o.dAa};
}

// ------------------------------------------------------------------------------------------------ L layers
optional<Tensor> entry(const OptList& list, size_t l) {
  if (list.size() == 0) return std::nullopt;
  optional<Tensor> t = list.get(l);
  return given(t) ? t : std::nullopt;
}

void check_list_len(size_t len, size_t L, const char* name, bool optional_list) {
  TORCH_CHECK_VALUE(len == L || (optional_list && len == 0), "agl: `", name, "` must have one entry per layer (",
                    L, " = len(Bs))", optional_list ? " or be empty" : "", ", got ", len);
}

// Us[l] (m, k) / Vs[l] (n, k) of the factors' dtype and device (t: the entry, or none).
void check_projection(const optional<Tensor>& t, const std::string& name, bool u_side, const Prepared& p,
                      const Names& nm) {
  if (!t) return;
  const int64_t rows = u_side ? p.m : p.n;
  check_matrix(*t, name);
  TORCH_CHECK_VALUE(t->size(0) == rows, "agl: `", name, "` must have shape (", u_side ? "m" : "n", ", k) with ",
                    u_side ? "m = " : "n = ", rows, " (", u_side ? nm.B : nm.A, " has shape ",
                    u_side ? p.B.sizes() : p.A.sizes(), "), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == p.factor, "agl: `", name, "` must have the dtype of `", nm.B, "` (", p.factor,
                   "), got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == p.B.device(), "agl: `", name, "` is on ", t->device(), " but `", nm.B, "` is on ",
                    p.B.device(), "; all tensors must share a device");
}

Call grouped_call(TensorList Bs, TensorList As, const OptList& B_aligns, const OptList& A_aligns, const OptList& Us,
                  const OptList& Vs, const OptList& fishers, const OptList& task_metrics, at::ArrayRef<double> scales,
                  double beta, double tau, double sharpness, double eps) {
  const size_t L = Bs.size();
  TORCH_CHECK_VALUE(L > 0, "agl: `Bs` must hold at least one layer, got an empty list");
  check_list_len(As.size(), L, "As", false);
  check_list_len(scales.size(), L, "scales", false);
  check_list_len(B_aligns.size(), L, "B_aligns", true);
  check_list_len(A_aligns.size(), L, "A_aligns", true);
  check_list_len(Us.size(), L, "Us", true);
  check_list_len(Vs.size(), L, "Vs", true);
  check_list_len(fishers.size(), L, "fishers", true);
  check_list_len(task_metrics.size(), L, "task_metrics", true);
  Call c;
  c.op = "agl::terms_grouped";
  c.first = "Bs[0]";
  c.params(beta, tau, sharpness, eps);
  c.project = Us.size() > 0 || Vs.size() > 0;
  c.layers.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const Names nm = Names::layer(l);
    const optional<Tensor> Ba = entry(B_aligns, l), Aa = entry(A_aligns, l);
    TORCH_CHECK_VALUE(!(c.project && (Ba || Aa)), "agl: give either `B_aligns`/`A_aligns` or `Us`/`Vs`, not both (",
                      Ba ? nm.B_align : nm.A_align, " is set while `Us`/`Vs` are given)");
    c.add(prepare(Bs[l], As[l], Ba, Aa, entry(fishers, l), entry(task_metrics, l), std::nullopt, scales[l], nm));
    Prepared& p = c.layers.back();
    TORCH_CHECK_VALUE(p.B.device() == Bs[0].device(), "agl: `", nm.B, "` is on ", p.B.device(), " but `Bs[0]` is on ",
                      Bs[0].device(), "; all layers must share a device");
    if (!c.project) continue;
    const optional<Tensor> U = entry(Us, l), V = entry(Vs, l);
    check_projection(U, "Us[" + std::to_string(l) + "]", true, p, nm);
    check_projection(V, "Vs[" + std::to_string(l) + "]", false, p, nm);
    c.U.push_back(U ? U->contiguous() : Tensor());
    c.V.push_back(V ? V->contiguous() : Tensor());
    p.ra = p.r;  // the alignment pair has the shapes of (B, A)
  }
  return c;
}

template <std::tuple<Tensor, Tensor> (*Fwd)(Call&)>
std::tuple<Tensor, Tensor> grouped_fwd(TensorList Bs, TensorList As, const OptList& B_aligns, const OptList& A_aligns,
                                       const OptList& Us, const OptList& Vs, const OptList& fishers,
                                       const OptList& task_metrics, at::ArrayRef<double> scales, double beta,
                                       double tau, double sharpness, double eps) {
  Call c = grouped_call(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps);
  return Fwd(c);
}

template <std::vector<LayerGrads> (*Bwd)(Call&, const Tensor&, const Tensor&)>
Lists grouped_bwd(const Tensor& grad_terms, const Tensor& sums, TensorList Bs, TensorList As, const OptList& B_aligns,
                  const OptList& A_aligns, const OptList& Us, const OptList& Vs, const OptList& fishers,
                  const OptList& task_metrics, at::ArrayRef<double> scales, double beta, double tau, double sharpness,
                  double eps) {
  Call c = grouped_call(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps);
  check_incoming(grad_terms, kNumTerms, "grad_terms", c);
  check_incoming(sums, kNumSums, "sums", c);
  Lists o;
  for (const LayerGrads& g : Bwd(c, grad_terms, sums)) {
    std::get<0>(o).push_back(g.out.dB);
    std::get<1>(o).push_back(g.out.dA);
    std::get<2>(o).push_back(g.out.dBa);
    std::get<3>(o).push_back(g.out.dAa);
  }
  return o;
}

}  // namespace

TORCH_LIBRARY(agl, m) {
  m.def(
      "terms_fwd(Tensor B, Tensor A, Tensor? B_align, Tensor? A_align, Tensor? fisher, Tensor? task_metric, "
      "Tensor? align_mask, float scale, float beta, float tau, float sharpness, float eps) -> (Tensor, Tensor)");
  m.def(
      "terms_bwd(Tensor grad_terms, Tensor sums, Tensor B, Tensor A, Tensor? B_align, Tensor? A_align, "
      "Tensor? fisher, Tensor? task_metric, Tensor? align_mask, float scale, float beta, float tau, float sharpness, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("terms_grouped_fwd(" AGL_GROUPED_INPUTS ") -> (Tensor, Tensor)");
  m.def("terms_grouped_bwd(Tensor grad_terms, Tensor sums, " AGL_GROUPED_INPUTS
        ") -> (Tensor[], Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(agl, CPU, m) {
  m.impl("terms_fwd", &terms_fwd<fwd_cpu>);
  m.impl("terms_bwd", &terms_bwd<bwd_cpu>);
  m.impl("terms_grouped_fwd", &grouped_fwd<fwd_cpu>);
  m.impl("terms_grouped_bwd", &grouped_bwd<bwd_cpu>);
}

#ifdef AGL_WITH_CUDA
TORCH_LIBRARY_IMPL(agl, CUDA, m) {
  m.impl("terms_fwd", &terms_fwd<fwd_cuda>);
  m.impl("terms_bwd", &terms_bwd<bwd_cuda>);
  m.impl("terms_grouped_fwd", &grouped_fwd<fwd_cuda>);
  m.impl("terms_grouped_bwd", &grouped_bwd<bwd_cuda>);
}
#endif

}  // namespace agl
