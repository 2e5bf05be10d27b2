// Plain-struct interface between the torch glue (csrc/*.cpp) and the kernels (csrc/cpu/*.cpp, csrc/cuda/*.cu).
// No torch headers: the glue validates, makes tensors contiguous, allocates outputs and workspace, then calls these.
//
// Template parameters: T = factor dtype (float, double, c10::Half, c10::BFloat16), TM = metric dtype of
// fisher/task_metric/align_mask (double only with T = double; otherwise float, c10::Half or c10::BFloat16),
// Acc = accumulation type (double for T = double, float otherwise).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "agl_math.h"

// The (T, TM, Acc) combinations the glue dispatches to, listed once. Kernel files instantiate their launchers with
//   #define AGL_INST(T, TM, Acc) template void terms_fwd_cpu<T, TM, Acc>(...); ...
//   AGL_FOR_EACH_TERMS_COMBO(AGL_INST)
// (c10::Half / c10::BFloat16 must be declared where the macro is expanded: include c10/util/Half.h, BFloat16.h.)
#define AGL_FOR_EACH_TERMS_COMBO(X)                                                                     \
  X(double, double, double)                                                                          \
  X(float, float, float) X(float, c10::Half, float) X(float, c10::BFloat16, float)                    \
  X(c10::Half, float, float) X(c10::Half, c10::Half, float) X(c10::Half, c10::BFloat16, float)        \
  X(c10::BFloat16, float, float) X(c10::BFloat16, c10::Half, float) X(c10::BFloat16, c10::BFloat16, float)

namespace agl {

template <typename T, typename TM, typename Acc>
struct TermsArgs {
  int64_t m = 0, n = 0;  // grid: D is m x n
  int64_t r = 0;         // rank of (B, A)
  int64_t ra = 0;        // rank of (B_align, A_align); 0 when absent or in mask mode
  const T* B = nullptr;   // (m, r) row-major contiguous
  const T* A = nullptr;   // (r, n)
  const T* Ba = nullptr;  // (m, ra) or nullptr
  const T* Aa = nullptr;  // (ra, n) or nullptr
  const TM* F = nullptr;  // fisher (m, n) or nullptr (then G = 1)
  const TM* H = nullptr;  // task_metric (m, n) or nullptr (then H = 1)
  const TM* M = nullptr;  // align_mask (m, n) or nullptr; when set, D_A = M * D and Ba/Aa are nullptr
  Acc scale = 1;
  Acc eps = 0;  // the geodesic term's denominator guard (terms_from_sums)
  EtaParams<Acc> eta{};
};

// The incoming gradients (input of the backward) and the outputs of the backward.
// The CPU kernel reads gs, the gradients w.r.t. the five sums, as host values (the glue forms them from the
// gradients w.r.t. the terms with grad_sums_from_grad_terms). The CUDA kernels read only gt_dev (kNumTerms Acc,
// dL/dterms) and S_dev (kNumSums Acc, the forward's sums), both in device memory, and form gs on the device, so the
// backward needs no device->host copy and no sync.
template <typename T, typename Acc>
struct TermsGrads {
  Acc gs[kNumSums] = {0, 0, 0, 0, 0};
  const Acc* gt_dev = nullptr;  // device, kNumTerms; CUDA only
  const Acc* S_dev = nullptr;   // device, kNumSums; CUDA only
  T* dB = nullptr;   // (m, r)
  T* dA = nullptr;   // (r, n)
  T* dBa = nullptr;  // (m, ra) or nullptr
  T* dAa = nullptr;  // (ra, n) or nullptr
};

// ---- CPU (csrc/cpu/agl_cpu.cpp): deterministic, independent of the thread count and of the grouping. ----
// One layer's share of a pass is a CpuTask cut into independent row chunks (a chunk plan that depends on m only).
// run_cpu_tasks runs every (task, chunk) of all the layers of a call in one parallel region, then every
// (task, column block) of the chunk-ordered reductions in a second one, then finish() task by task. A task's
// arithmetic depends on its own layer only, so each layer's results are bitwise the same alone or grouped, with any
// number of threads. (Layers whose per-chunk partials exceed a scratch budget together run in consecutive waves.)
struct CpuTask {
  virtual ~CpuTask() = default;
  int64_t chunks = 0;        // independent work items of the first pass
  int64_t work = 0;          // elements touched (~ m * n): whether the call is worth a parallel region
  size_t scratch_bytes = 0;  // per-chunk partials; run_cpu_tasks provides them through bind() before the passes
  int64_t reduce_cols = 0;   // columns of the second pass (0: no second pass)
  int64_t reduce_rows = 0;   // additions per column in the second pass (sizes its column blocks)
  virtual void bind(void* /*scratch*/) {}
  virtual void run_chunk(int64_t c) = 0;             // chunks in any order, concurrently
  virtual void reduce(int64_t /*j0*/, int64_t /*j1*/) {}  // column blocks in any order, concurrently
  virtual void finish() {}                           // serial, after both passes
};
using CpuTaskList = std::vector<std::unique_ptr<CpuTask>>;
void run_cpu_tasks(const CpuTaskList& tasks);

template <typename T, typename TM, typename Acc>
std::unique_ptr<CpuTask> terms_fwd_cpu_task(const TermsArgs<T, TM, Acc>& a, Acc* sums /* kNumSums */);
template <typename T, typename TM, typename Acc>
std::unique_ptr<CpuTask> terms_bwd_cpu_task(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g);

// One layer: terms_*_cpu_task run on its own.
template <typename T, typename TM, typename Acc>
void terms_fwd_cpu(const TermsArgs<T, TM, Acc>& a, Acc* sums /* kNumSums */);
template <typename T, typename TM, typename Acc>
void terms_bwd_cpu(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g);

// The U/V projections of the grouped op, and their adjoint in the backward (the same maps: P = U Uᵀ is symmetric,
// and so is X -> (X V) Vᵀ):   Y_B (= or +=) U (Uᵀ X_B)   (X_B itself when U is absent)    (m x r)
//                             Y_A (= or +=) (X_A V) Vᵀ   (X_A itself when V is absent)    (r x n)
// Forward: X = (B, A), Y = (B_align, A_align). Backward: X = (dB_align, dA_align), Y = (dB, dA), accumulate.
// Computed in Acc (float32, float64 for double), each output element rounded to T once.
template <typename T>
struct ProjArgs {
  int64_t m = 0, n = 0, r = 0, ku = 0, kv = 0;
  const T* U = nullptr;    // (m, ku) or nullptr (identity)
  const T* V = nullptr;    // (n, kv) or nullptr (identity)
  const T* X_B = nullptr;  // (m, r)
  const T* X_A = nullptr;  // (r, n)
  T* Y_B = nullptr;        // (m, r) or nullptr (skip)
  T* Y_A = nullptr;        // (r, n) or nullptr (skip)
  bool accumulate = false;
};
template <typename T>
std::unique_ptr<CpuTask> project_cpu_task(const ProjArgs<T>& p);

// ---- CUDA (csrc/cuda/agl_cuda.cu): deterministic two-stage reductions. ----
// The glue asks for the workspace size, allocates it with the torch caching allocator (uninitialised bytes),
// and passes the current stream as an opaque pointer (cudaStream_t).
template <typename T, typename TM, typename Acc>
size_t terms_fwd_cuda_workspace(const TermsArgs<T, TM, Acc>& a);
template <typename T, typename TM, typename Acc>
void terms_fwd_cuda(const TermsArgs<T, TM, Acc>& a, Acc* terms /* device, kNumTerms */, Acc* sums /* device, kNumSums */,
                    void* workspace, void* stream);
template <typename T, typename TM, typename Acc>
size_t terms_bwd_cuda_workspace(const TermsArgs<T, TM, Acc>& a);
template <typename T, typename TM, typename Acc>
void terms_bwd_cuda(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g, void* workspace, void* stream);

}  // namespace agl
