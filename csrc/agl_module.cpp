// The Python module agl._C (pybind11): importing it runs the static op registrations of csrc/*.cpp. Its functions are
// plain module functions: whether the CUDA kernels are compiled in, and the switch and status of the opt-in
// single-launch CUDA implementation of the grouped op, whose registry (csrc/agl_grouped.h) lives here too.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "agl_grouped.h"

namespace py = pybind11;

namespace agl {
namespace {

// The opt-in switch: AGL_CUDA_GROUPED=1 at load time, or set_cuda_grouped.
std::atomic<bool>& cuda_grouped_switch() {
  static std::atomic<bool> on{std::getenv("AGL_CUDA_GROUPED") != nullptr &&
                              std::string(std::getenv("AGL_CUDA_GROUPED")) == "1"};
  return on;
}

bool registered(const GroupedCudaOverride& o) { return o.fwd != nullptr && o.bwd != nullptr; }

}  // namespace

GroupedCudaOverride& grouped_cuda_override() {
  static GroupedCudaOverride o;
  return o;
}

const GroupedCudaOverride* active_grouped_override() {
  const GroupedCudaOverride& o = grouped_cuda_override();
  return (cuda_grouped_switch() && registered(o)) ? &o : nullptr;
}

}  // namespace agl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "agl's compiled kernels: importing registers torch.ops.agl.terms_* (per layer and grouped).";
  m.def(
      "with_cuda",
      [] {
#ifdef AGL_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when this build compiled the CUDA kernels of agl::terms_*.");
  m.def(
      "set_cuda_grouped",
      [](bool enable) {
        agl::cuda_grouped_switch() = enable;
        return agl::active_grouped_override() != nullptr;
      },
      py::arg("enable"),
      "Switch the opt-in single-launch CUDA implementation of agl::terms_grouped_* on or off; returns whether it is "
      "now in use (switched on and compiled into this build).");
  m.def(
      "cuda_grouped_status",
      [] {
        const char* name = agl::grouped_cuda_override().name;
        return std::make_pair(agl::cuda_grouped_switch().load(),
                              name ? std::optional<std::string>(name) : std::optional<std::string>());
      },
      "(enabled, name) of the opt-in single-launch CUDA implementation of agl::terms_grouped_* (name None when none "
      "is registered in this build).");
}
