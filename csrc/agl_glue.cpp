// The glue's validation and its one launch / workspace / stream path per device (csrc/agl_glue.h). Both ops build a
// Call (one layer for agl::terms_*, L for agl::terms_grouped_*) and run it here.
#include "agl_glue.h"

#include <cmath>
#include <type_traits>
#include <utility>

#include "agl_grouped.h"

#ifdef AGL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace agl {
namespace glue {

namespace {

bool is_factor_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_scalar(double v, const std::string& name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "agl: `", name, "` must be finite, got ", v);
}

// One metric dtype for fisher/task_metric/align_mask: double with double factors; otherwise their shared dtype
// when they all have the same 16/32-bit float dtype, else float32.
at::ScalarType metric_dtype(at::ScalarType factor, const std::vector<at::ScalarType>& mts) {
  if (factor == at::kDouble) return at::kDouble;
  if (mts.empty() || mts[0] == at::kDouble) return at::kFloat;
  for (auto t : mts)
    if (t != mts[0]) return at::kFloat;
  return mts[0];
}

}  // namespace

void check_matrix(const Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name,
                   "` must be float32, float64, bfloat16 or float16, got ", t.scalar_type(), " with shape ",
                   t.sizes());
  TORCH_CHECK_VALUE(t.dim() == 2, "agl: `", name, "` must be a 2-D matrix, got shape ", t.sizes());
}

Names Names::layer(size_t l) {
  const std::string i = "[" + std::to_string(l) + "]";
  Names n;
  for (std::string* s : {&n.B, &n.A, &n.B_align, &n.A_align, &n.fisher, &n.task_metric, &n.align_mask, &n.scale})
    *s += "s" + i;
  return n;
}

void check_params(double beta, double tau, double sharpness, double eps) {
  check_scalar(beta, "beta");
  check_scalar(tau, "tau");
  check_scalar(sharpness, "sharpness");
  TORCH_CHECK_VALUE(sharpness >= 0, "agl: `sharpness` must be >= 0, got ", sharpness);
  check_scalar(eps, "eps");
  TORCH_CHECK_VALUE(eps >= 0, "agl: `eps` must be >= 0, got ", eps);
}

Prepared prepare(const Tensor& B, const Tensor& A, const optional<Tensor>& B_align, const optional<Tensor>& A_align,
                 const optional<Tensor>& fisher, const optional<Tensor>& task_metric,
                 const optional<Tensor>& align_mask, double scale, const Names& nm) {
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
  if (hb) {
    check_matrix(*B_align, nm.B_align);
    check_matrix(*A_align, nm.A_align);
    TORCH_CHECK_VALUE(B_align->size(0) == m && A_align->size(1) == n && B_align->size(1) == A_align->size(0), "agl: `",
                      nm.B_align, "` must be (m, r') and `", nm.A_align, "` (r', n) with m=", m, ", n=", n, "; got ",
                      nm.B_align, " ", B_align->sizes(), ", ", nm.A_align, " ", A_align->sizes());
    TORCH_CHECK_TYPE(B_align->scalar_type() == B.scalar_type() && A_align->scalar_type() == B.scalar_type(), "agl: `",
                     nm.B_align, "` and `", nm.A_align, "` must have the dtype of `", nm.B, "` (", B.scalar_type(),
                     "), got ", B_align->scalar_type(), " and ", A_align->scalar_type());
  }
  const std::pair<const optional<Tensor>*, const std::string*> metrics[] = {
      {&fisher, &nm.fisher}, {&task_metric, &nm.task_metric}, {&align_mask, &nm.align_mask}};
  std::vector<at::ScalarType> mts;
  for (const auto& pm : metrics) {
    if (!given(*pm.first)) continue;
    const Tensor& t = **pm.first;
    check_matrix(t, *pm.second);
    TORCH_CHECK_VALUE(t.size(0) == m && t.size(1) == n, "agl: `", *pm.second, "` must have shape (m, n) = (", m, ", ",
                      n, ") like ", nm.B, " @ ", nm.A, ", got ", t.sizes());
    mts.push_back(t.scalar_type());
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

  Prepared p;
  p.m = m;
  p.n = n;
  p.r = r;
  p.factor = B.scalar_type();
  p.acc = default_metric(p.factor);
  p.metric = metric_dtype(p.factor, mts);
  p.B = B.contiguous();
  p.A = A.contiguous();
  if (hb && B_align->size(1) > 0) {
    p.ra = B_align->size(1);
    p.Ba = B_align->contiguous();
    p.Aa = A_align->contiguous();
  }
  auto metric = [&](const optional<Tensor>& t) { return given(t) ? t->to(p.metric).contiguous() : Tensor(); };
  p.F = metric(fisher);
  p.H = metric(task_metric);
  p.M = metric(align_mask);
  p.scale = scale;
  return p;
}

void Call::params(double b, double t, double k, double e) {
  check_params(b, t, k, e);
  beta = b;
  tau = t;
  sharpness = k;
  eps = e;
}

void Call::add(Prepared p) {
  if (p.factor == at::kDouble) out = at::kDouble;
  layers.push_back(std::move(p));
}

std::vector<int64_t> Call::shape(int64_t width) const {
  if (single) return {width};
  return {size(), width};
}

void check_incoming(const Tensor& t, int64_t width, const char* name, const Call& c) {
  const std::vector<int64_t> want = c.shape(width);
  const std::string dims = c.single ? std::to_string(width) + "," : std::to_string(c.size()) + ", " + std::to_string(width);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), "agl: `", name, "` must have shape (", dims, "), got ", t.sizes());
  TORCH_CHECK_TYPE(is_factor_dtype(t.scalar_type()), "agl: `", name, "` must be a floating-point tensor, got ",
                   t.scalar_type());
  const at::Device dev = c.layers[0].B.device();
  TORCH_CHECK_VALUE(t.device() == dev, "agl: `", name, "` is on ", t.device(), " but `", c.first, "` is on ", dev,
                    "; all tensors must share a device");
}

namespace {

void check_device(const Call& c, bool cuda, const char* pass) {
  const at::Device dev = c.layers[0].B.device();
  TORCH_CHECK_VALUE(cuda ? dev.is_cuda() : dev.is_cpu(), c.op, "_", pass, cuda ? " (CUDA kernel): `" : " (CPU kernel): `",
                    c.first, "` is on ", dev);
}

// Row l of an output or incoming tensor of shape c.shape(width).
Tensor row(const Call& c, const Tensor& t, int64_t l) { return c.single ? t : t.select(0, l); }

std::vector<LayerGrads> alloc_grads(const Call& c) {
  std::vector<LayerGrads> gs(c.layers.size());
  for (size_t l = 0; l < c.layers.size(); ++l) {
    const Prepared& p = c.layers[l];
    auto opt = p.B.options();
    BwdOut& o = gs[l].out;
    o.dB = at::empty({p.m, p.r}, opt);
    o.dA = at::empty({p.r, p.n}, opt);
    const int64_t ra = (!c.project && p.Ba.defined()) ? p.ra : 0;  // projected pairs get no own gradients
    o.dBa = at::empty({p.m, ra}, opt);
    o.dAa = at::empty({ra, p.n}, opt);
    gs[l].kernel = o;
    if (c.project) {
      gs[l].kernel.dBa = at::empty({p.m, p.r}, opt);
      gs[l].kernel.dAa = at::empty({p.r, p.n}, opt);
    }
  }
  return gs;
}

// ---------------------------------------------------------------------------------------------------------- CPU

// Projection mode: B_align / A_align of every layer (fresh tensors, or B / A themselves where U / V is None), one
// task per layer in one parallel region. backward = true: grad_B += U (Uᵀ grad_B_align), grad_A likewise.
void project_cpu(Call& c, std::vector<LayerGrads>* grads) {
  if (!c.project) return;
  CpuTaskList tasks;
  for (int64_t l = 0; l < c.size(); ++l) {
    Prepared& p = c.layers[l];
    const Tensor &U = c.U[l], &V = c.V[l];
    if (grads == nullptr) {
      p.Ba = U.defined() ? at::empty({p.m, p.r}, p.B.options()) : p.B;
      p.Aa = V.defined() ? at::empty({p.r, p.n}, p.A.options()) : p.A;
      if (!U.defined() && !V.defined()) continue;
    }
    dispatch_combo(p.factor, default_metric(p.factor), [&](auto cb) {
      using T = typename decltype(cb)::t;
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

// Layer l's row of an output in its own accumulation type Acc: the row itself when Acc is the output dtype, else (a
// float32 layer in a call with float64 layers) a float32 staging row, widened (exactly) afterwards.
struct Rows {
  Tensor out;
  int64_t width;
  std::vector<float> stage;
  Rows(const Call& c, int64_t w) : out(at::empty(c.shape(w), c.layers[0].B.options().dtype(c.out))), width(w) {
    if (out.scalar_type() == at::kDouble) stage.resize(c.size() * w);
  }
  template <typename Acc>
  Acc* row(int64_t l) {
    if constexpr (std::is_same<Acc, double>::value) {
      return out.data_ptr<double>() + l * width;
    } else {
      return out.scalar_type() == at::kFloat ? out.data_ptr<float>() + l * width : stage.data() + l * width;
    }
  }
  void widen(const Call& c) {
    if (stage.empty()) return;
    double* o = out.data_ptr<double>();
    for (int64_t l = 0; l < c.size(); ++l)
      if (c.layers[l].acc == at::kFloat)
        for (int64_t k = 0; k < width; ++k) o[l * width + k] = static_cast<double>(stage[l * width + k]);
  }
};

template <typename Acc>
Acc grid_size(const Prepared& p) {
  return static_cast<Acc>(p.m) * static_cast<Acc>(p.n);
}

}  // namespace

std::tuple<Tensor, Tensor> fwd_cpu(Call& c) {
  check_device(c, false, "fwd");
  project_cpu(c, nullptr);
  Rows terms(c, kNumTerms), sums(c, kNumSums);
  CpuTaskList tasks;
  for (int64_t l = 0; l < c.size(); ++l)
    dispatch(c.layers[l], [&](auto cb) {
      using C = decltype(cb);
      using Acc = typename C::acc;
      tasks.push_back(terms_fwd_cpu_task(make_args<typename C::t, typename C::tm, Acc>(c.layers[l], c), sums.row<Acc>(l)));
    });
  run_cpu_tasks(tasks);
  for (int64_t l = 0; l < c.size(); ++l)
    dispatch(c.layers[l], [&](auto cb) {
      using Acc = typename decltype(cb)::acc;
      terms_from_sums(sums.row<Acc>(l), grid_size<Acc>(c.layers[l]), static_cast<Acc>(c.eps), terms.row<Acc>(l));
    });
  terms.widen(c);
  sums.widen(c);
  return {terms.out, sums.out};
}

std::vector<LayerGrads> bwd_cpu(Call& c, const Tensor& grad_terms, const Tensor& sums) {
  check_device(c, false, "bwd");
  project_cpu(c, nullptr);  // the alignment pairs again (cheaper than keeping them from the forward)
  // The incoming values as float64 once, then each layer's row in its own Acc.
  const Tensor gt = grad_terms.detach().to(at::kDouble).contiguous();
  const Tensor S = sums.detach().to(at::kDouble).contiguous();
  const double* gtp = gt.data_ptr<double>();
  const double* Sp = S.data_ptr<double>();
  std::vector<LayerGrads> grads = alloc_grads(c);
  CpuTaskList tasks;
  for (int64_t l = 0; l < c.size(); ++l)
    dispatch(c.layers[l], [&](auto cb) {
      using C = decltype(cb);
      using T = typename C::t;
      using Acc = typename C::acc;
      const Prepared& p = c.layers[l];
      Acc gtl[kNumTerms], Sl[kNumSums];
      for (int k = 0; k < kNumTerms; ++k) gtl[k] = static_cast<Acc>(gtp[l * kNumTerms + k]);
      for (int k = 0; k < kNumSums; ++k) Sl[k] = static_cast<Acc>(Sp[l * kNumSums + k]);
      TermsGrads<T, Acc> gr = grads_outputs<T, Acc>(grads[l].kernel);
      grad_sums_from_grad_terms(Sl, gtl, grid_size<Acc>(p), static_cast<Acc>(c.eps), gr.gs);
      tasks.push_back(terms_bwd_cpu_task(make_args<T, typename C::tm, Acc>(p, c), gr));
    });
  run_cpu_tasks(tasks);
  project_cpu(c, &grads);
  return grads;
}

// --------------------------------------------------------------------------------------------------------- CUDA
#ifdef AGL_WITH_CUDA
void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

namespace {

void project_cuda(Call& c) {
  if (!c.project) return;
  for (int64_t l = 0; l < c.size(); ++l) {
    Prepared& p = c.layers[l];
    const Tensor &U = c.U[l], &V = c.V[l];
    p.Ba = U.defined() ? at::mm(U, at::mm(U.t(), p.B)).contiguous() : p.B;
    p.Aa = V.defined() ? at::mm(at::mm(p.A, V), V.t()).contiguous() : p.A;
  }
}

// Uninitialised workspace bytes from the caching allocator (nullptr for none).
struct Workspace {
  Tensor t;
  Workspace(size_t bytes, const Prepared& p) : t(at::empty({static_cast<int64_t>(bytes)}, p.B.options().dtype(at::kByte))) {}
  void* ptr() { return t.numel() ? t.data_ptr() : nullptr; }
};

// The opt-in override (csrc/agl_grouped.h), or nullptr: never for the per-layer op.
const GroupedCudaOverride* override_for(const Call& c) { return c.single ? nullptr : active_grouped_override(); }

std::vector<GroupedLayer> override_layers(const Call& c) {
  std::vector<GroupedLayer> out(c.layers.size());
  for (size_t l = 0; l < c.layers.size(); ++l) {
    const Prepared& p = c.layers[l];
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

GroupedParams override_params(const Call& c) { return GroupedParams{c.beta, c.tau, c.sharpness, c.eps}; }

}  // namespace

std::tuple<Tensor, Tensor> fwd_cuda(Call& c) {
  check_device(c, true, "fwd");
  c10::cuda::CUDAGuard guard(c.layers[0].B.device());
  project_cuda(c);
  const auto opt = c.layers[0].B.options().dtype(c.out);
  Tensor terms = at::empty(c.shape(kNumTerms), opt), sums = at::empty(c.shape(kNumSums), opt);
  if (const GroupedCudaOverride* o = override_for(c))
    if (o->fwd(override_layers(c), override_params(c), terms, sums)) return {terms, sums};
  // The verified per-layer kernels, one layer after the other on the current stream.
  for (int64_t l = 0; l < c.size(); ++l) {
    const Prepared& p = c.layers[l];
    const bool direct = p.acc == c.out;
    Tensor t = direct ? row(c, terms, l) : at::empty({kNumTerms}, p.B.options().dtype(p.acc));
    Tensor s = direct ? row(c, sums, l) : at::empty({kNumSums}, p.B.options().dtype(p.acc));
    dispatch(p, [&](auto cb) {
      using C = decltype(cb);
      using Acc = typename C::acc;
      auto a = make_args<typename C::t, typename C::tm, Acc>(p, c);
      Workspace ws(terms_fwd_cuda_workspace(a), p);
      terms_fwd_cuda(a, static_cast<Acc*>(t.data_ptr()), static_cast<Acc*>(s.data_ptr()), ws.ptr(), current_stream());
    });
    if (!direct) {
      row(c, terms, l).copy_(t);
      row(c, sums, l).copy_(s);
    }
  }
  return {terms, sums};
}

std::vector<LayerGrads> bwd_cuda(Call& c, const Tensor& grad_terms, const Tensor& sums) {
  check_device(c, true, "bwd");
  c10::cuda::CUDAGuard guard(c.layers[0].B.device());
  project_cuda(c);
  std::vector<LayerGrads> grads = alloc_grads(c);
  bool done = false;
  if (const GroupedCudaOverride* o = override_for(c)) {
    std::vector<Tensor> gB, gA, gBa, gAa;
    for (int64_t l = 0; l < c.size(); ++l) {
      const BwdOut& k = grads[l].kernel;
      const bool align = c.layers[l].Ba.defined();
      gB.push_back(k.dB);
      gA.push_back(k.dA);
      gBa.push_back(align ? k.dBa : Tensor());
      gAa.push_back(align ? k.dAa : Tensor());
    }
    done = o->bwd(override_layers(c), override_params(c), grad_terms.detach().to(c.out).contiguous(),
                  sums.detach().to(c.out).contiguous(), gB, gA, gBa, gAa);
  }
  for (int64_t l = 0; l < c.size() && !done; ++l) {
    const Prepared& p = c.layers[l];
    // dL/dterms and the sums stay on the device (converted in stream order): no device->host copy, no sync.
    const Tensor gt_dev = row(c, grad_terms, l).detach().to(p.acc).contiguous();
    const Tensor S_dev = row(c, sums, l).detach().to(p.acc).contiguous();
    dispatch(p, [&](auto cb) {
      using C = decltype(cb);
      using T = typename C::t;
      using Acc = typename C::acc;
      auto a = make_args<T, typename C::tm, Acc>(p, c);
      auto gr = grads_outputs<T, Acc>(grads[l].kernel);
      gr.gt_dev = static_cast<const Acc*>(gt_dev.data_ptr());
      gr.S_dev = static_cast<const Acc*>(S_dev.data_ptr());
      Workspace ws(terms_bwd_cuda_workspace(a), p);
      terms_bwd_cuda(a, gr, ws.ptr(), current_stream());
    });
  }
  if (c.project)
    for (int64_t l = 0; l < c.size(); ++l) {
      BwdOut& k = grads[l].kernel;
      const Tensor &U = c.U[l], &V = c.V[l];
      k.dB.add_(U.defined() ? at::mm(U, at::mm(U.t(), k.dBa)) : k.dBa);
      k.dA.add_(V.defined() ? at::mm(at::mm(k.dAa, V), V.t()) : k.dAa);
    }
  return grads;
}
#endif

}  // namespace glue
}  // namespace agl
