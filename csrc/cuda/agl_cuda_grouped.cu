// Grouped CUDA kernels of the fused AGL op: all layers of a call in one launch per pass, tensor cores for the rank-r
// products. Opt-in (AGL_CUDA_GROUPED=1 / agl.ops.set_cuda_grouped): the verified per-layer kernels of agl_cuda.cu
// stay the default until these have passed tests/test_cuda.py on a GPU.
//
// Work: one item = (layer, band of row tiles), see agl_grouped_kernels.h. A fixed number of persistent CTAs (one
// wave) walks the items with a grid stride; an item's result goes to a slot of its own, so the CTA count (which
// depends on the device) never changes a bit of the output.
//
// Per tile of 64 rows x 64 columns (4 warps, each 16 rows x 64 columns = 8 n8 tiles):
//   stage  B[rows, :K], A[:K, cols] (and the align pair) in shared memory as Acc, zero-padded to K = ceil16(r);
//   D, D_A per n8 tile with warp_mma (C fragment in registers), the element math on the fragment in place;
//   forward: per-thread running sums -> fixed-order block sum per item -> ws[item][5];
//   backward: P = dL/dD, Q = dL/dD_A to shared memory, then with warp_mma
//     dB[rows][k]        (+)= sum_j P[i][j] A[k][j]   (warp w: its 16 rows; owned by the item: complete after it)
//     dA[band][k][cols]  (+)= sum_i B[i][k] P[i][j]   (warp w: columns 16w..16w+15; the band's partial)
//   and the same with Q for the align pair. Each slot is written by one lane in a fixed tile order: no atomics.
// Final pass (one launch each way): forward, one block per layer sums its bands in order and forms the terms
// (terms_from_sums); backward, a flat grid over all layers' outputs sums the bands in order, scales and converts.
// The backward forms dL/dsums per item from dL/dterms and the sums in device memory (grad_sums_from_grad_terms).
//
// Tensor cores (sm_80+; older archs and float64 use the FMA path with the same fragment layout):
//   float32 / float16 factors: mma.sync m16n8k8 TF32 with the 3xTF32 split x = big + small (big = tf32(x),
//     small = tf32(x - big)), x*y ~ big*big + big*small + small*big: about float32 accuracy;
//   bfloat16 factors: mma.sync m16n8k16 bf16 with the same split in bf16 (exact for the factors, ~16 bits for P/Q).
// Checked without a GPU by tests/cuda_emu/emu_grouped.cpp, whose mma emulator applies the PTX fragment layouts.
#ifndef AGL_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "agl_grouped_kernels.h"
#include "agl_kernels.h"
#include "agl_math.h"

namespace agl {
namespace grouped {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = kGroupedBM, kBN = kGroupedBN;
constexpr int kPadA = 8;  // pitch of the (rank x columns) and P/Q tiles: kBN + 8 (fewer bank conflicts)
constexpr int kPadB = 4;  // pitch of the (rows x rank) tiles: K + 4
static_assert(kThreads == 2 * kBM && kBN == 64 && kBM == 64, "warp maps assume 4 warps on a 64 x 64 tile");

// How a 16 x 8 output fragment is accumulated.
enum class MmaKind { kFma, kTf32x3, kBf16x3 };

template <typename T, typename Acc>
__host__ __device__ constexpr MmaKind mma_kind() {
  if (std::is_same<Acc, double>::value) return MmaKind::kFma;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return MmaKind::kFma;  // no tf32/bf16 mma.sync before Ampere
#else
  return std::is_same<T, c10::BFloat16>::value ? MmaKind::kBf16x3 : MmaKind::kTf32x3;
#endif
}

// Factors of type T are exact in the mma input type: float16 in tf32 (same 11-bit significand, wider exponent),
// bfloat16 in bf16. float32 factors are not (3 products), P/Q never are.
template <typename T>
__host__ __device__ constexpr bool factor_exact() {
  return std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
}

// ---------------------------------------------------------------- shared-memory layout ----------------------------
// In Acc units, for padded rank K (the call's maximum): Bs [kBM][K+4], As [K][kBN+8], Bas, Aas, then (backward) Ps,
// Qs [kBM][kBN+8], then gs[8] and red[5 * 4].
struct Smem {
  int ldb, lda, off_B, off_A, off_Ba, off_Aa, off_P, off_Q, off_gs, off_red, total;
};

__host__ __device__ inline Smem smem_layout(int64_t rank_pad, bool backward) {
  Smem s;
  s.ldb = static_cast<int>(rank_pad) + kPadB;
  s.lda = kBN + kPadA;
  s.off_B = 0;
  s.off_A = s.off_B + kBM * s.ldb;
  s.off_Ba = s.off_A + static_cast<int>(rank_pad) * s.lda;
  s.off_Aa = s.off_Ba + kBM * s.ldb;
  s.off_P = s.off_Aa + static_cast<int>(rank_pad) * s.lda;
  s.off_Q = s.off_P + (backward ? kBM * s.lda : 0);
  s.off_gs = s.off_Q + (backward ? kBM * s.lda : 0);
  s.off_red = s.off_gs + 8;
  s.total = s.off_red + kNumSums * (kThreads / 32);
  return s;
}

template <typename Acc>
__device__ __forceinline__ Acc* dynamic_smem() {
#ifndef AGL_CUDA_EMULATION
  extern __shared__ __align__(16) unsigned char grouped_smem_raw[];
  return reinterpret_cast<Acc*>(grouped_smem_raw);
#else
  return reinterpret_cast<Acc*>(agl_emu_smem());
#endif
}

// ---------------------------------------------------------------- tensor-core primitives -------------------------
// tf32(x): round to nearest (ties away), low 13 bits zero, as the bit pattern mma.sync reads.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(AGL_CUDA_EMULATION)
  return agl_emu_cvt_rna_tf32(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
#endif
}

__device__ __forceinline__ float tf32_value(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Two bf16 (round to nearest even) in one register, lo in the low half: the order mma.sync expects.
__device__ __forceinline__ uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }
__device__ __forceinline__ float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(AGL_CUDA_EMULATION)
  agl_emu_mma_m16n8k8_tf32(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)c, (void)a, (void)b;  // unreachable: mma_kind() selects the FMA path below sm_80
#endif
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(AGL_CUDA_EMULATION)
  agl_emu_mma_m16n8k16_bf16(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)c, (void)a, (void)b;
#endif
}

// A strided view of a shared-memory matrix: (i, j) -> p[i * si + j * sj].
template <typename Acc>
struct View {
  const Acc* p;
  int si, sj;
  __device__ __forceinline__ Acc operator()(int i, int j) const { return p[i * si + j * sj]; }
};

// C (16 x 8) += X (16 x K) * Y (K x 8), K a multiple of 16, in the mma.sync C-fragment layout: lane = 4 g + t holds
// c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1). The operand fragments follow the PTX ISA:
//   m16n8k8 tf32:  a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);  b0 (t, g) b1 (t+4, g)
//   m16n8k16 bf16: a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..);  b0 (2t..2t+1, g) b1 (2t+8.., g)
// The split products are issued small first (big*small, small*big, then big*big) so the small terms are not lost.
// kXExact / kYExact: the operand is exactly representable in the mma type (16-bit factors), so its small part is
// zero and the product that would use it is skipped (the result is the same bits: it would add exact zeros).
template <MmaKind kKind, bool kXExact = false, bool kYExact = false, typename Acc>
__device__ __forceinline__ void warp_mma(Acc (&c)[4], const View<Acc> X, const View<Acc> Y, int K) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if constexpr (kKind == MmaKind::kFma || !std::is_same<Acc, float>::value) {
    for (int k = 0; k < K; ++k) {
      const Acc x0 = X(g, k), x1 = X(g + 8, k), y0 = Y(k, 2 * t), y1 = Y(k, 2 * t + 1);
      c[0] += x0 * y0;
      c[1] += x0 * y1;
      c[2] += x1 * y0;
      c[3] += x1 * y1;
    }
  } else if constexpr (kKind == MmaKind::kTf32x3) {
    for (int k0 = 0; k0 < K; k0 += 8) {
      const float xv[4] = {X(g, k0 + t), X(g + 8, k0 + t), X(g, k0 + t + 4), X(g + 8, k0 + t + 4)};
      const float yv[2] = {Y(k0 + t, g), Y(k0 + t + 4, g)};
      uint32_t ab[4], as[4], bb[2], bs[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ab[i] = to_tf32(xv[i]), as[i] = to_tf32(xv[i] - tf32_value(ab[i]));
#pragma unroll
      for (int i = 0; i < 2; ++i) bb[i] = to_tf32(yv[i]), bs[i] = to_tf32(yv[i] - tf32_value(bb[i]));
      if constexpr (!kYExact) mma_tf32(c, ab, bs);
      if constexpr (!kXExact) mma_tf32(c, as, bb);
      mma_tf32(c, ab, bb);
    }
  } else {  // kBf16x3
#pragma unroll 1  // the fully unrolled bf16 k loop (K = 64 in the contractions) needs more than 168 registers
    for (int k0 = 0; k0 < K; k0 += 16) {
      const float xv[8] = {X(g, k0 + 2 * t),     X(g, k0 + 2 * t + 1),     X(g + 8, k0 + 2 * t),
                           X(g + 8, k0 + 2 * t + 1), X(g, k0 + 2 * t + 8), X(g, k0 + 2 * t + 9),
                           X(g + 8, k0 + 2 * t + 8), X(g + 8, k0 + 2 * t + 9)};
      const float yv[4] = {Y(k0 + 2 * t, g), Y(k0 + 2 * t + 1, g), Y(k0 + 2 * t + 8, g), Y(k0 + 2 * t + 9, g)};
      uint16_t xb[8], xs[8], yb[4], ys[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) xb[i] = bf16_bits(xv[i]), xs[i] = bf16_bits(xv[i] - bf16_value(xb[i]));
#pragma unroll
      for (int i = 0; i < 4; ++i) yb[i] = bf16_bits(yv[i]), ys[i] = bf16_bits(yv[i] - bf16_value(yb[i]));
      uint32_t ab[4], as[4], bb[2], bs[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ab[i] = pack2(xb[2 * i], xb[2 * i + 1]), as[i] = pack2(xs[2 * i], xs[2 * i + 1]);
#pragma unroll
      for (int i = 0; i < 2; ++i) bb[i] = pack2(yb[2 * i], yb[2 * i + 1]), bs[i] = pack2(ys[2 * i], ys[2 * i + 1]);
      if constexpr (!kYExact) mma_bf16(c, ab, bs);
      if constexpr (!kXExact) mma_bf16(c, as, bb);
      mma_bf16(c, ab, bb);
    }
  }
}

// ---------------------------------------------------------------- helpers ----------------------------------------
__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The layer of work item w (items of layer l are [item0, item0 + bands), layers in order): binary search.
template <typename Desc>
__device__ __forceinline__ int64_t layer_of_item(const Desc* table, int64_t L, int64_t w) {
  int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid].item0 <= w) lo = mid; else hi = mid - 1;
  }
  while (table[lo].bands == 0 || w >= table[lo].item0 + table[lo].bands) ++lo;  // skip empty layers sharing item0
  return lo;
}

// Stages rows [row0, row0 + kBM) x ranks [0, K) of X (m x rank) into Xs [kBM][ldb] and ranks [0, K) x columns
// [col0, col0 + kBN) of Y (rank x n) into Ys [K][lda], as Acc, zero past the matrix edges and past rank.
template <typename T, typename Acc>
__device__ void stage_pair(const T* __restrict__ X, const T* __restrict__ Y, int64_t rank, int K, int64_t m,
                           int64_t n, int64_t row0, int64_t col0, Acc* Xs, int ldb, Acc* Ys, int lda) {
  for (int e = threadIdx.x; e < kBM * K; e += kThreads) {
    const int i = e / K, k = e % K;  // k fastest: contiguous reads along a row of X
    Xs[i * ldb + k] = (k < rank && row0 + i < m) ? static_cast<Acc>(X[(row0 + i) * rank + k]) : Acc(0);
  }
  for (int e = threadIdx.x; e < K * kBN; e += kThreads) {
    const int k = e / kBN, j = e % kBN;
    Ys[k * lda + j] = (k < rank && col0 + j < n) ? static_cast<Acc>(Y[k * n + col0 + j]) : Acc(0);
  }
}

// Fixed-order block sum of v[0..4] over the 128 threads; the result is valid in thread 0.
template <typename Acc>
__device__ void block_sum5(Acc (&v)[kNumSums], Acc* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) red[warp * kNumSums + k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) {
      Acc s = red[k];
      for (int w = 1; w < kThreads / 32; ++w) s += red[w * kNumSums + k];
      v[k] = s;
    }
  }
  __syncthreads();  // red is reused by the next item
}

// Two adjacent metric values, aligned so that they are one load (8 B for float, 4 B for 16-bit).
template <typename TM>
struct alignas(2 * sizeof(TM)) MetricPair {
  TM v[2];
};

// Whether the metric rows of a layer can be read as aligned pairs (n even and the pointer aligned; columns of a lane
// start at even offsets from a tile edge, a multiple of 64).
template <typename TM>
__device__ __forceinline__ bool pairs_ok(const TM* p, int64_t n) {
  return p == nullptr || (n % 2 == 0 && reinterpret_cast<uintptr_t>(p) % (2 * sizeof(TM)) == 0);
}

// The lane's metric values for one n8 tile in C-fragment order (e = 2 h + c: row `row` + 8 h, column `col` + c);
// 1 where the metric is absent, 0 outside the grid (those elements are skipped anyway).
template <typename TM, typename Acc>
__device__ __forceinline__ void load_frag_metric(const TM* __restrict__ p, int64_t m, int64_t n, int64_t row, int64_t col,
                                                 bool pair, Acc (&o)[4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row + 8 * h;
    if (p == nullptr) {
      o[2 * h] = o[2 * h + 1] = Acc(1);
    } else if (pair && r < m && col < n) {  // n even: col + 1 < n too
      const MetricPair<TM> v = *reinterpret_cast<const MetricPair<TM>*>(p + r * n + col);
      o[2 * h] = static_cast<Acc>(v.v[0]), o[2 * h + 1] = static_cast<Acc>(v.v[1]);
    } else {
#pragma unroll
      for (int c = 0; c < 2; ++c) o[2 * h + c] = (r < m && col + c < n) ? static_cast<Acc>(p[r * n + col + c]) : Acc(0);
    }
  }
}

// ---------------------------------------------------------------- forward ----------------------------------------
template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads, sizeof(Acc) == 8 ? 1 : 3)
    grouped_fwd_kernel(const GroupedLayerDesc<T, TM, Acc>* __restrict__ table, int64_t L, int64_t items,
                       int64_t rank_pad, EtaParams<Acc> eta, Acc* __restrict__ ws /* [items][5] */) {
  constexpr MmaKind kKind = mma_kind<T, Acc>();
  constexpr bool kExact = factor_exact<T>();
  Acc* sm = dynamic_smem<Acc>();
  const Smem lay = smem_layout(rank_pad, false);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const GroupedLayerDesc<T, TM, Acc>& Ld = table[layer_of_item(table, L, w)];
    const int64_t band = w - Ld.item0, m = Ld.m, n = Ld.n;
    const bool align = Ld.Ba != nullptr && Ld.ra > 0;
    const bool pair = pairs_ok(Ld.F, n) && pairs_ok(Ld.H, n);
    const int K = static_cast<int>(grouped_rank_pad(Ld.r)), Ka = align ? static_cast<int>(grouped_rank_pad(Ld.ra)) : 0;
    const int64_t rt0 = band * Ld.tiles_per_band, rt1 = imin(cdiv(m, kBM), rt0 + Ld.tiles_per_band);
    Acc sums[kNumSums] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t rt = rt0; rt < rt1; ++rt) {
      for (int64_t ct = 0; ct < cdiv(n, kBN); ++ct) {
        const int64_t row0 = rt * kBM, col0 = ct * kBN;
        __syncthreads();  // the previous tile's readers are done
        stage_pair(Ld.B, Ld.A, Ld.r, K, m, n, row0, col0, sm + lay.off_B, lay.ldb, sm + lay.off_A, lay.lda);
        if (align) stage_pair(Ld.Ba, Ld.Aa, Ld.ra, Ka, m, n, row0, col0, sm + lay.off_Ba, lay.ldb, sm + lay.off_Aa, lay.lda);
        __syncthreads();
#pragma unroll 1
        for (int j = 0; j < kBN / 8; ++j) {
          Acc cd[4] = {Acc(0), Acc(0), Acc(0), Acc(0)}, ca[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
          warp_mma<kKind, kExact, kExact>(cd, View<Acc>{sm + lay.off_B + warp * 16 * lay.ldb, lay.ldb, 1},
                          View<Acc>{sm + lay.off_A + j * 8, lay.lda, 1}, K);
          if (align) {
            warp_mma<kKind, kExact, kExact>(ca, View<Acc>{sm + lay.off_Ba + warp * 16 * lay.ldb, lay.ldb, 1},
                            View<Acc>{sm + lay.off_Aa + j * 8, lay.lda, 1}, Ka);
          }
          Acc gv[4], hv[4];
          load_frag_metric(Ld.F, m, n, row0 + warp * 16 + g, col0 + j * 8 + 2 * t, pair, gv);
          load_frag_metric(Ld.H, m, n, row0 + warp * 16 + g, col0 + j * 8 + 2 * t, pair, hv);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t row = row0 + warp * 16 + g + (e >> 1) * 8, col = col0 + j * 8 + 2 * t + (e & 1);
            if (row < m && col < n) accumulate_forward(Ld.scale * cd[e], Ld.scale * ca[e], gv[e], hv[e], eta, sums);
          }
        }
      }
    }
    block_sum5(sums, sm + lay.off_red);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) ws[w * kNumSums + k] = sums[k];
    }
  }
}

// One block per layer: the layer's band sums in band order, then the four terms. Empty layers: zero sums.
template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads)
    grouped_fwd_final_kernel(const GroupedLayerDesc<T, TM, Acc>* __restrict__ table, const Acc* __restrict__ ws,
                             Acc eps, Acc* __restrict__ terms, Acc* __restrict__ sums) {
  Acc* red = dynamic_smem<Acc>();
  const GroupedLayerDesc<T, TM, Acc>& Ld = table[blockIdx.x];
  Acc v[kNumSums] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int64_t b = threadIdx.x; b < Ld.bands; b += kThreads) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) v[k] += ws[(Ld.item0 + b) * kNumSums + k];
  }
  block_sum5(v, red);
  if (threadIdx.x == 0) {
    const int64_t l = blockIdx.x;
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) sums[l * kNumSums + k] = v[k];
    Acc tm[kNumTerms];
    terms_from_sums(v, static_cast<Acc>(Ld.m) * static_cast<Acc>(Ld.n), eps, tm);
#pragma unroll
    for (int k = 0; k < kNumTerms; ++k) terms[l * kNumTerms + k] = tm[k];
  }
}

// ---------------------------------------------------------------- backward ---------------------------------------
// Contracts the P (or Q) tile in shared memory with the staged factor pair (Xs rows x K, Ys K x cols):
//   dX[row][k]          (+)= sum_j P[i][j] Ys[k][j]   warp: rows 16 warp.., all K/8 rank tiles
//   dY[band][k][col]    (+)= sum_i Xs[i][k] P[i][j]   warp: columns 16 warp.. (two n8 tiles), all K/16 rank tiles
// first_col / first_row: the first tile of the item touching the slot writes it, later ones add (same lane).
template <MmaKind kKind, bool kExact, typename Acc>
__device__ void contract_tile(const Acc* Ps, int ldp, const Acc* Xs, int ldb, const Acc* Ys, int lda, int K,
                              int64_t rank, int64_t m, int64_t n, int64_t row0, int64_t col0, bool first_col,
                              bool first_row, Acc* __restrict__ dX /* [m][rank] */,
                              Acc* __restrict__ dY /* this band's [rank][n] */) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int q = 0; q < K / 8; ++q) {
    Acc c[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    warp_mma<kKind, false, kExact>(c, View<Acc>{Ps + warp * 16 * ldp, ldp, 1}, View<Acc>{Ys + q * 8 * lda, 1, lda}, kBN);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = row0 + warp * 16 + g + (e >> 1) * 8, k = q * 8 + 2 * t + (e & 1);
      if (row < m && k < rank) {
        Acc* dst = dX + row * rank + k;
        *dst = first_col ? c[e] : *dst + c[e];
      }
    }
  }
#pragma unroll 1
  for (int p = 0; p < K / 16; ++p) {
#pragma unroll 1
    for (int jj = 0; jj < 2; ++jj) {
      const int j = warp * 2 + jj;
      Acc c[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      warp_mma<kKind, kExact, false>(c, View<Acc>{Xs + p * 16, 1, ldb}, View<Acc>{Ps + j * 8, ldp, 1}, kBM);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t k = p * 16 + g + (e >> 1) * 8, col = col0 + j * 8 + 2 * t + (e & 1);
        if (k < rank && col < n) {
          Acc* dst = dY + k * n + col;
          *dst = first_row ? c[e] : *dst + c[e];
        }
      }
    }
  }
}

template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads, sizeof(Acc) == 8 ? 1 : 3)
    grouped_bwd_kernel(const GroupedLayerDesc<T, TM, Acc>* __restrict__ table, int64_t L, int64_t items,
                       int64_t rank_pad, EtaParams<Acc> eta, Acc eps, const Acc* __restrict__ grad_terms,
                       const Acc* __restrict__ sums, Acc* __restrict__ ws) {
  constexpr MmaKind kKind = mma_kind<T, Acc>();
  constexpr bool kExact = factor_exact<T>();
  Acc* sm = dynamic_smem<Acc>();
  const Smem lay = smem_layout(rank_pad, true);
  Acc* Ps = sm + lay.off_P;
  Acc* Qs = sm + lay.off_Q;
  Acc* gs = sm + lay.off_gs;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t l = layer_of_item(table, L, w);
    const GroupedLayerDesc<T, TM, Acc>& Ld = table[l];
    const int64_t band = w - Ld.item0, m = Ld.m, n = Ld.n;
    const bool align = Ld.Ba != nullptr && Ld.ra > 0;
    const bool pair = pairs_ok(Ld.F, n) && pairs_ok(Ld.H, n);
    const int K = static_cast<int>(grouped_rank_pad(Ld.r)), Ka = align ? static_cast<int>(grouped_rank_pad(Ld.ra)) : 0;
    const int64_t rt0 = band * Ld.tiles_per_band, rt1 = imin(cdiv(m, kBM), rt0 + Ld.tiles_per_band);
    __syncthreads();  // the previous item's readers of gs are done
    if (threadIdx.x == 0) {
      Acc S[kNumSums], gt[kNumTerms], g5[kNumSums];
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) S[k] = sums[l * kNumSums + k];
#pragma unroll
      for (int k = 0; k < kNumTerms; ++k) gt[k] = grad_terms[l * kNumTerms + k];
      grad_sums_from_grad_terms(S, gt, static_cast<Acc>(m) * static_cast<Acc>(n), eps, g5);
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) gs[k] = g5[k];
    }
    Acc* dB = ws + Ld.ws_dB;
    Acc* dA = ws + Ld.ws_dA + band * Ld.r * n;
    Acc* dBa = ws + Ld.ws_dBa;
    Acc* dAa = ws + Ld.ws_dAa + band * (align ? Ld.ra : 0) * n;
    for (int64_t rt = rt0; rt < rt1; ++rt) {
      for (int64_t ct = 0; ct < cdiv(n, kBN); ++ct) {
        const int64_t row0 = rt * kBM, col0 = ct * kBN;
        __syncthreads();  // previous tile's contractions done (and gs visible on the first tile)
        stage_pair(Ld.B, Ld.A, Ld.r, K, m, n, row0, col0, sm + lay.off_B, lay.ldb, sm + lay.off_A, lay.lda);
        if (align) stage_pair(Ld.Ba, Ld.Aa, Ld.ra, Ka, m, n, row0, col0, sm + lay.off_Ba, lay.ldb, sm + lay.off_Aa, lay.lda);
        __syncthreads();
        Acc g5[kNumSums];
#pragma unroll
        for (int k = 0; k < kNumSums; ++k) g5[k] = gs[k];
#pragma unroll 1
        for (int j = 0; j < kBN / 8; ++j) {
          Acc cd[4] = {Acc(0), Acc(0), Acc(0), Acc(0)}, ca[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
          warp_mma<kKind, kExact, kExact>(cd, View<Acc>{sm + lay.off_B + warp * 16 * lay.ldb, lay.ldb, 1},
                          View<Acc>{sm + lay.off_A + j * 8, lay.lda, 1}, K);
          if (align) {
            warp_mma<kKind, kExact, kExact>(ca, View<Acc>{sm + lay.off_Ba + warp * 16 * lay.ldb, lay.ldb, 1},
                            View<Acc>{sm + lay.off_Aa + j * 8, lay.lda, 1}, Ka);
          }
          Acc gv[4], hv[4];
          load_frag_metric(Ld.F, m, n, row0 + warp * 16 + g, col0 + j * 8 + 2 * t, pair, gv);
          load_frag_metric(Ld.H, m, n, row0 + warp * 16 + g, col0 + j * 8 + 2 * t, pair, hv);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = warp * 16 + g + (e >> 1) * 8, jc = j * 8 + 2 * t + (e & 1);
            const int64_t row = row0 + i, col = col0 + jc;
            Acc pv = Acc(0), qv = Acc(0);
            if (row < m && col < n) element_grads(Ld.scale * cd[e], Ld.scale * ca[e], gv[e], hv[e], eta, g5, pv, qv);
            Ps[i * lay.lda + jc] = pv;
            Qs[i * lay.lda + jc] = qv;
          }
        }
        __syncthreads();  // P/Q complete
        const bool first_col = ct == 0, first_row = rt == rt0;
        contract_tile<kKind, kExact>(Ps, lay.lda, sm + lay.off_B, lay.ldb, sm + lay.off_A, lay.lda, K, Ld.r, m, n, row0, col0,
                             first_col, first_row, dB, dA);
        if (align) {
          contract_tile<kKind, kExact>(Qs, lay.lda, sm + lay.off_Ba, lay.ldb, sm + lay.off_Aa, lay.lda, Ka, Ld.ra, m, n, row0,
                               col0, first_col, first_row, dBa, dAa);
        }
      }
    }
  }
}

// Every output element of every layer: out = T(scale * sum over bands in order). One flat grid-stride launch.
template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads)
    grouped_bwd_final_kernel(const GroupedLayerDesc<T, TM, Acc>* __restrict__ table, int64_t L, int64_t total,
                             const Acc* __restrict__ ws) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t lo = 0, hi = L - 1;  // last layer with out0 <= e (layers without outputs share out0 with the next)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid].out0 <= e) lo = mid; else hi = mid - 1;
    }
    const GroupedLayerDesc<T, TM, Acc>& Ld = table[lo];
    const int64_t ra = Ld.Ba != nullptr ? Ld.ra : 0;
    int64_t x = e - Ld.out0;
    const int64_t nB = Ld.m * Ld.r, nA = Ld.r * Ld.n, nBa = Ld.m * ra;
    Acc s = Acc(0);
    T* out;
    if (x < nB) {
      s = ws[Ld.ws_dB + x];
      out = Ld.dB + x;
    } else if ((x -= nB) < nA) {
      for (int64_t b = 0; b < Ld.bands; ++b) s += ws[Ld.ws_dA + b * nA + x];
      out = Ld.dA + x;
    } else if ((x -= nA) < nBa) {
      s = ws[Ld.ws_dBa + x];
      out = Ld.dBa + x;
    } else {
      x -= nBa;
      for (int64_t b = 0; b < Ld.bands; ++b) s += ws[Ld.ws_dAa + b * ra * Ld.n + x];
      out = Ld.dAa + x;
    }
    *out = static_cast<T>(Ld.scale * s);
  }
}

}  // namespace grouped

// ---------------------------------------------------------------- host side --------------------------------------
size_t grouped_smem_bytes(int64_t rank_pad, bool backward, size_t acc_size) {
  return static_cast<size_t>(grouped::smem_layout(rank_pad, backward).total) * acc_size;
}

int64_t grouped_max_rank(size_t acc_size) { return acc_size == 8 ? 32 : 64; }

#ifndef AGL_CUDA_EMULATION
namespace grouped {
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("agl grouped CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

// One wave of persistent CTAs for `kernel` with `smem` bytes of dynamic shared memory (raises the kernel's limit
// first; a race only repeats idempotent calls). The count changes scheduling only, never a result.
template <typename Kernel>
int64_t persistent_ctas(Kernel kernel, size_t smem, int64_t items) {
  int dev = 0, sms = 0, blocks = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max<int64_t>(1, std::min<int64_t>(items, static_cast<int64_t>(std::max(blocks, 1)) * std::max(sms, 1)));
}
}  // namespace grouped

namespace grouped {
constexpr int kChunkBytes = 3968;  // kernel parameters stay under the classic 4 KB limit
struct TableChunk {
  unsigned char b[kChunkBytes];
};

__global__ void upload_table_chunk_kernel(const TableChunk chunk, int bytes, unsigned char* __restrict__ dst) {
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = chunk.b[i];
}
}  // namespace grouped

void grouped_upload_table(const void* host, size_t bytes, void* dev, void* stream_ptr) {
  using namespace grouped;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  for (size_t off = 0; off < bytes; off += kChunkBytes) {
    TableChunk c;
    const size_t nb = std::min<size_t>(kChunkBytes, bytes - off);
    std::memcpy(c.b, static_cast<const unsigned char*>(host) + off, nb);
    upload_table_chunk_kernel<<<1, 256, 0, stream>>>(c, static_cast<int>(nb), static_cast<unsigned char*>(dev) + off);
    check_cuda(cudaGetLastError(), "agl upload_table_chunk_kernel launch");
  }
}

template <typename T, typename TM, typename Acc>
void grouped_terms_fwd_cuda(const GroupedLayerDesc<T, TM, Acc>* table, int64_t L, const GroupedTotals& t,
                      const EtaParams<Acc>& eta, Acc eps, Acc* terms, Acc* sums, Acc* ws, void* stream_ptr) {
  using namespace grouped;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (L <= 0) return;
  if (t.items > 0) {
    const size_t smem = grouped_smem_bytes(t.rank_pad, false, sizeof(Acc));
    const int64_t ctas = persistent_ctas(grouped_fwd_kernel<T, TM, Acc>, smem, t.items);
    grouped_fwd_kernel<T, TM, Acc><<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(table, L, t.items,
                                                                                             t.rank_pad, eta, ws);
    check_cuda(cudaGetLastError(), "agl grouped_fwd_kernel launch");
  }
  const size_t red = kNumSums * (kThreads / 32) * sizeof(Acc);
  grouped_fwd_final_kernel<T, TM, Acc><<<static_cast<unsigned>(L), kThreads, red, stream>>>(table, ws, eps, terms, sums);
  check_cuda(cudaGetLastError(), "agl grouped_fwd_final_kernel launch");
}

template <typename T, typename TM, typename Acc>
void grouped_terms_bwd_cuda(const GroupedLayerDesc<T, TM, Acc>* table, int64_t L, const GroupedTotals& t,
                      const EtaParams<Acc>& eta, Acc eps, const Acc* grad_terms, const Acc* sums, Acc* ws,
                      void* stream_ptr) {
  using namespace grouped;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (L <= 0 || t.out_total <= 0) return;
  if (t.items > 0) {
    const size_t smem = grouped_smem_bytes(t.rank_pad, true, sizeof(Acc));
    const int64_t ctas = persistent_ctas(grouped_bwd_kernel<T, TM, Acc>, smem, t.items);
    grouped_bwd_kernel<T, TM, Acc><<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(
        table, L, t.items, t.rank_pad, eta, eps, grad_terms, sums, ws);
    check_cuda(cudaGetLastError(), "agl grouped_bwd_kernel launch");
  }
  const int64_t blocks = std::min<int64_t>(cdiv(t.out_total, kThreads), 4096);
  grouped_bwd_final_kernel<T, TM, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, L, t.out_total, ws);
  check_cuda(cudaGetLastError(), "agl grouped_bwd_final_kernel launch");
}

#define AGL_INSTANTIATE_GROUPED(T, TM, ACC)                                                                       \
  template void grouped_terms_fwd_cuda<T, TM, ACC>(const GroupedLayerDesc<T, TM, ACC>*, int64_t, const GroupedTotals&,  \
                                             const EtaParams<ACC>&, ACC, ACC*, ACC*, ACC*, void*);                 \
  template void grouped_terms_bwd_cuda<T, TM, ACC>(const GroupedLayerDesc<T, TM, ACC>*, int64_t, const GroupedTotals&,  \
                                             const EtaParams<ACC>&, ACC, const ACC*, const ACC*, ACC*, void*);

#ifndef AGL_CUDA_QUICK
AGL_FOR_EACH_TERMS_COMBO(AGL_INSTANTIATE_GROUPED)
#else
AGL_INSTANTIATE_GROUPED(float, float, float)
AGL_INSTANTIATE_GROUPED(c10::BFloat16, c10::BFloat16, float)
#endif
#endif  // AGL_CUDA_EMULATION

}  // namespace agl
