// CPU kernels of the fused AGL op (see csrc/agl_kernels.h for the interface, csrc/agl_math.h for the element math).
//
// Layout of the work: the m rows of a layer are cut into a FIXED number of row chunks (a function of m only, never
// of the thread count); the chunks of every layer of a call are the work items of one parallel region, each chunk is
// processed row by row in a fixed order, and each layer's per-chunk partial results are reduced in chunk order.
// Results are therefore bitwise identical whatever the number of threads, and whether a layer runs alone or grouped.
//
// Per row i the kernel rebuilds D[i,:] = s * B[i,:] @ A and D_A[i,:] (from B_align/A_align, or M[i,:] * D[i,:]) into
// small per-chunk row buffers (O(n)), evaluates the sigmoids of the row in one loop and the rest of the element
// math in a second loop written so GCC auto-vectorises it (contiguous loops over j, lane-wise partial sums instead
// of a scalar reduction, which would need -ffast-math to vectorise). Nothing of size m x n is ever allocated.
//
// Backward, per row: P[j] = dL/dD[i,j] (+ M * dL/dD_A in mask mode), Q[j] = dL/dD_A[i,j] (agl::element_grads);
//   grad_B[i,k]  = s * sum_j P[j] A[k,j]          (row-local, lane-wise dot products)
//   grad_A[k,:] += s * B[i,k] * P                 (into a per-chunk r x n partial, 4 rows per update, reduced in
//                                                  chunk order)
// and the same with Q for B_align/A_align. Extra memory: O(chunks * (r + ra) * n + threads * n + (r + ra) * n).
// The float sigmoid uses a vectorisable exp (exp_f32 in agl_cpu_impl.inc, ~1.3 ulp) instead of libm's expf; the
// rest of the element arithmetic is agl_math.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "agl_kernels.h"

namespace agl {

// The kernel body is compiled twice: for the baseline x86-64 ISA and, on x86-64, for AVX2+FMA (picked at run time
// when the CPU has it). Each copy is deterministic on its own; the AVX2 copy uses fused multiply-adds, so its
// results may differ in the last bits from the baseline copy's (a machine always runs the same copy).
namespace cpu_base {
#include "agl_cpu_impl.inc"
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AGL_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "agl_cpu_impl.inc"
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

namespace {
bool use_avx2() {
#ifdef AGL_CPU_AVX2
  // AGL_CPU_BASELINE=1 forces the baseline copy (the tests use it to exercise that copy on AVX2 machines too).
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("AGL_CPU_BASELINE") && std::getenv("AGL_CPU_BASELINE")[0] == '1');
  return ok;
#else
  return false;
#endif
}

// ---- The scheduler: (task, chunk) items, then (task, column block) items, each pass one parallel region. ----

// Below this many elements in a whole call everything runs on the calling thread: waking the thread pool costs more
// than it saves on a ~1 ms call, and when the cores are oversubscribed a parallel region can wait milliseconds for a
// descheduled worker (measured on a loaded 2-core machine: 192 x 576 rank 8 went from 0.35 to 3.7 ms forward). Only
// the scheduling changes: the chunks, and so the results, are the same either way.
constexpr int64_t kParallelMinElems = int64_t(1) << 20;
// Per-chunk partials of the layers of one wave, kept by the calling thread from call to call up to this size (a fresh
// allocation of a few MB is mmap'ed and page-faulted in on every call, as costly as the kernels on small layers).
constexpr size_t kWaveScratchBytes = size_t(32) << 20;
constexpr size_t kScratchAlign = 64;

char* wave_scratch(size_t bytes, std::unique_ptr<char[]>& fresh) {
  if (bytes > kWaveScratchBytes) {
    fresh.reset(new char[bytes]);
    return fresh.get();
  }
  thread_local std::unique_ptr<char[]> keep;
  thread_local size_t keep_bytes = 0;
  if (keep_bytes < bytes) {
    keep.reset(new char[kWaveScratchBytes]);
    keep_bytes = kWaveScratchBytes;
  }
  return keep.get();
}

// f(0 .. count-1), each exactly once: on the calling thread, or pulled from a shared counter by every thread of one
// parallel region (so a thread the OS deschedules leaves its share to the others).
template <typename F>
void run_items(int64_t count, bool parallel, const F& f) {
  if (!parallel || count <= 1) {
    for (int64_t x = 0; x < count; ++x) f(x);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t x = next.fetch_add(1); x < count; x = next.fetch_add(1)) f(x);
  });
}

}  // namespace

void run_cpu_tasks(const CpuTaskList& tasks) {
  int64_t total = 0;
  for (const auto& t : tasks) total += t->work;
  const bool parallel = total >= kParallelMinElems && at::get_num_threads() > 1 && !at::in_parallel_region();
  auto padded = [](size_t b) { return (b + kScratchAlign - 1) / kScratchAlign * kScratchAlign; };
  std::vector<std::pair<int64_t, int64_t>> items;
  for (size_t w0 = 0; w0 < tasks.size();) {
    size_t w1 = w0, bytes = 0;  // a wave: consecutive tasks whose partials fit the budget (at least one task)
    while (w1 < tasks.size() && (w1 == w0 || bytes + padded(tasks[w1]->scratch_bytes) <= kWaveScratchBytes))
      bytes += padded(tasks[w1++]->scratch_bytes);
    std::unique_ptr<char[]> fresh;
    char* arena = bytes ? wave_scratch(bytes, fresh) : nullptr;
    items.clear();
    for (size_t t = w0, off = 0; t < w1; ++t) {
      if (tasks[t]->scratch_bytes) tasks[t]->bind(arena + off);
      off += padded(tasks[t]->scratch_bytes);
      for (int64_t c = 0; c < tasks[t]->chunks; ++c) items.emplace_back(t, c);
    }
    run_items(static_cast<int64_t>(items.size()), parallel,
              [&](int64_t x) { tasks[items[x].first]->run_chunk(items[x].second); });
    items.clear();  // second pass: column blocks of ~16k additions
    for (size_t t = w0; t < w1; ++t) {
      const int64_t cols = tasks[t]->reduce_cols;
      const int64_t blk = std::max<int64_t>(64, 16384 / std::max<int64_t>(1, tasks[t]->reduce_rows));
      for (int64_t j0 = 0; j0 < cols; j0 += blk) items.emplace_back(t, j0);
    }
    run_items(static_cast<int64_t>(items.size()), parallel, [&](int64_t x) {
      CpuTask& t = *tasks[items[x].first];
      const int64_t blk = std::max<int64_t>(64, 16384 / std::max<int64_t>(1, t.reduce_rows));
      t.reduce(items[x].second, std::min<int64_t>(t.reduce_cols, items[x].second + blk));
    });
    w0 = w1;
  }
  for (const auto& t : tasks) t->finish();
}

template <typename T, typename TM, typename Acc>
std::unique_ptr<CpuTask> terms_fwd_cpu_task(const TermsArgs<T, TM, Acc>& a, Acc* sums) {
#ifdef AGL_CPU_AVX2
  if (use_avx2()) return cpu_avx2::make_fwd_task(a, sums);
#endif
  return cpu_base::make_fwd_task(a, sums);
}

template <typename T, typename TM, typename Acc>
std::unique_ptr<CpuTask> terms_bwd_cpu_task(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g) {
#ifdef AGL_CPU_AVX2
  if (use_avx2()) return cpu_avx2::make_bwd_task(a, g);
#endif
  return cpu_base::make_bwd_task(a, g);
}

template <typename T>
std::unique_ptr<CpuTask> project_cpu_task(const ProjArgs<T>& p) {
  using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
#ifdef AGL_CPU_AVX2
  if (use_avx2()) return cpu_avx2::make_proj_task<T, Acc>(p);
#endif
  return cpu_base::make_proj_task<T, Acc>(p);
}

template <typename T, typename TM, typename Acc>
void terms_fwd_cpu(const TermsArgs<T, TM, Acc>& a, Acc* sums) {
  CpuTaskList tasks;
  tasks.push_back(terms_fwd_cpu_task(a, sums));
  run_cpu_tasks(tasks);
}

template <typename T, typename TM, typename Acc>
void terms_bwd_cpu(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g) {
  CpuTaskList tasks;
  tasks.push_back(terms_bwd_cpu_task(a, g));
  run_cpu_tasks(tasks);
}

#define AGL_INST_CPU(T, TM, Acc)                                                                                    \
  template void terms_fwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, Acc*);                                   \
  template void terms_bwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, const TermsGrads<T, Acc>&);              \
  template std::unique_ptr<CpuTask> terms_fwd_cpu_task<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, Acc*);          \
  template std::unique_ptr<CpuTask> terms_bwd_cpu_task<T, TM, Acc>(const TermsArgs<T, TM, Acc>&,                 \
                                                                   const TermsGrads<T, Acc>&);
AGL_FOR_EACH_TERMS_COMBO(AGL_INST_CPU)
#undef AGL_INST_CPU
template std::unique_ptr<CpuTask> project_cpu_task<double>(const ProjArgs<double>&);
template std::unique_ptr<CpuTask> project_cpu_task<float>(const ProjArgs<float>&);
template std::unique_ptr<CpuTask> project_cpu_task<c10::Half>(const ProjArgs<c10::Half>&);
template std::unique_ptr<CpuTask> project_cpu_task<c10::BFloat16>(const ProjArgs<c10::BFloat16>&);

}  // namespace agl
