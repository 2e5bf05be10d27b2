// Torch side of the grouped CUDA kernels (agl_cuda_grouped.cu): implements GroupedFwdFn / GroupedBwdFn of
// csrc/agl_grouped.h and registers them, at static initialisation, as the opt-in override of the grouped op. The glue
// (csrc/agl_glue.cpp) has already validated the layers, made them contiguous and put them on one device, converted
// the metrics, applied the U/V projections and allocated the outputs in the call's accumulation dtype; it calls
// these only when the switch is on (AGL_CUDA_GROUPED=1 or agl.ops.set_cuda_grouped).
//
// An override may decline (return false) and the glue then runs the verified per-layer kernels. These decline:
//   * mixed factor dtypes, or mixed fisher/task_metric dtypes, across the layers (one launch = one instantiation);
//   * a (factor, metric) dtype pair outside AGL_FOR_EACH_TERMS_COMBO;
//   * a rank above grouped_max_rank (the factor tiles live in shared memory whole).
// The layer table travels to the device as kernel parameters of tiny copy kernels (grouped_upload_table): no host
// synchronisation, and CUDA-graph capture records it by value (a pinned staging buffer would be re-read at replay).
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "agl_glue.h"
#include "agl_grouped.h"
#include "agl_grouped_kernels.h"

namespace agl {
namespace {

using at::Tensor;
using glue::current_stream;

template <typename X>
const X* ptr(const std::optional<Tensor>& t) {
  return t ? static_cast<const X*>(t->data_ptr()) : nullptr;
}

// The common factor dtype and metric dtype of the call, or false when the layers mix them.
bool call_dtypes(const std::vector<GroupedLayer>& layers, at::ScalarType& t, at::ScalarType& tm) {
  t = layers[0].B.scalar_type();
  bool have_tm = false;
  for (const GroupedLayer& l : layers) {
    if (l.B.scalar_type() != t) return false;
    for (const auto* mt : {&l.fisher, &l.task_metric}) {
      if (!*mt) continue;
      if (!have_tm) tm = (*mt)->scalar_type(), have_tm = true;
      if ((*mt)->scalar_type() != tm) return false;
    }
  }
  if (!have_tm) tm = glue::default_metric(t);  // no metrics at all: any valid pairing
  return true;
}

// The host layer table, or false when a layer's rank is above what the kernels take. grads: backward outputs or
// nullptr (the glue allocated them contiguous, in the factor dtype, undefined align grads for layers without a pair).
template <typename T, typename TM, typename Acc>
bool make_table(const std::vector<GroupedLayer>& layers, std::vector<GroupedLayerDesc<T, TM, Acc>>& table,
                std::vector<Tensor>* gB, std::vector<Tensor>* gA, std::vector<Tensor>* gBa, std::vector<Tensor>* gAa) {
  table.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const GroupedLayer& l = layers[i];
    GroupedLayerDesc<T, TM, Acc>& d = table[i];
    d.m = l.B.size(0), d.r = l.B.size(1), d.n = l.A.size(1);
    d.B = static_cast<const T*>(l.B.data_ptr()), d.A = static_cast<const T*>(l.A.data_ptr());
    if (l.B_align) d.ra = l.B_align->size(1);
    if (d.ra > 0) d.Ba = ptr<T>(l.B_align), d.Aa = ptr<T>(l.A_align);  // (m, 0) x (0, n): no pair
    if (std::max(d.r, d.ra) > grouped_max_rank(sizeof(Acc))) return false;
    d.F = ptr<TM>(l.fisher), d.H = ptr<TM>(l.task_metric);
    d.scale = static_cast<Acc>(l.scale);
    if (gB == nullptr) continue;
    d.dB = static_cast<T*>((*gB)[i].data_ptr()), d.dA = static_cast<T*>((*gA)[i].data_ptr());
    if (d.Ba != nullptr) d.dBa = static_cast<T*>((*gBa)[i].data_ptr()), d.dAa = static_cast<T*>((*gAa)[i].data_ptr());
  }
  return true;
}

// The table in device memory (caching allocator: graph-private under capture), filled on the current stream.
template <typename Desc>
Tensor upload_table(const std::vector<Desc>& table, const at::Device& dev) {
  const size_t bytes = table.size() * sizeof(Desc);
  Tensor out = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().device(dev).dtype(at::kByte));
  grouped_upload_table(table.data(), bytes, out.data_ptr(), current_stream());
  return out;
}

template <typename Acc>
EtaParams<Acc> eta_of(const GroupedParams& p) {
  return EtaParams<Acc>{static_cast<Acc>(p.beta), static_cast<Acc>(p.tau), static_cast<Acc>(p.sharpness)};
}

// Builds the call's table for its common dtypes, uploads it and calls launch(Combo, device table, L, totals);
// false when the call is declined.
template <typename Launch>
bool with_table(const std::vector<GroupedLayer>& layers, std::vector<Tensor>* gB, std::vector<Tensor>* gA,
                std::vector<Tensor>* gBa, std::vector<Tensor>* gAa, Launch&& launch) {
  at::ScalarType t, tm;
  if (layers.empty() || !call_dtypes(layers, t, tm)) return false;
  bool done = false;
  glue::dispatch_combo(t, tm, [&](auto c) {
    using Desc = GroupedLayerDesc<typename decltype(c)::t, typename decltype(c)::tm, typename decltype(c)::acc>;
    std::vector<Desc> table;
    if (!make_table(layers, table, gB, gA, gBa, gAa)) return;
    const GroupedTotals tot = grouped_plan(table);
    const Tensor dev_table = upload_table(table, layers[0].B.device());
    launch(c, static_cast<const Desc*>(dev_table.data_ptr()), static_cast<int64_t>(table.size()), tot);
    done = true;
  });
  return done;
}

bool grouped_tc_fwd(const std::vector<GroupedLayer>& layers, const GroupedParams& p, Tensor& terms, Tensor& sums) {
  return with_table(layers, nullptr, nullptr, nullptr, nullptr, [&](auto c, auto* table, int64_t L, const auto& tot) {
    using Acc = typename decltype(c)::acc;
    Tensor ws = at::empty({std::max<int64_t>(tot.ws_fwd, 1)}, terms.options());
    grouped_terms_fwd_cuda(table, L, tot, eta_of<Acc>(p), static_cast<Acc>(p.eps), terms.data_ptr<Acc>(),
                           sums.data_ptr<Acc>(), ws.data_ptr<Acc>(), current_stream());
  });
}

bool grouped_tc_bwd(const std::vector<GroupedLayer>& layers, const GroupedParams& p, const Tensor& grad_terms,
                    const Tensor& sums, std::vector<Tensor>& grad_B, std::vector<Tensor>& grad_A,
                    std::vector<Tensor>& grad_B_align, std::vector<Tensor>& grad_A_align) {
  return with_table(layers, &grad_B, &grad_A, &grad_B_align, &grad_A_align,
                    [&](auto c, auto* table, int64_t L, const auto& tot) {
                      using Acc = typename decltype(c)::acc;
                      const at::ScalarType acc = c10::CppTypeToScalarType<Acc>::value;
                      // dtype/stride conversions stay on the device (no sync).
                      const Tensor gt = grad_terms.to(acc).contiguous(), s = sums.to(acc).contiguous();
                      Tensor ws = at::empty({std::max<int64_t>(tot.ws_bwd, 1)}, gt.options());
                      grouped_terms_bwd_cuda(table, L, tot, eta_of<Acc>(p), static_cast<Acc>(p.eps),
                                             gt.data_ptr<Acc>(), s.data_ptr<Acc>(), ws.data_ptr<Acc>(),
                                             current_stream());
                    });
}

// Registration: the glue uses it only while the opt-in switch is on.
[[maybe_unused]] const bool kRegistered = (grouped_cuda_override() = GroupedCudaOverride{&grouped_tc_fwd, &grouped_tc_bwd, "grouped-tc"},
                          true);

}  // namespace
}  // namespace agl
