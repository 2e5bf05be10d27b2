// Torch side of the grouped CUDA kernels (agl_cuda_grouped.cu): implements GroupedFwdFn / GroupedBwdFn of
// csrc/agl_grouped.h and registers them, at static initialisation, as the opt-in override of the grouped op. The glue
// in csrc/agl_ops.cpp has already validated the layers, made them contiguous, applied the U/V projections and
// allocated the outputs; it calls these only when the switch is on (AGL_CUDA_GROUPED=1 or agl.ops.set_cuda_grouped).
//
// An override may decline (return false) and the glue then runs the verified per-layer kernels. These decline:
//   * mixed factor dtypes, or mixed fisher/task_metric dtypes, across the layers (one launch = one instantiation);
//   * a (factor, metric) dtype pair outside AGL_FOR_EACH_TERMS_COMBO, or an output dtype that is not the
//     accumulation type (float64 factors -> float64 terms, otherwise float32);
//   * a rank above grouped_max_rank (the factor tiles live in shared memory whole);
//   * anything not contiguous or not on the device of the first layer.
// The layer table travels to the device as kernel parameters of tiny copy kernels (grouped_upload_table): no host
// synchronisation, and CUDA-graph capture records it by value (a pinned staging buffer would be re-read at replay).
#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

#include "agl_grouped.h"
#include "agl_grouped_kernels.h"
#include "agl_kernels.h"

namespace agl {
namespace {

using at::Tensor;

// Calls fn(T{}, TM{}, Acc{}) for the instantiated combination (t, tm); false when there is none.
template <typename Fn>
bool dispatch_types(at::ScalarType t, at::ScalarType tm, Fn&& fn) {
#define AGL_GROUPED_CASE(T, TM, ACC)                                                                            \
  if (t == c10::CppTypeToScalarType<T>::value && tm == c10::CppTypeToScalarType<TM>::value) return fn(T{}, TM{}, ACC{});
  AGL_FOR_EACH_TERMS_COMBO(AGL_GROUPED_CASE)
#undef AGL_GROUPED_CASE
  return false;
}

bool usable(const Tensor& x, const at::Device& dev, at::ScalarType dtype) {
  return x.defined() && x.device() == dev && x.scalar_type() == dtype && x.is_contiguous();
}

// The common factor dtype and metric dtype of the call, or false when the layers mix them.
bool call_dtypes(const std::vector<GroupedLayer>& layers, at::ScalarType& t, at::ScalarType& tm) {
  t = layers[0].B.scalar_type();
  bool have_tm = false;
  for (const GroupedLayer& l : layers) {
    if (l.B.scalar_type() != t || l.A.scalar_type() != t) return false;
    if (l.B_align && (l.B_align->scalar_type() != t || !l.A_align || l.A_align->scalar_type() != t)) return false;
    for (const auto* mt : {&l.fisher, &l.task_metric}) {
      if (!*mt) continue;
      if (!have_tm) tm = (*mt)->scalar_type(), have_tm = true;
      if ((*mt)->scalar_type() != tm) return false;
    }
  }
  if (!have_tm) tm = t == at::kDouble ? at::kDouble : at::kFloat;  // no metrics at all: any valid pairing
  return true;
}

// The host layer table, or false when a layer is outside what the kernels take. grads: backward outputs or nullptr.
template <typename T, typename TM, typename Acc>
bool make_table(const std::vector<GroupedLayer>& layers, std::vector<GroupedLayerDesc<T, TM, Acc>>& table,
                std::vector<Tensor>* gB, std::vector<Tensor>* gA, std::vector<Tensor>* gBa, std::vector<Tensor>* gAa) {
  const at::Device dev = layers[0].B.device();
  const at::ScalarType t = c10::CppTypeToScalarType<T>::value, tm = c10::CppTypeToScalarType<TM>::value;
  table.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const GroupedLayer& l = layers[i];
    GroupedLayerDesc<T, TM, Acc>& d = table[i];
    if (!usable(l.B, dev, t) || !usable(l.A, dev, t)) return false;
    d.m = l.B.size(0), d.r = l.B.size(1), d.n = l.A.size(1);
    d.B = static_cast<const T*>(l.B.data_ptr()), d.A = static_cast<const T*>(l.A.data_ptr());
    if (l.B_align && l.B_align->defined()) {
      if (!usable(*l.B_align, dev, t) || !l.A_align || !usable(*l.A_align, dev, t)) return false;
      d.ra = l.B_align->size(1);
      if (d.ra > 0) d.Ba = static_cast<const T*>(l.B_align->data_ptr()), d.Aa = static_cast<const T*>(l.A_align->data_ptr());
    }
    if (std::max(d.r, d.ra) > grouped_max_rank(sizeof(Acc))) return false;
    if (l.fisher && l.fisher->defined()) {
      if (!usable(*l.fisher, dev, tm)) return false;
      d.F = static_cast<const TM*>(l.fisher->data_ptr());
    }
    if (l.task_metric && l.task_metric->defined()) {
      if (!usable(*l.task_metric, dev, tm)) return false;
      d.H = static_cast<const TM*>(l.task_metric->data_ptr());
    }
    d.scale = static_cast<Acc>(l.scale);
    if (gB != nullptr) {
      if (!usable((*gB)[i], dev, t) || !usable((*gA)[i], dev, t)) return false;
      d.dB = static_cast<T*>((*gB)[i].data_ptr()), d.dA = static_cast<T*>((*gA)[i].data_ptr());
      if (d.Ba != nullptr) {
        if (!usable((*gBa)[i], dev, t) || !usable((*gAa)[i], dev, t)) return false;
        d.dBa = static_cast<T*>((*gBa)[i].data_ptr()), d.dAa = static_cast<T*>((*gAa)[i].data_ptr());
      } else if (d.ra > 0) {
        return false;  // unreachable: ra > 0 always comes with Ba
      }
    }
  }
  return true;
}

void* stream_ptr() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// The table in device memory (caching allocator: graph-private under capture), filled on the current stream.
template <typename Desc>
Tensor upload_table(const std::vector<Desc>& table, const at::Device& dev) {
  const size_t bytes = table.size() * sizeof(Desc);
  Tensor out = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().device(dev).dtype(at::kByte));
  grouped_upload_table(table.data(), bytes, out.data_ptr(), stream_ptr());
  return out;
}

template <typename Acc>
EtaParams<Acc> eta_of(const GroupedParams& p) {
  return EtaParams<Acc>{static_cast<Acc>(p.beta), static_cast<Acc>(p.tau), static_cast<Acc>(p.sharpness)};
}

bool grouped_tc_fwd(const std::vector<GroupedLayer>& layers, const GroupedParams& p, Tensor& terms, Tensor& sums) {
  if (layers.empty()) return false;
  at::ScalarType t, tm;
  if (!call_dtypes(layers, t, tm)) return false;
  return dispatch_types(t, tm, [&](auto t0, auto tm0, auto acc0) {
    using T = decltype(t0);
    using TM = decltype(tm0);
    using Acc = decltype(acc0);
    const at::Device dev = layers[0].B.device();
    const at::ScalarType acc = c10::CppTypeToScalarType<Acc>::value;
    if (!usable(terms, dev, acc) || !usable(sums, dev, acc)) return false;
    std::vector<GroupedLayerDesc<T, TM, Acc>> table;
    if (!make_table(layers, table, nullptr, nullptr, nullptr, nullptr)) return false;
    const GroupedTotals tot = grouped_plan(table);
    Tensor ws = at::empty({std::max<int64_t>(tot.ws_fwd, 1)}, terms.options());
    Tensor dev_table = upload_table(table, dev);
    grouped_terms_fwd_cuda<T, TM, Acc>(static_cast<const GroupedLayerDesc<T, TM, Acc>*>(dev_table.data_ptr()),
                                       static_cast<int64_t>(table.size()), tot, eta_of<Acc>(p),
                                       static_cast<Acc>(p.eps), terms.data_ptr<Acc>(), sums.data_ptr<Acc>(),
                                       ws.data_ptr<Acc>(), stream_ptr());
    return true;
  });
}

bool grouped_tc_bwd(const std::vector<GroupedLayer>& layers, const GroupedParams& p, const Tensor& grad_terms,
                    const Tensor& sums, std::vector<Tensor>& grad_B, std::vector<Tensor>& grad_A,
                    std::vector<Tensor>& grad_B_align, std::vector<Tensor>& grad_A_align) {
  if (layers.empty()) return false;
  at::ScalarType t, tm;
  if (!call_dtypes(layers, t, tm)) return false;
  return dispatch_types(t, tm, [&](auto t0, auto tm0, auto acc0) {
    using T = decltype(t0);
    using TM = decltype(tm0);
    using Acc = decltype(acc0);
    const at::Device dev = layers[0].B.device();
    const at::ScalarType acc = c10::CppTypeToScalarType<Acc>::value;
    if (grad_terms.device() != dev || sums.device() != dev) return false;
    std::vector<GroupedLayerDesc<T, TM, Acc>> table;
    if (!make_table(layers, table, &grad_B, &grad_A, &grad_B_align, &grad_A_align)) return false;
    const GroupedTotals tot = grouped_plan(table);
    // dtype/stride conversions stay on the device (no sync).
    const Tensor gt = grad_terms.to(acc).contiguous(), s = sums.to(acc).contiguous();
    Tensor ws = at::empty({std::max<int64_t>(tot.ws_bwd, 1)}, gt.options());
    Tensor dev_table = upload_table(table, dev);
    grouped_terms_bwd_cuda<T, TM, Acc>(static_cast<const GroupedLayerDesc<T, TM, Acc>*>(dev_table.data_ptr()),
                                       static_cast<int64_t>(table.size()), tot, eta_of<Acc>(p),
                                       static_cast<Acc>(p.eps), gt.data_ptr<Acc>(), s.data_ptr<Acc>(),
                                       ws.data_ptr<Acc>(), stream_ptr());
    return true;
  });
}

// Registration: the glue uses it only while the opt-in switch is on.
[[maybe_unused]] const bool kRegistered = (grouped_cuda_override() = GroupedCudaOverride{&grouped_tc_fwd, &grouped_tc_bwd, "grouped-tc"},
                          true);

}  // namespace
}  // namespace agl
