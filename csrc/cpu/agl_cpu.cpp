// CPU kernels of the fused AGL op (see csrc/agl_kernels.h for the interface, csrc/agl_math.h for the element math).
//
// Layout of the work: the m rows are cut into a FIXED number of row chunks (a function of m only, never of the
// thread count); at::parallel_for hands whole chunks to threads, each chunk is processed row by row in a fixed
// order, and the per-chunk partial results are reduced in chunk order. Results are therefore bitwise identical
// whatever the number of threads.
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
}  // namespace

template <typename T, typename TM, typename Acc>
void terms_fwd_cpu(const TermsArgs<T, TM, Acc>& a, Acc* sums) {
#ifdef AGL_CPU_AVX2
  if (use_avx2()) return cpu_avx2::terms_fwd_cpu(a, sums);
#endif
  cpu_base::terms_fwd_cpu(a, sums);
}

template <typename T, typename TM, typename Acc>
void terms_bwd_cpu(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g) {
#ifdef AGL_CPU_AVX2
  if (use_avx2()) return cpu_avx2::terms_bwd_cpu(a, g);
#endif
  cpu_base::terms_bwd_cpu(a, g);
}

#define AGL_INST_CPU(T, TM, Acc)                                                  \
  template void terms_fwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, Acc*); \
  template void terms_bwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, const TermsGrads<T, Acc>&);
AGL_FOR_EACH_TERMS_COMBO(AGL_INST_CPU)
#undef AGL_INST_CPU

}  // namespace agl
