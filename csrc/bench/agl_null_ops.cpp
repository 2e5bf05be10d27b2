// Benchmark / test build only (setup.py with AGL_BENCH_OPS=1; `make build` sets it): the grouped op's do-nothing
// twin in its own namespace, agl_bench::terms_grouped_null / terms_grouped_null_bwd. Same signature as
// agl::terms_grouped_fwd / _bwd; allocates the outputs (zero-filled, so a training step on them stays finite) and
// computes nothing: what a benchmark of the host path measures as its floor (dispatch, autograd wiring, allocation).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "agl_grouped.h"
#include "agl_math.h"

namespace {

using at::Tensor;
using at::TensorList;
using OptList = c10::List<std::optional<Tensor>>;
using Lists = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

std::tuple<Tensor, Tensor> grouped_null(TensorList Bs, TensorList, const OptList&, const OptList&, const OptList&,
                                        const OptList&, const OptList&, const OptList&, at::ArrayRef<double>, double,
                                        double, double, double) {
  TORCH_CHECK_VALUE(!Bs.empty(), "agl: `Bs` must hold at least one layer, got an empty list");
  bool dbl = false;
  for (const Tensor& B : Bs) dbl = dbl || B.scalar_type() == at::kDouble;
  const auto opt = Bs[0].options().dtype(dbl ? at::kDouble : at::kFloat);
  const int64_t L = static_cast<int64_t>(Bs.size());
  return {at::zeros({L, agl::kNumTerms}, opt), at::zeros({L, agl::kNumSums}, opt)};
}

Lists grouped_null_bwd(const Tensor&, const Tensor&, TensorList Bs, TensorList As, const OptList& B_aligns,
                       const OptList&, const OptList& Us, const OptList& Vs, const OptList&, const OptList&,
                       at::ArrayRef<double>, double, double, double, double) {
  Lists o;
  const bool project = Us.size() > 0 || Vs.size() > 0;
  for (size_t l = 0; l < Bs.size() && l < As.size(); ++l) {
    const std::optional<Tensor> Ba = B_aligns.size() ? B_aligns.get(l) : std::nullopt;
    const int64_t ra = (!project && Ba && Ba->defined()) ? Ba->size(1) : 0;
    std::get<0>(o).push_back(at::zeros_like(Bs[l]));
    std::get<1>(o).push_back(at::zeros_like(As[l]));
    std::get<2>(o).push_back(at::zeros({Bs[l].size(0), ra}, Bs[l].options()));
    std::get<3>(o).push_back(at::zeros({ra, As[l].size(1)}, As[l].options()));
  }
  return o;
}

}  // namespace

TORCH_LIBRARY(agl_bench, m) {
  m.def("terms_grouped_null(" AGL_GROUPED_INPUTS ") -> (Tensor, Tensor)");
  m.def("terms_grouped_null_bwd(Tensor grad_terms, Tensor sums, " AGL_GROUPED_INPUTS
        ") -> (Tensor[], Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(agl_bench, CompositeExplicitAutograd, m) {
  m.impl("terms_grouped_null", &grouped_null);
  m.impl("terms_grouped_null_bwd", &grouped_null_bwd);
}
