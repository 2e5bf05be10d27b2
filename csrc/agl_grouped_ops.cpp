// The grouped op: the AGL terms of L layers in one call (schemas, checks, the CPU implementation, the CUDA loop over
// the per-layer kernels with its opt-in single-launch override, and a do-nothing provider for benchmarks).
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
// float32. Row l equals what agl::terms_fwd returns for layer l alone, bit for bit (the same CPU tasks, the same
// per-layer CUDA kernels), so grouping changes the cost, never the numbers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <vector>

#include "agl_glue.h"
#include "agl_grouped.h"
#include "agl_kernels.h"

#ifdef AGL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace agl {
namespace {

using at::Tensor;
using at::TensorList;
using std::optional;
using namespace glue;
using OptList = c10::List<optional<Tensor>>;
using Lists = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

// The opt-in switch of the CUDA override: AGL_CUDA_GROUPED=1 at load time, or agl::set_cuda_grouped.
std::atomic<bool>& cuda_grouped_switch() {
  static std::atomic<bool> on{std::getenv("AGL_CUDA_GROUPED") != nullptr &&
                              std::string(std::getenv("AGL_CUDA_GROUPED")) == "1"};
  return on;
}

// Returns whether the override is now in use (switch on and an implementation registered).
bool set_cuda_grouped(bool enable) {
  cuda_grouped_switch() = enable;
  const auto& o = grouped_cuda_override();
  return enable && o.fwd != nullptr && o.bwd != nullptr;
}

optional<Tensor> entry(const OptList& list, size_t l) {
  if (list.size() == 0) return std::nullopt;
  optional<Tensor> t = list.get(l);
  return given(t) ? t : std::nullopt;
}

// Validated inputs of a grouped call. In projection mode p.Ba / p.Aa are filled in by project_cpu / project_cuda.
struct Grouped {
  std::vector<Prepared> layers;
  std::vector<Tensor> U, V;  // per layer (projection mode), contiguous, undefined when None
  bool project = false;
  at::ScalarType out = at::kFloat;
  double beta = 0, tau = 0, sharpness = 0, eps = 0;
  int64_t size() const { return static_cast<int64_t>(layers.size()); }
};

void check_list_len(size_t len, size_t L, const char* name, bool optional_list) {
  TORCH_CHECK_VALUE(len == L || (optional_list && len == 0), "agl: `", name, "` must have one entry per layer (",
                    L, " = len(Bs))", optional_list ? " or be empty" : "", ", got ", len);
}

Grouped prepare_grouped(TensorList Bs, TensorList As, const OptList& B_aligns, const OptList& A_aligns,
                        const OptList& Us, const OptList& Vs, const OptList& fishers, const OptList& task_metrics,
                        at::ArrayRef<double> scales, double beta, double tau, double sharpness, double eps) {
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
  check_params(beta, tau, sharpness, eps);
  Grouped g;
  g.project = Us.size() > 0 || Vs.size() > 0;
  g.beta = beta;
  g.tau = tau;
  g.sharpness = sharpness;
  g.eps = eps;
  g.layers.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const Names nm = Names::layer(l);
    const optional<Tensor> Ba = entry(B_aligns, l), Aa = entry(A_aligns, l);
    TORCH_CHECK_VALUE(!(g.project && (Ba || Aa)), "agl: give either `B_aligns`/`A_aligns` or `Us`/`Vs`, not both (",
                      Ba ? nm.B_align : nm.A_align, " is set while `Us`/`Vs` are given)");
    g.layers.push_back(prepare(Bs[l], As[l], Ba, Aa, entry(fishers, l), entry(task_metrics, l), std::nullopt,
                               scales[l], beta, tau, sharpness, eps, nm));
    Prepared& p = g.layers.back();
    TORCH_CHECK_VALUE(p.B.device() == Bs[0].device(), "agl: `", nm.B, "` is on ", p.B.device(), " but `Bs[0]` is on ",
                      Bs[0].device(), "; all layers must share a device");
    if (p.factor == at::kDouble) g.out = at::kDouble;
    if (!g.project) {
      if (p.Ba.defined() && p.ra == 0) {  // an (m, 0) x (0, n) pair is no pair (D_A = 0): kernels see it as absent
        p.Ba = Tensor();
        p.Aa = Tensor();
      }
      continue;
    }
    const std::string iu = "Us[" + std::to_string(l) + "]", iv = "Vs[" + std::to_string(l) + "]";
    const std::pair<optional<Tensor>, std::pair<const std::string*, int64_t>> proj[] = {
        {entry(Us, l), {&iu, p.m}}, {entry(Vs, l), {&iv, p.n}}};
    for (int side = 0; side < 2; ++side) {
      const optional<Tensor>& t = proj[side].first;
      const std::string& name = *proj[side].second.first;
      const int64_t rows = proj[side].second.second;
      if (t) {
        check_matrix(*t, name);
        TORCH_CHECK_VALUE(t->size(0) == rows, "agl: `", name, "` must have shape (", side == 0 ? "m" : "n", ", k) with ",
                          side == 0 ? "m = " : "n = ", rows, " (", side == 0 ? nm.B : nm.A, " has shape ",
                          side == 0 ? p.B.sizes() : p.A.sizes(), "), got ", t->sizes());
        TORCH_CHECK_TYPE(t->scalar_type() == p.factor, "agl: `", name, "` must have the dtype of `", nm.B, "` (",
                         p.factor, "), got ", t->scalar_type());
        TORCH_CHECK_VALUE(t->device() == p.B.device(), "agl: `", name, "` is on ", t->device(), " but `", nm.B,
                          "` is on ", p.B.device(), "; all tensors must share a device");
      }
      (side == 0 ? g.U : g.V).push_back(t ? t->contiguous() : Tensor());
    }
    p.ra = p.r;  // the alignment pair has the shapes of (B, A)
  }
  return g;
}

// grad_terms (L, 4) and sums (L, 5): floating point, on the device of the layers.
void check_rows(const Tensor& t, int64_t L, int64_t width, const char* name, const Grouped& g) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == L && t.size(1) == width, "agl: `", name, "` must have shape (", L,
                    ", ", width, "), got ", t.sizes());
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name, "` must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == g.layers[0].B.device(), "agl: `", name, "` is on ", t.device(),
                    " but `Bs[0]` is on ", g.layers[0].B.device(), "; all tensors must share a device");
}

// Factor-gradient buffers of one layer: the op's outputs and, in projection mode, the kernels' align-pair
// gradients before they are chained back through the projections.
struct LayerGrads {
  BwdOut out;     // returned: dB (m, r), dA (r, n), dBa (m, ra | 0), dAa (ra | 0, n)
  BwdOut kernel;  // what the kernels write (== out, or with dBa/dAa temporaries in projection mode)
};

std::vector<LayerGrads> alloc_grads(const Grouped& g) {
  std::vector<LayerGrads> gs(g.layers.size());
  for (size_t l = 0; l < g.layers.size(); ++l) {
    const Prepared& p = g.layers[l];
    if (!g.project) {
      gs[l].out = gs[l].kernel = alloc_bwd(p);
      continue;
    }
    auto opt = p.B.options();
    gs[l].out.dB = at::empty({p.m, p.r}, opt);
    gs[l].out.dA = at::empty({p.r, p.n}, opt);
    gs[l].out.dBa = at::empty({p.m, 0}, opt);
    gs[l].out.dAa = at::empty({0, p.n}, opt);
    gs[l].kernel = gs[l].out;
    gs[l].kernel.dBa = at::empty({p.m, p.r}, opt);
    gs[l].kernel.dAa = at::empty({p.r, p.n}, opt);
  }
  return gs;
}

Lists to_lists(const std::vector<LayerGrads>& gs) {
  Lists o;
  for (const auto& x : gs) {
    std::get<0>(o).push_back(x.out.dB);
    std::get<1>(o).push_back(x.out.dA);
    std::get<2>(o).push_back(x.out.dBa);
    std::get<3>(o).push_back(x.out.dAa);
  }
  return o;
}

// Calls f(Combo<T, Acc>) for a factor dtype (the projections need no metric dtype).
template <typename F>
void dispatch_factor_only(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: f(Combo<double, double, double>{}); break;
    case at::kFloat: f(Combo<float, float, float>{}); break;
    case at::kHalf: f(Combo<c10::Half, float, float>{}); break;
    case at::kBFloat16: f(Combo<c10::BFloat16, float, float>{}); break;
    default: TORCH_CHECK(false, "agl: unsupported factor dtype ", t);
  }
}

// ---------------------------------------------------------------------------------------------------------- CPU

// Projection mode: B_align / A_align of every layer (fresh tensors, or B / A themselves where U / V is None), one
// task per layer in one parallel region. backward = true: grad_B += U (Uᵀ grad_B_align), grad_A likewise.
void project_cpu(Grouped& g, std::vector<LayerGrads>* grads) {
  if (!g.project) return;
  CpuTaskList tasks;
  for (int64_t l = 0; l < g.size(); ++l) {
    Prepared& p = g.layers[l];
    const Tensor &U = g.U[l], &V = g.V[l];
    if (grads == nullptr) {
      p.Ba = U.defined() ? at::empty({p.m, p.r}, p.B.options()) : p.B;
      p.Aa = V.defined() ? at::empty({p.r, p.n}, p.A.options()) : p.A;
      if (!U.defined() && !V.defined()) continue;
    }
    dispatch_factor_only(p.factor, [&](auto c) {
      using T = typename decltype(c)::t;
      ProjArgs<T> a;
      a.m = p.m;
      a.n = p.n;
      a.r = p.r;
      a.ku = U.defined() ? U.size(1) : 0;
      a.kv = V.defined() ? V.size(1) : 0;
      a.U = cptr<T>(U);
      a.V = cptr<T>(V);
      if (grads == nullptr) {
        a.X_B = cptr<T>(p.B);
        a.X_A = cptr<T>(p.A);
        a.Y_B = U.defined() ? static_cast<T*>(p.Ba.data_ptr()) : nullptr;
        a.Y_A = V.defined() ? static_cast<T*>(p.Aa.data_ptr()) : nullptr;
      } else {
        BwdOut& k = (*grads)[l].kernel;
        a.X_B = cptr<T>(k.dBa);
        a.X_A = cptr<T>(k.dAa);
        a.Y_B = static_cast<T*>(k.dB.data_ptr());
        a.Y_A = static_cast<T*>(k.dA.data_ptr());
        a.accumulate = true;
      }
      tasks.push_back(project_cpu_task<T>(a));
    });
  }
  run_cpu_tasks(tasks);
}

// Layer l's row of an (L, width) output in its own accumulation type Acc: row l itself when Acc is the output
// dtype, else (a float32 layer in a call with float64 layers) a float32 staging row, widened (exactly) afterwards.
struct Rows {
  Tensor out;
  int64_t width;
  std::vector<float> stage;
  Rows(int64_t L, int64_t w, const at::TensorOptions& opt) : out(at::empty({L, w}, opt)), width(w) {
    if (out.scalar_type() == at::kDouble) stage.resize(L * w);
  }
  template <typename Acc>
  Acc* row(int64_t l) {
    if constexpr (std::is_same<Acc, double>::value) {
      return out.data_ptr<double>() + l * width;
    } else {
      return out.scalar_type() == at::kFloat ? out.data_ptr<float>() + l * width : stage.data() + l * width;
    }
  }
  void widen(const Grouped& g) {
    if (stage.empty()) return;
    double* o = out.data_ptr<double>();
    for (int64_t l = 0; l < g.size(); ++l)
      if (g.layers[l].acc == at::kFloat)
        for (int64_t k = 0; k < width; ++k) o[l * width + k] = static_cast<double>(stage[l * width + k]);
  }
};

std::tuple<Tensor, Tensor> grouped_fwd_cpu(TensorList Bs, TensorList As, const OptList& B_aligns,
                                           const OptList& A_aligns, const OptList& Us, const OptList& Vs,
                                           const OptList& fishers, const OptList& task_metrics,
                                           at::ArrayRef<double> scales, double beta, double tau, double sharpness,
                                           double eps) {
  Grouped g = prepare_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                              eps);
  TORCH_CHECK_VALUE(g.layers[0].B.device().is_cpu(), "agl::terms_grouped_fwd (CPU kernel): `Bs[0]` is on ",
                    g.layers[0].B.device());
  project_cpu(g, nullptr);
  const int64_t L = g.size();
  const auto opt = g.layers[0].B.options().dtype(g.out);
  Rows terms(L, kNumTerms, opt), sums(L, kNumSums, opt);
  CpuTaskList tasks;
  for (int64_t l = 0; l < L; ++l)
    dispatch(g.layers[l], [&](auto c) {
      using C = decltype(c);
      using Acc = typename C::acc;
      tasks.push_back(terms_fwd_cpu_task(make_args<typename C::t, typename C::tm, Acc>(g.layers[l]), sums.row<Acc>(l)));
    });
  run_cpu_tasks(tasks);
  for (int64_t l = 0; l < L; ++l)
    dispatch(g.layers[l], [&](auto c) {
      using Acc = typename decltype(c)::acc;
      const Prepared& p = g.layers[l];
      terms_from_sums(sums.row<Acc>(l), static_cast<Acc>(p.m) * static_cast<Acc>(p.n), static_cast<Acc>(p.eps),
                      terms.row<Acc>(l));
    });
  terms.widen(g);
  sums.widen(g);
  return {terms.out, sums.out};
}

Lists grouped_bwd_cpu(const Tensor& grad_terms, const Tensor& sums, TensorList Bs, TensorList As,
                      const OptList& B_aligns, const OptList& A_aligns, const OptList& Us, const OptList& Vs,
                      const OptList& fishers, const OptList& task_metrics, at::ArrayRef<double> scales, double beta,
                      double tau, double sharpness, double eps) {
  Grouped g = prepare_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                              eps);
  const int64_t L = g.size();
  check_rows(grad_terms, L, kNumTerms, "grad_terms", g);
  check_rows(sums, L, kNumSums, "sums", g);
  TORCH_CHECK_VALUE(g.layers[0].B.device().is_cpu(), "agl::terms_grouped_bwd (CPU kernel): `Bs[0]` is on ",
                    g.layers[0].B.device());
  project_cpu(g, nullptr);  // the alignment pairs again (cheaper than keeping them from the forward)
  // The incoming values as float64 once (a per-layer call converts its own row the same way: same bits).
  const Tensor gt = grad_terms.detach().to(at::kDouble).contiguous();
  const Tensor S = sums.detach().to(at::kDouble).contiguous();
  const double* gtp = gt.data_ptr<double>();
  const double* Sp = S.data_ptr<double>();
  std::vector<LayerGrads> grads = alloc_grads(g);
  CpuTaskList tasks;
  for (int64_t l = 0; l < L; ++l)
    dispatch(g.layers[l], [&](auto c) {
      using C = decltype(c);
      using T = typename C::t;
      using Acc = typename C::acc;
      const Prepared& p = g.layers[l];
      Acc gtl[kNumTerms], Sl[kNumSums];
      for (int k = 0; k < kNumTerms; ++k) gtl[k] = static_cast<Acc>(gtp[l * kNumTerms + k]);
      for (int k = 0; k < kNumSums; ++k) Sl[k] = static_cast<Acc>(Sp[l * kNumSums + k]);
      TermsGrads<T, Acc> gr = grads_outputs<T, Acc>(grads[l].kernel);
      grad_sums_from_grad_terms(Sl, gtl, static_cast<Acc>(p.m) * static_cast<Acc>(p.n), static_cast<Acc>(p.eps),
                                gr.gs);
      tasks.push_back(terms_bwd_cpu_task(make_args<T, typename C::tm, Acc>(p), gr));
    });
  run_cpu_tasks(tasks);
  project_cpu(g, &grads);
  return to_lists(grads);
}

// ---------------------------------------------------------------------------------------- do-nothing provider
// Same signature, allocates the outputs (zero-filled, so a training step on them stays finite) and computes nothing:
// what a benchmark of the host path measures as its floor (dispatch, autograd wiring, allocation).
std::tuple<Tensor, Tensor> grouped_null(TensorList Bs, TensorList As, const OptList&, const OptList&, const OptList&,
                                        const OptList&, const OptList&, const OptList&, at::ArrayRef<double>, double,
                                        double, double, double) {
  TORCH_CHECK_VALUE(!Bs.empty(), "agl: `Bs` must hold at least one layer, got an empty list");
  bool dbl = false;
  for (const Tensor& B : Bs) dbl = dbl || B.scalar_type() == at::kDouble;
  const auto opt = Bs[0].options().dtype(dbl ? at::kDouble : at::kFloat);
  const int64_t L = static_cast<int64_t>(Bs.size());
  return {at::zeros({L, kNumTerms}, opt), at::zeros({L, kNumSums}, opt)};
}

Lists grouped_null_bwd(const Tensor&, const Tensor&, TensorList Bs, TensorList As, const OptList& B_aligns,
                       const OptList& A_aligns, const OptList& Us, const OptList& Vs, const OptList&, const OptList&,
                       at::ArrayRef<double>, double, double, double, double) {
  Lists o;
  const bool project = Us.size() > 0 || Vs.size() > 0;
  for (size_t l = 0; l < Bs.size() && l < As.size(); ++l) {
    const optional<Tensor> Ba = entry(B_aligns, l), Aa = entry(A_aligns, l);
    const int64_t ra = (!project && Ba) ? Ba->size(1) : 0;
    std::get<0>(o).push_back(at::zeros_like(Bs[l]));
    std::get<1>(o).push_back(at::zeros_like(As[l]));
    std::get<2>(o).push_back(at::zeros({Bs[l].size(0), ra}, Bs[l].options()));
    std::get<3>(o).push_back(at::zeros({ra, As[l].size(1)}, As[l].options()));
  }
  return o;
}

// --------------------------------------------------------------------------------------------------------- CUDA
#ifdef AGL_WITH_CUDA
void* stream_ptr() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

void project_cuda(Grouped& g) {
  if (!g.project) return;
  for (int64_t l = 0; l < g.size(); ++l) {
    Prepared& p = g.layers[l];
    const Tensor &U = g.U[l], &V = g.V[l];
    p.Ba = U.defined() ? at::mm(U, at::mm(U.t(), p.B)).contiguous() : p.B;
    p.Aa = V.defined() ? at::mm(at::mm(p.A, V), V.t()).contiguous() : p.A;
  }
}

const GroupedCudaOverride* active_override() {
  const GroupedCudaOverride& o = grouped_cuda_override();
  return (cuda_grouped_switch() && o.fwd != nullptr && o.bwd != nullptr) ? &o : nullptr;
}

std::vector<GroupedLayer> override_layers(const Grouped& g) {
  std::vector<GroupedLayer> out(g.layers.size());
  for (size_t l = 0; l < g.layers.size(); ++l) {
    const Prepared& p = g.layers[l];
    out[l].B = p.B;
    out[l].A = p.A;
    if (p.Ba.defined()) {
      out[l].B_align = p.Ba;
      out[l].A_align = p.Aa;
    }
    if (p.F.defined()) out[l].fisher = p.F;
    if (p.H.defined()) out[l].task_metric = p.H;
    out[l].scale = p.scale;
  }
  return out;
}

GroupedParams override_params(const Grouped& g) {
  GroupedParams q;
  q.beta = g.beta;
  q.tau = g.tau;
  q.sharpness = g.sharpness;
  q.eps = g.eps;
  return q;
}

std::tuple<Tensor, Tensor> grouped_fwd_cuda(TensorList Bs, TensorList As, const OptList& B_aligns,
                                            const OptList& A_aligns, const OptList& Us, const OptList& Vs,
                                            const OptList& fishers, const OptList& task_metrics,
                                            at::ArrayRef<double> scales, double beta, double tau, double sharpness,
                                            double eps) {
  TORCH_CHECK_VALUE(!Bs.empty() && Bs[0].is_cuda(), "agl::terms_grouped_fwd (CUDA kernel): `Bs[0]` is not on a CUDA "
                    "device");
  c10::cuda::CUDAGuard guard(Bs[0].device());
  Grouped g = prepare_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                              eps);
  project_cuda(g);
  const int64_t L = g.size();
  const auto opt = g.layers[0].B.options().dtype(g.out);
  Tensor terms = at::empty({L, kNumTerms}, opt), sums = at::empty({L, kNumSums}, opt);
  if (const GroupedCudaOverride* o = active_override())
    if (o->fwd(override_layers(g), override_params(g), terms, sums)) return {terms, sums};
  // The verified per-layer kernels, one layer after the other on the current stream.
  for (int64_t l = 0; l < L; ++l) {
    const Prepared& p = g.layers[l];
    const bool direct = p.acc == g.out;
    Tensor t = direct ? terms.select(0, l) : at::empty({kNumTerms}, p.B.options().dtype(p.acc));
    Tensor s = direct ? sums.select(0, l) : at::empty({kNumSums}, p.B.options().dtype(p.acc));
    dispatch(p, [&](auto c) {
      using C = decltype(c);
      using Acc = typename C::acc;
      auto a = make_args<typename C::t, typename C::tm, Acc>(p);
      const size_t ws = terms_fwd_cuda_workspace(a);
      Tensor work = at::empty({static_cast<int64_t>(ws)}, p.B.options().dtype(at::kByte));
      terms_fwd_cuda(a, static_cast<Acc*>(t.data_ptr()), static_cast<Acc*>(s.data_ptr()),
                     ws ? work.data_ptr() : nullptr, stream_ptr());
    });
    if (!direct) {
      terms.select(0, l).copy_(t);
      sums.select(0, l).copy_(s);
    }
  }
  return {terms, sums};
}

Lists grouped_bwd_cuda(const Tensor& grad_terms, const Tensor& sums, TensorList Bs, TensorList As,
                       const OptList& B_aligns, const OptList& A_aligns, const OptList& Us, const OptList& Vs,
                       const OptList& fishers, const OptList& task_metrics, at::ArrayRef<double> scales, double beta,
                       double tau, double sharpness, double eps) {
  TORCH_CHECK_VALUE(!Bs.empty() && Bs[0].is_cuda(), "agl::terms_grouped_bwd (CUDA kernel): `Bs[0]` is not on a CUDA "
                    "device");
  c10::cuda::CUDAGuard guard(Bs[0].device());
  Grouped g = prepare_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                              eps);
  const int64_t L = g.size();
  check_rows(grad_terms, L, kNumTerms, "grad_terms", g);
  check_rows(sums, L, kNumSums, "sums", g);
  project_cuda(g);
  std::vector<LayerGrads> grads = alloc_grads(g);
  bool done = false;
  if (const GroupedCudaOverride* o = active_override()) {
    std::vector<Tensor> gB, gA, gBa, gAa;
    for (int64_t l = 0; l < L; ++l) {
      const BwdOut& k = grads[l].kernel;
      const bool align = g.layers[l].Ba.defined();
      gB.push_back(k.dB);
      gA.push_back(k.dA);
      gBa.push_back(align ? k.dBa : Tensor());
      gAa.push_back(align ? k.dAa : Tensor());
    }
    done = o->bwd(override_layers(g), override_params(g), grad_terms.detach().to(g.out).contiguous(),
                  sums.detach().to(g.out).contiguous(), gB, gA, gBa, gAa);
  }
  for (int64_t l = 0; l < L && !done; ++l) {
    const Prepared& p = g.layers[l];
    // dL/dterms and the sums stay on the device (converted in stream order): no device->host copy, no sync.
    const Tensor gt_dev = grad_terms.select(0, l).detach().to(p.acc).contiguous();
    const Tensor S_dev = sums.select(0, l).detach().to(p.acc).contiguous();
    dispatch(p, [&](auto c) {
      using C = decltype(c);
      using T = typename C::t;
      using Acc = typename C::acc;
      auto a = make_args<T, typename C::tm, Acc>(p);
      auto gr = grads_outputs<T, Acc>(grads[l].kernel);
      gr.gt_dev = static_cast<const Acc*>(gt_dev.data_ptr());
      gr.S_dev = static_cast<const Acc*>(S_dev.data_ptr());
      const size_t ws = terms_bwd_cuda_workspace(a);
      Tensor work = at::empty({static_cast<int64_t>(ws)}, p.B.options().dtype(at::kByte));
      terms_bwd_cuda(a, gr, ws ? work.data_ptr() : nullptr, stream_ptr());
    });
  }
  if (g.project)
    for (int64_t l = 0; l < L; ++l) {
      BwdOut& k = grads[l].kernel;
      const Tensor &U = g.U[l], &V = g.V[l];
      k.dB.add_(U.defined() ? at::mm(U, at::mm(U.t(), k.dBa)) : k.dBa);
      k.dA.add_(V.defined() ? at::mm(at::mm(k.dAa, V), V.t()) : k.dAa);
    }
  return to_lists(grads);
}
#endif

}  // namespace

#define AGL_GROUPED_INPUTS                                                                                       \
  "Tensor[] Bs, Tensor[] As, Tensor?[] B_aligns, Tensor?[] A_aligns, Tensor?[] Us, Tensor?[] Vs, Tensor?[] fishers, " \
  "Tensor?[] task_metrics, float[] scales, float beta, float tau, float sharpness, float eps"

TORCH_LIBRARY_FRAGMENT(agl, m) {
  m.def("terms_grouped_fwd(" AGL_GROUPED_INPUTS ") -> (Tensor, Tensor)");
  m.def("terms_grouped_bwd(Tensor grad_terms, Tensor sums, " AGL_GROUPED_INPUTS
        ") -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("terms_grouped_null(" AGL_GROUPED_INPUTS ") -> (Tensor, Tensor)");
  m.def("terms_grouped_null_bwd(Tensor grad_terms, Tensor sums, " AGL_GROUPED_INPUTS
        ") -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("set_cuda_grouped(bool enable) -> bool", &set_cuda_grouped);
}

TORCH_LIBRARY_IMPL(agl, CPU, m) {
  m.impl("terms_grouped_fwd", &grouped_fwd_cpu);
  m.impl("terms_grouped_bwd", &grouped_bwd_cpu);
}

TORCH_LIBRARY_IMPL(agl, CompositeExplicitAutograd, m) {
  m.impl("terms_grouped_null", &grouped_null);
  m.impl("terms_grouped_null_bwd", &grouped_null_bwd);
}

#ifdef AGL_WITH_CUDA
TORCH_LIBRARY_IMPL(agl, CUDA, m) {
  m.impl("terms_grouped_fwd", &grouped_fwd_cuda);
  m.impl("terms_grouped_bwd", &grouped_bwd_cuda);
}
#endif

// Read by the Python module (agl._C.cuda_grouped_status): whether the override is switched on, and its name.
std::pair<bool, const char*> cuda_grouped_status() {
  return {cuda_grouped_switch().load(), grouped_cuda_override().name};
}

}  // namespace agl
