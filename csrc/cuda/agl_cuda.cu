// CUDA kernels of the fused AGL op (forward: five sums; backward: grads of B, A, B_align, A_align).
//
// Kernel-only file: no torch headers beyond c10's Half/BFloat16. The glue (csrc/agl_ops.cpp) validates inputs,
// makes them contiguous, allocates outputs and the workspace, and passes the current stream.
//
// Design:
// * The m x n grid is cut into tiles of kBM x kBN. Tiles are grouped into a fixed 2-D grid of Pr row groups x Pc
//   column groups; block (bx, by) walks the tiles of row group by x column group bx, rows outer, columns inner.
//   (Pr, Pc) depends only on (m, n) and the device, never on timing, so every result is bitwise reproducible.
// * Per tile, D and D_A are rebuilt in registers from rank chunks (kRC ranks at a time) of the factors staged in
//   shared memory: each thread owns a 4 x 8 micro-tile (rows ty*4+p, columns tx*4+q and 64+tx*4+q, so that the loads
//   of F/H/M are 16-byte vectors coalesced across the warp). Nothing of size m x n is ever written.
// * Forward: per-thread sums -> fixed-order block reduction -> one row of 5 partial sums per block in the workspace
//   -> a one-block kernel sums the rows in a fixed order and forms the four terms. No atomics.
// * Backward: per element the grads P = dL/dD (total, in mask mode) and Q = dL/dD_A are written to shared memory;
//   the tile's contributions P A^T (to dB) and B^T P (to dA) are contracted from shared memory and added into
//   per-column-group partials dB_part[Pc][m][r] and per-row-group partials dA_part[Pr][r][n] in the workspace.
//   Each partial slot is owned by exactly one thread of one block (same thread for every tile that touches it), so
//   the read-modify-write needs no synchronisation and happens in a fixed order. Reduction kernels then sum the
//   partials in a fixed order, multiply by the scale and convert to T, writing every output element.
//   The five grads dL/dsums are formed at kernel start from dL/dterms and the sums (TermsGrads::gt_dev, S_dev,
//   device memory) into shared memory, so the backward never waits for a device->host copy.
// * Workspace: forward Pr*Pc*5 Acc; backward (Pc*m + Pr*n)*(r + ra)*sizeof(Acc) (+ 256-byte padding per section),
//   with Pr*Pc <= one wave of resident blocks (see make_plan), i.e. O((m + n)*(r + ra)) times about sqrt(#SMs).
// * Whether fisher/task_metric/align_mask are present is a run-time, block-uniform branch rather than a template
//   flag: the branches cost next to nothing and keep this file at 10 type combinations x 2 kernels (fast builds).
// Checked without a GPU by tests/cuda_emu/emu_main.cpp (runs these kernels as host threads against a double loop).
#ifndef AGL_CUDA_EMULATION  // tests/cuda_emu/ compiles the kernels as host code to check their indexing
#include <cuda_runtime.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "agl_kernels.h"
#include "agl_math.h"

namespace agl {
namespace {

// ---------------------------------------------------------------- tile geometry ----------------------------------
constexpr int kThreads = 256;      // 16 x 16 threads
constexpr int kBM = 64;            // tile rows: 16 thread rows x 4
constexpr int kBN = 128;           // tile columns: 16 thread columns x 8 (two groups of 4, 64 apart)
constexpr int kRC = 16;            // ranks per shared-memory chunk (any r works: chunks are looped over)
constexpr int kBMP = kBM + 4;      // pitch of Bk (rank-major B chunk): +4 breaks the 16-way conflict of its stores
constexpr int kRCP = kRC + 4;      // pitch of the row-major chunk copies Bt/At: 16-byte aligned, fewer conflicts
constexpr int kPP = kBN + 1;       // pitch of the P/Q tiles: odd, so column walks (dB contraction) are conflict-free

// Shared-memory layout, in units of Acc. All offsets are multiples of 4 elements (16-byte vector loads).
constexpr int kOffBk = 0;                       // Bk[k][i]  (kRC x kBMP) : rebuild reads 4 rows as one vector
constexpr int kOffAk = kOffBk + kRC * kBMP;     // Ak[k][j]  (kRC x kBN)  : rebuild reads 4 columns as one vector
constexpr int kOffBt = kOffAk + kRC * kBN;      // Bt[i][k]  (kBM x kRCP) : dA contraction reads 8 ranks per row
constexpr int kOffAt = kOffBt + kBM * kRCP;     // At[j][k]  (kBN x kRCP) : dB contraction reads 4 ranks per column
constexpr int kOffP = kOffAt + kBN * kRCP;      // P[i][j]   (kBM x kPP)  : backward only
constexpr int kOffQ = kOffP + kBM * kPP;        // Q[i][j]   (kBM x kPP)  : backward only
constexpr int kOffGs = kOffQ + kBM * kPP;       // gs[5] (+3 padding)     : backward only, the incoming grads
constexpr int kSmemFwd = kOffBt;                // forward needs only the rank-major copies
constexpr int kSmemBwd = kOffGs + 8;
static_assert(kOffAk % 4 == 0 && kOffBt % 4 == 0 && kOffAt % 4 == 0 && kOffP % 4 == 0 && kOffQ % 4 == 0 &&
                  kOffGs % 4 == 0 && kNumSums <= 8,
              "align");
static_assert(kBMP % 4 == 0 && kRCP % 4 == 0 && kRC % 8 == 0, "vector loads need 4-element alignment");
static_assert(kThreads == 2 * kBN && kThreads == 4 * kBM && kRC == 16, "contraction thread maps assume these");

// Double needs twice the registers: one block per SM there (tests only); two for float.
template <typename Acc>
constexpr int min_blocks() {
  return sizeof(Acc) == 8 ? 1 : 2;
}

// 4 consecutive elements, aligned so that the compiler emits one vector load (16 B for float, 8 B for 16-bit).
template <typename U>
struct alignas(4 * sizeof(U)) Vec4 {
  U v[4];
};

template <typename U>
__device__ __forceinline__ Vec4<U> ld4(const U* p) {
  return *reinterpret_cast<const Vec4<U>*>(p);
}

// ---------------------------------------------------------------- work split -------------------------------------
// Pr x Pc blocks; block (bx, by) owns row tiles [by*tpr, ...) and column tiles [bx*tpc, ...). Every group is
// non-empty (Pr = ceil(Tr / tpr)), which the backward relies on: each partial slot gets written.
struct Plan {
  int64_t Tr = 0, Tc = 0;    // tiles along rows / columns
  int64_t tpr = 1, tpc = 1;  // tiles per group
  int64_t Pr = 0, Pc = 0;    // groups
};

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// One wave of `slots` resident blocks; minimise the busiest block's tile count, then (within 5% of that) the
// partial-gradient workspace (Pc * m + Pr * n).
Plan make_plan(int64_t m, int64_t n, int64_t slots) {
  Plan best;
  best.Tr = cdiv(m, kBM);
  best.Tc = cdiv(n, kBN);
  if (best.Tr == 0 || best.Tc == 0) return best;
  slots = std::max<int64_t>(slots, 1);
  const int64_t pr_max = std::min(best.Tr, slots);
  auto candidate = [&](int64_t pr, Plan& c) {
    c.Tr = best.Tr;
    c.Tc = best.Tc;
    c.tpr = cdiv(c.Tr, pr);
    c.Pr = cdiv(c.Tr, c.tpr);
    const int64_t pc0 = std::min(c.Tc, std::max<int64_t>(1, slots / c.Pr));
    c.tpc = cdiv(c.Tc, pc0);
    c.Pc = cdiv(c.Tc, c.tpc);
    return c.tpr * c.tpc;
  };
  int64_t min_span = INT64_MAX;
  for (int64_t pr = 1; pr <= pr_max; ++pr) {
    Plan c;
    min_span = std::min(min_span, candidate(pr, c));
  }
  int64_t best_ws = INT64_MAX;
  for (int64_t pr = 1; pr <= pr_max; ++pr) {
    Plan c;
    const int64_t span = candidate(pr, c);
    if (span * 20 > min_span * 21) continue;
    const int64_t ws = c.Pc * m + c.Pr * n;
    if (ws < best_ws) {
      best_ws = ws;
      best = c;
    }
  }
  return best;
}

// ---------------------------------------------------------------- kernel parameters ------------------------------
template <typename T, typename TM, typename Acc>
struct KParams {
  TermsArgs<T, TM, Acc> a;
  Plan plan;
  bool vec;  // F/H/M rows can be read as aligned 4-element vectors (n % 4 == 0 and aligned pointers)
};

// ---------------------------------------------------------------- device helpers ---------------------------------
// The block's dynamic shared memory (16-byte aligned), as Acc.
template <typename Acc>
__device__ __forceinline__ Acc* dynamic_smem() {
#ifndef AGL_CUDA_EMULATION
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<Acc*>(smem_raw);
#else
  return reinterpret_cast<Acc*>(agl_emu_smem());
#endif
}

// Stages ranks [k0, k0 + kc) of rows [row0, row0 + kBM) of X (ldx = its row length, the rank) and of columns
// [col0, col0 + kBN) of Y (ldy = n) into shared memory, zero-padded past the matrix edges and past kc, so that
// the rebuild and the contractions need no bounds checks. With kTransposed, also the row-major copies Bt/At used
// by the backward contractions.
template <bool kTransposed, typename T, typename Acc>
__device__ void stage_chunk(const T* __restrict__ X, const T* __restrict__ Y, int64_t rank, int64_t k0, int kc,
                            int64_t m, int64_t n, int64_t row0, int64_t col0, Acc* sm) {
  Acc* Bk = sm + kOffBk;
  Acc* Ak = sm + kOffAk;
  Acc* Bt = sm + kOffBt;
  Acc* At = sm + kOffAt;
  for (int e = threadIdx.x; e < kBM * kRC; e += kThreads) {
    const int ii = e / kRC, kk = e % kRC;  // kk fastest: contiguous global reads along a row of X
    Acc v = Acc(0);
    if (kk < kc && row0 + ii < m) v = static_cast<Acc>(X[(row0 + ii) * rank + k0 + kk]);
    Bk[kk * kBMP + ii] = v;
    if (kTransposed) Bt[ii * kRCP + kk] = v;
  }
  for (int e = threadIdx.x; e < kRC * kBN; e += kThreads) {
    const int kk = e / kBN, jj = e % kBN;  // jj fastest: contiguous global reads along a row of Y
    Acc v = Acc(0);
    if (kk < kc && col0 + jj < n) v = static_cast<Acc>(Y[(k0 + kk) * n + col0 + jj]);
    Ak[kk * kBN + jj] = v;
    if (kTransposed) At[jj * kRCP + kk] = v;
  }
}

// acc[p][q] += sum_k Bk[k][ty*4+p] * Ak[k][col(q)] over the staged chunk (rows/columns as in the file comment).
template <typename Acc>
__device__ __forceinline__ void rebuild_chunk(const Acc* sm, int kc, int tx, int ty, Acc (&acc)[4][8]) {
  const Acc* Bk = sm + kOffBk;
  const Acc* Ak = sm + kOffAk;
#pragma unroll 2
  for (int kk = 0; kk < kc; ++kk) {
    const Vec4<Acc> b = ld4(Bk + kk * kBMP + ty * 4);
    const Vec4<Acc> a0 = ld4(Ak + kk * kBN + tx * 4);
    const Vec4<Acc> a1 = ld4(Ak + kk * kBN + 64 + tx * 4);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc[p][q] += b.v[p] * a0.v[q];
        acc[p][q + 4] += b.v[p] * a1.v[q];
      }
    }
  }
}

// Rebuilds the unscaled product X[rows] @ Y[:, cols] for the tile into acc (zeroed first), chunk by chunk.
// Leaves the last chunk staged; returns its start (or -1 when rank == 0) so the backward can reuse it.
template <bool kTransposed, typename T, typename Acc>
__device__ int64_t rebuild(const T* X, const T* Y, int64_t rank, int64_t m, int64_t n, int64_t row0, int64_t col0,
                           Acc* sm, int tx, int ty, Acc (&acc)[4][8]) {
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[p][q] = Acc(0);
  int64_t last = -1;
  for (int64_t k0 = 0; k0 < rank; k0 += kRC) {
    const int kc = static_cast<int>(imin(kRC, rank - k0));
    __syncthreads();  // previous users of the chunk buffers are done
    stage_chunk<kTransposed>(X, Y, rank, k0, kc, m, n, row0, col0, sm);
    __syncthreads();
    rebuild_chunk(sm, kc, tx, ty, acc);
    last = k0;
  }
  return last;
}

// Loads 4 consecutive metric values of one row starting at column col (zeros past n).
template <typename TM, typename Acc>
__device__ __forceinline__ void load_quad(const TM* __restrict__ row_ptr, int64_t col, int64_t n, bool vec, Acc (&o)[4]) {
  if (vec) {  // n % 4 == 0 and col % 4 == 0: the quad is entirely in or entirely out
    if (col < n) {
      const Vec4<TM> v = ld4(row_ptr + col);
#pragma unroll
      for (int i = 0; i < 4; ++i) o[i] = static_cast<Acc>(v.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[i] = Acc(0);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = col + i < n ? static_cast<Acc>(row_ptr[col + i]) : Acc(0);
  }
}

// Asks L2 to fetch the metric cells (F, H, M) this thread will read in tile (rt, ct): issued one tile ahead, it
// turns the element phase's DRAM-latency stalls into L2 hits without holding registers. One hint per 128-byte line
// (threads whose quad starts a line); a pure hint: never faults, no effect on results.
template <typename T, typename TM, typename Acc>
__device__ __forceinline__ void prefetch_metrics(const TermsArgs<T, TM, Acc>& a, int64_t rt, int64_t ct, int tx,
                                                 int ty) {
#ifndef AGL_CUDA_EMULATION
  if ((tx * 4 * sizeof(TM)) % 128 != 0) return;
  const TM* const bases[3] = {a.F, a.H, a.M};
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int64_t row = rt * kBM + ty * 4 + p;
    if (row >= a.m) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t col = ct * kBN + h * 64 + tx * 4;
      if (col >= a.n) continue;
#pragma unroll
      for (int b = 0; b < 3; ++b) {
        if (bases[b] != nullptr) asm volatile("prefetch.global.L2 [%0];" ::"l"(bases[b] + row * a.n + col));
      }
    }
  }
#else
  (void)a, (void)rt, (void)ct, (void)tx, (void)ty;
#endif
}

// The tile after (rt, ct) in a block's walk (rows outer, columns inner), or rt = -1 past the end.
__device__ __forceinline__ void next_tile(int64_t rt, int64_t ct, int64_t ct0, int64_t rt1, int64_t ct1, int64_t& nrt,
                                          int64_t& nct) {
  nrt = rt, nct = ct + 1;
  if (nct >= ct1) nrt = rt + 1, nct = ct0;
  if (nrt >= rt1) nrt = -1;
}

// Metric values (g, h, mask) of the 8 elements a thread owns in one row; g = h = 1 when absent.
template <typename TM, typename Acc>
struct RowMetrics {
  Acc g[8], h[8], msk[8];
};

template <typename T, typename TM, typename Acc>
__device__ __forceinline__ void load_row_metrics(const TermsArgs<T, TM, Acc>& a, bool vec, int64_t row, int64_t c0,
                                                 int64_t c1, RowMetrics<TM, Acc>& rm) {
  const int64_t off = row * a.n;
  Acc t0[4], t1[4];
  if (a.F) {
    load_quad(a.F + off, c0, a.n, vec, t0);
    load_quad(a.F + off, c1, a.n, vec, t1);
#pragma unroll
    for (int q = 0; q < 4; ++q) rm.g[q] = t0[q], rm.g[q + 4] = t1[q];
  } else {
#pragma unroll
    for (int q = 0; q < 8; ++q) rm.g[q] = Acc(1);
  }
  if (a.H) {
    load_quad(a.H + off, c0, a.n, vec, t0);
    load_quad(a.H + off, c1, a.n, vec, t1);
#pragma unroll
    for (int q = 0; q < 4; ++q) rm.h[q] = t0[q], rm.h[q + 4] = t1[q];
  } else {
#pragma unroll
    for (int q = 0; q < 8; ++q) rm.h[q] = Acc(1);
  }
  if (a.M) {
    load_quad(a.M + off, c0, a.n, vec, t0);
    load_quad(a.M + off, c1, a.n, vec, t1);
#pragma unroll
    for (int q = 0; q < 4; ++q) rm.msk[q] = t0[q], rm.msk[q + 4] = t1[q];
  } else {
#pragma unroll
    for (int q = 0; q < 8; ++q) rm.msk[q] = Acc(0);
  }
}

// Fixed-order block sum of v[0..4]; the result is valid in thread 0. red: 5 * (kThreads / 32) Acc of shared memory.
template <typename Acc>
__device__ void block_sum5(Acc (&v)[kNumSums], Acc* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // red may alias buffers other threads still read
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
}

// ---------------------------------------------------------------- forward ----------------------------------------
template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads, min_blocks<Acc>())
    terms_fwd_kernel(const KParams<T, TM, Acc> kp, Acc* __restrict__ part /* [Pr * Pc][5] */) {
  Acc* sm = dynamic_smem<Acc>();
  const TermsArgs<T, TM, Acc>& a = kp.a;
  const Plan& pl = kp.plan;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const bool mask = a.M != nullptr;
  const bool align = !mask && a.ra > 0;

  Acc sums[kNumSums] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
  const int64_t rt0 = blockIdx.y * pl.tpr, ct0 = blockIdx.x * pl.tpc;
  const int64_t rt1 = imin(pl.Tr, rt0 + pl.tpr);
  const int64_t ct1 = imin(pl.Tc, ct0 + pl.tpc);
  prefetch_metrics(a, rt0, ct0, tx, ty);
  for (int64_t rt = rt0; rt < rt1; ++rt) {
    for (int64_t ct = ct0; ct < ct1; ++ct) {
      const int64_t row0 = rt * kBM, col0 = ct * kBN;
      int64_t nrt, nct;
      next_tile(rt, ct, ct0, rt1, ct1, nrt, nct);
      if (nrt >= 0) prefetch_metrics(a, nrt, nct, tx, ty);
      Acc d[4][8], da[4][8];
      rebuild<false>(a.B, a.A, a.r, a.m, a.n, row0, col0, sm, tx, ty, d);
      if (align) {
        rebuild<false>(a.Ba, a.Aa, a.ra, a.m, a.n, row0, col0, sm, tx, ty, da);
      }
      const int64_t c0 = col0 + tx * 4, c1 = col0 + 64 + tx * 4;
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int64_t row = row0 + ty * 4 + p;
        if (row >= a.m) continue;
        RowMetrics<TM, Acc> rm;
        load_row_metrics(a, kp.vec, row, c0, c1, rm);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int64_t col = (q < 4 ? c0 : c1) + (q & 3);
          if (col >= a.n) continue;
          const Acc dv = a.scale * d[p][q];
          const Acc dav = mask ? rm.msk[q] * dv : (align ? a.scale * da[p][q] : Acc(0));
          accumulate_forward(dv, dav, rm.g[q], rm.h[q], a.eta, sums);
        }
      }
    }
  }
  block_sum5(sums, sm);  // reuses the chunk buffers (block_sum5 synchronises first)
  if (threadIdx.x == 0) {
    Acc* out = part + (static_cast<int64_t>(blockIdx.y) * pl.Pc + blockIdx.x) * kNumSums;
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) out[k] = sums[k];
  }
}

// One block: sums the per-block rows of partial sums in a fixed order, then forms the four terms from the sums.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_sums_kernel(const Acc* __restrict__ part, int64_t rows, Acc N,
                                                               Acc eps, Acc* __restrict__ terms,
                                                               Acc* __restrict__ sums) {
  Acc* red = dynamic_smem<Acc>();  // kNumSums * (kThreads / 32)
  Acc v[kNumSums] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int64_t b = threadIdx.x; b < rows; b += kThreads) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) v[k] += part[b * kNumSums + k];
  }
  block_sum5(v, red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) sums[k] = v[k];
    Acc t[kNumTerms];
    terms_from_sums(v, N, eps, t);
#pragma unroll
    for (int k = 0; k < kNumTerms; ++k) terms[k] = t[k];
  }
}

// ---------------------------------------------------------------- backward ---------------------------------------
// Workspace pointers of the backward partials (Acc): dB_part [Pc][m][r], dA_part [Pr][r][n], same for the align pair.
template <typename Acc>
struct BwdParts {
  Acc* dB;
  Acc* dA;
  Acc* dBa;
  Acc* dAa;
};

// Contracts the tile's P (in shared memory) with the staged chunk [k0, k0 + kc) of (X, Y):
//   dY_part[by][k][j] (+)= sum_i Bt[i][k] * P[i][j]   (thread: column j = tid % 128, ranks (tid / 128) * 8 + 0..7)
//   dX_part[bx][i][k] (+)= sum_j P[i][j] * At[j][k]   (thread: row i = tid % 64, ranks (tid / 64) * 4 + 0..3)
// The first tile of the block touching a slot writes it, later ones add: no initialisation, no races (a slot is only
// ever touched by the same thread of the same block).
template <typename Acc>
__device__ void contract_chunk(const Acc* sm, const Acc* P, int64_t k0, int kc, int64_t rank, int64_t m, int64_t n,
                               int64_t row0, int64_t col0, bool first_row_tile, bool first_col_tile,
                               Acc* __restrict__ dX_part /* this column group's [m][rank] */,
                               Acc* __restrict__ dY_part /* this row group's [rank][n] */) {
  const Acc* Bt = sm + kOffBt;
  const Acc* At = sm + kOffAt;
  {  // dY: columns
    const int j = threadIdx.x % kBN, kg = (threadIdx.x / kBN) * 8;
    Acc acc[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[t] = Acc(0);
#pragma unroll 4
    for (int i = 0; i < kBM; ++i) {
      const Acc pv = P[i * kPP + j];
      const Vec4<Acc> b0 = ld4(Bt + i * kRCP + kg);
      const Vec4<Acc> b1 = ld4(Bt + i * kRCP + kg + 4);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        acc[t] += b0.v[t] * pv;
        acc[t + 4] += b1.v[t] * pv;
      }
    }
    const int64_t col = col0 + j;
    if (col < n) {
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (kg + t < kc) {
          Acc* dst = dY_part + (k0 + kg + t) * n + col;
          *dst = first_row_tile ? acc[t] : *dst + acc[t];
        }
      }
    }
  }
  {  // dX: rows
    const int i = threadIdx.x % kBM, kg = (threadIdx.x / kBM) * 4;
    Acc acc[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) acc[t] = Acc(0);
#pragma unroll 4
    for (int j = 0; j < kBN; ++j) {
      const Acc pv = P[i * kPP + j];
      const Vec4<Acc> av = ld4(At + j * kRCP + kg);
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[t] += pv * av.v[t];
    }
    const int64_t row = row0 + i;
    if (row < m) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (kg + t < kc) {
          Acc* dst = dX_part + row * rank + k0 + kg + t;
          *dst = first_col_tile ? acc[t] : *dst + acc[t];
        }
      }
    }
  }
}

// All chunks of one factor pair, last chunk first (it may still be staged from the rebuild: then no reload).
template <typename T, typename Acc>
__device__ void contract_pair(const T* X, const T* Y, int64_t rank, const Acc* P, int64_t m, int64_t n, int64_t row0,
                              int64_t col0, bool first_row_tile, bool first_col_tile, Acc* dX_part, Acc* dY_part,
                              Acc* sm, int64_t& staged /* chunk start in the buffers, or -1 */, bool pair_is_staged) {
  if (rank <= 0) return;
  for (int64_t k0 = ((rank - 1) / kRC) * kRC; k0 >= 0; k0 -= kRC) {
    const int kc = static_cast<int>(imin(kRC, rank - k0));
    if (!(pair_is_staged && staged == k0)) {
      __syncthreads();
      stage_chunk<true>(X, Y, rank, k0, kc, m, n, row0, col0, sm);
      staged = -1;  // the other pair's chunk is gone
    }
    __syncthreads();  // staging (or the P/Q writes) visible to all
    contract_chunk(sm, P, k0, kc, rank, m, n, row0, col0, first_row_tile, first_col_tile, dX_part, dY_part);
    pair_is_staged = false;  // after one pass the buffers hold chunks of this pair that we do not track
  }
}

template <typename T, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads, min_blocks<Acc>())
    terms_bwd_kernel(const KParams<T, TM, Acc> kp, const TermsGrads<T, Acc> gr, const BwdParts<Acc> parts) {
  Acc* sm = dynamic_smem<Acc>();
  Acc* Ps = sm + kOffP;
  Acc* Qs = sm + kOffQ;
  Acc* gs = sm + kOffGs;  // dL/dsums, formed once per block from dL/dterms and the sums in device memory
  const TermsArgs<T, TM, Acc>& a = kp.a;
  if (threadIdx.x == 0) {
    Acc S[kNumSums], gt[kNumTerms], g5[kNumSums];
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) S[k] = gr.S_dev[k];
#pragma unroll
    for (int k = 0; k < kNumTerms; ++k) gt[k] = gr.gt_dev[k];
    grad_sums_from_grad_terms(S, gt, static_cast<Acc>(a.m) * static_cast<Acc>(a.n), a.eps, g5);
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) gs[k] = g5[k];
  }
  __syncthreads();  // gs visible to all (nothing else may be ordered before the first rebuild's barrier)
  const Plan& pl = kp.plan;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const bool mask = a.M != nullptr;
  const bool align = !mask && a.ra > 0;
  const int64_t bx = blockIdx.x, by = blockIdx.y;

  // This block's slices of the partials.
  Acc* dB_part = parts.dB + bx * a.m * a.r;
  Acc* dA_part = parts.dA + by * a.r * a.n;
  Acc* dBa_part = align ? parts.dBa + bx * a.m * a.ra : nullptr;
  Acc* dAa_part = align ? parts.dAa + by * a.ra * a.n : nullptr;

  const int64_t rt0 = by * pl.tpr, ct0 = bx * pl.tpc;
  const int64_t rt1 = imin(pl.Tr, rt0 + pl.tpr);
  const int64_t ct1 = imin(pl.Tc, ct0 + pl.tpc);
  prefetch_metrics(a, rt0, ct0, tx, ty);
  for (int64_t rt = rt0; rt < rt1; ++rt) {
    for (int64_t ct = ct0; ct < ct1; ++ct) {
      const int64_t row0 = rt * kBM, col0 = ct * kBN;
      int64_t nrt, nct;
      next_tile(rt, ct, ct0, rt1, ct1, nrt, nct);
      if (nrt >= 0) prefetch_metrics(a, nrt, nct, tx, ty);
      // 1. Rebuild D (and D_A) for the tile. To keep one 4x8 accumulator live instead of two (no spills), D is
      //    parked in this thread's own cells of the P tile while D_A is rebuilt; the element phase reads it back
      //    and overwrites it with P (same thread, same cells: no barrier needed). The last chunk staged belongs to
      //    the align pair if there is one.
      Acc acc[4][8];
      int64_t staged = rebuild<true>(a.B, a.A, a.r, a.m, a.n, row0, col0, sm, tx, ty, acc);
      bool staged_is_align = false;
      if (align) {
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int q = 0; q < 8; ++q) Ps[(ty * 4 + p) * kPP + (q < 4 ? 0 : 64) + tx * 4 + (q & 3)] = acc[p][q];
        staged = rebuild<true>(a.Ba, a.Aa, a.ra, a.m, a.n, row0, col0, sm, tx, ty, acc);
        staged_is_align = true;
      }
      // 2. Element grads -> P (dL/dD, total in mask mode) and Q (dL/dD_A) tiles in shared memory. P/Q do not alias
      //    the chunk buffers, and the previous tile's readers of P/Q finished at its closing barrier.
      const int64_t c0 = col0 + tx * 4, c1 = col0 + 64 + tx * 4;
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int i = ty * 4 + p;
        const int64_t row = row0 + i;
        RowMetrics<TM, Acc> rm;
        if (row < a.m) load_row_metrics(a, kp.vec, row, c0, c1, rm);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int j = (q < 4 ? tx * 4 : 64 + tx * 4) + (q & 3);
          const int64_t col = col0 + j;
          Acc pv = Acc(0), qv = Acc(0);
          if (row < a.m && col < a.n) {
            const Acc dv = a.scale * (align ? Ps[i * kPP + j] : acc[p][q]);
            const Acc dav = align ? a.scale * acc[p][q] : (mask ? rm.msk[q] * dv : Acc(0));
            Acc dd, dda;
            element_grads(dv, dav, rm.g[q], rm.h[q], a.eta, gs, dd, dda);
            pv = mask ? dd + rm.msk[q] * dda : dd;
            qv = dda;
          }
          Ps[i * kPP + j] = pv;
          if (align) Qs[i * kPP + j] = qv;
        }
      }
      // 3. Contract with the factors (scale applied in the final reduction). Align pair first: its last chunk may
      //    still be staged.
      const bool first_row_tile = rt == rt0, first_col_tile = ct == ct0;
      if (align) {
        contract_pair(a.Ba, a.Aa, a.ra, Qs, a.m, a.n, row0, col0, first_row_tile, first_col_tile, dBa_part, dAa_part,
                      sm, staged, staged_is_align);
      }
      contract_pair(a.B, a.A, a.r, Ps, a.m, a.n, row0, col0, first_row_tile, first_col_tile, dB_part, dA_part, sm,
                    staged, !align);
      __syncthreads();  // P/Q and the chunk buffers are reused by the next tile
    }
  }
}

// out[e] = T(scale * sum_p part[p][e]) for e < count, p in order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const Acc* __restrict__ part, int64_t nparts,
                                                                   int64_t count, Acc scale, T* __restrict__ out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    Acc s = Acc(0);
    for (int64_t p = 0; p < nparts; ++p) s += part[p * count + e];
    out[e] = static_cast<T>(scale * s);
  }
}

// ---------------------------------------------------------------- host helpers -----------------------------------
constexpr size_t kAlignBytes = 256;
size_t round_up(size_t x) { return (x + kAlignBytes - 1) / kAlignBytes * kAlignBytes; }

template <typename TM>
bool vector_ok(const TM* p, int64_t n) {
  return p == nullptr || (n % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(TM)) == 0);
}

template <typename T, typename TM, typename Acc>
bool metrics_vectorisable(const TermsArgs<T, TM, Acc>& a) {
  return vector_ok(a.F, a.n) && vector_ok(a.H, a.n) && vector_ok(a.M, a.n);
}

// Byte offsets of the backward partials in the workspace.
struct BwdLayout {
  size_t dB = 0, dA = 0, dBa = 0, dAa = 0, total = 0;
};

template <typename T, typename TM, typename Acc>
BwdLayout bwd_layout(const TermsArgs<T, TM, Acc>& a, const Plan& p) {
  const bool align = a.M == nullptr && a.ra > 0;
  const int64_t ra = align ? a.ra : 0;
  BwdLayout l;
  size_t off = 0;
  l.dB = off;
  off += round_up(static_cast<size_t>(p.Pc * a.m * a.r) * sizeof(Acc));
  l.dA = off;
  off += round_up(static_cast<size_t>(p.Pr * a.r * a.n) * sizeof(Acc));
  l.dBa = off;
  off += round_up(static_cast<size_t>(p.Pc * a.m * ra) * sizeof(Acc));
  l.dAa = off;
  off += round_up(static_cast<size_t>(p.Pr * ra * a.n) * sizeof(Acc));
  l.total = off;
  return l;
}

#ifndef AGL_CUDA_EMULATION  // everything below talks to the CUDA runtime
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("agl CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

int current_sm_count() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return std::max(sms, 1);
}

// Resident blocks per SM of a kernel with `smem` bytes of dynamic shared memory. On first use on a device it also
// raises the kernel's dynamic shared-memory limit (needed above 48 KB; the workspace query always precedes the
// launch). Cached per device, one cache per kernel instantiation (the caller's); a race only repeats idempotent calls.
constexpr int kMaxDevices = 64;

template <typename Kernel>
int prepare_kernel(Kernel kernel, size_t smem, std::atomic<int>* cache /* [kMaxDevices] */) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  int blocks = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  blocks = std::max(blocks, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <typename T, typename TM, typename Acc>
Plan fwd_plan(const TermsArgs<T, TM, Acc>& a, size_t& smem) {
  smem = std::max<size_t>(kSmemFwd, kNumSums * (kThreads / 32)) * sizeof(Acc);
  static std::atomic<int> cache[kMaxDevices] = {};
  const int occ = prepare_kernel(terms_fwd_kernel<T, TM, Acc>, smem, cache);
  return make_plan(a.m, a.n, static_cast<int64_t>(occ) * current_sm_count());
}

template <typename T, typename TM, typename Acc>
Plan bwd_plan(const TermsArgs<T, TM, Acc>& a, size_t& smem) {
  smem = static_cast<size_t>(kSmemBwd) * sizeof(Acc);
  static std::atomic<int> cache[kMaxDevices] = {};
  const int occ = prepare_kernel(terms_bwd_kernel<T, TM, Acc>, smem, cache);
  return make_plan(a.m, a.n, static_cast<int64_t>(occ) * current_sm_count());
}



template <typename T, typename Acc>
void launch_reduce_partials(const Acc* part, int64_t nparts, int64_t count, Acc scale, T* out, cudaStream_t stream) {
  if (count <= 0) return;
  const int64_t blocks = std::min<int64_t>(cdiv(count, kThreads), 65535);
  reduce_partials_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(part, nparts, count, scale, out);
  check_cuda(cudaGetLastError(), "agl reduce_partials_kernel launch");
}

template <typename T>
void zero_out(T* p, int64_t count, cudaStream_t stream) {
  if (p != nullptr && count > 0) {
    check_cuda(cudaMemsetAsync(p, 0, static_cast<size_t>(count) * sizeof(T), stream), "cudaMemsetAsync");
  }
}

#endif  // AGL_CUDA_EMULATION
}  // namespace

#ifndef AGL_CUDA_EMULATION
// ---------------------------------------------------------------- entry points -----------------------------------
template <typename T, typename TM, typename Acc>
size_t terms_fwd_cuda_workspace(const TermsArgs<T, TM, Acc>& a) {
  if (a.m <= 0 || a.n <= 0) return 0;
  size_t smem = 0;
  const Plan p = fwd_plan(a, smem);
  return static_cast<size_t>(p.Pr * p.Pc) * kNumSums * sizeof(Acc);
}

template <typename T, typename TM, typename Acc>
void terms_fwd_cuda(const TermsArgs<T, TM, Acc>& a, Acc* terms, Acc* sums, void* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const Acc N = static_cast<Acc>(a.m) * static_cast<Acc>(a.n);
  const size_t red_smem = kNumSums * (kThreads / 32) * sizeof(Acc);
  if (a.m <= 0 || a.n <= 0) {  // empty grid: zero sums, terms of an empty mean (no partials to read)
    reduce_sums_kernel<Acc><<<1, kThreads, red_smem, stream>>>(nullptr, 0, N, a.eps, terms, sums);
    check_cuda(cudaGetLastError(), "agl reduce_sums_kernel launch");
    return;
  }
  size_t smem = 0;
  const Plan p = fwd_plan(a, smem);
  KParams<T, TM, Acc> kp{a, p, metrics_vectorisable(a)};
  Acc* part = static_cast<Acc*>(workspace);
  const dim3 grid(static_cast<unsigned>(p.Pc), static_cast<unsigned>(p.Pr));
  terms_fwd_kernel<T, TM, Acc><<<grid, kThreads, smem, stream>>>(kp, part);
  check_cuda(cudaGetLastError(), "agl terms_fwd_kernel launch");
  reduce_sums_kernel<Acc><<<1, kThreads, red_smem, stream>>>(part, p.Pr * p.Pc, N, a.eps, terms, sums);
  check_cuda(cudaGetLastError(), "agl reduce_sums_kernel launch");
}

template <typename T, typename TM, typename Acc>
size_t terms_bwd_cuda_workspace(const TermsArgs<T, TM, Acc>& a) {
  if (a.m <= 0 || a.n <= 0) return 0;
  size_t smem = 0;
  const Plan p = bwd_plan(a, smem);
  return bwd_layout(a, p).total;
}

template <typename T, typename TM, typename Acc>
void terms_bwd_cuda(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g, void* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool align = a.M == nullptr && a.ra > 0;
  if (a.m <= 0 || a.n <= 0) {  // empty sums: every gradient is zero
    zero_out(g.dB, a.m * a.r, stream);
    zero_out(g.dA, a.r * a.n, stream);
    zero_out(g.dBa, a.m * a.ra, stream);
    zero_out(g.dAa, a.ra * a.n, stream);
    return;
  }
  if (g.gt_dev == nullptr || g.S_dev == nullptr) {
    throw std::invalid_argument("agl terms_bwd_cuda: TermsGrads::gt_dev and S_dev (the grads of the terms and the "
                                "sums, in device memory) are required; the CUDA kernels do not read the host copy gs");
  }
  size_t smem = 0;
  const Plan p = bwd_plan(a, smem);
  const BwdLayout l = bwd_layout(a, p);
  char* ws = static_cast<char*>(workspace);
  const BwdParts<Acc> parts{reinterpret_cast<Acc*>(ws + l.dB), reinterpret_cast<Acc*>(ws + l.dA),
                            reinterpret_cast<Acc*>(ws + l.dBa), reinterpret_cast<Acc*>(ws + l.dAa)};
  KParams<T, TM, Acc> kp{a, p, metrics_vectorisable(a)};
  const dim3 grid(static_cast<unsigned>(p.Pc), static_cast<unsigned>(p.Pr));
  terms_bwd_kernel<T, TM, Acc><<<grid, kThreads, smem, stream>>>(kp, g, parts);
  check_cuda(cudaGetLastError(), "agl terms_bwd_kernel launch");
  launch_reduce_partials(parts.dB, p.Pc, a.m * a.r, a.scale, g.dB, stream);
  launch_reduce_partials(parts.dA, p.Pr, a.r * a.n, a.scale, g.dA, stream);
  if (align) {
    launch_reduce_partials(parts.dBa, p.Pc, a.m * a.ra, a.scale, g.dBa, stream);
    launch_reduce_partials(parts.dAa, p.Pr, a.ra * a.n, a.scale, g.dAa, stream);
  } else {  // mask mode or no align pair: B_align/A_align grads (if the glue asks for any) are zero
    zero_out(g.dBa, a.m * a.ra, stream);
    zero_out(g.dAa, a.ra * a.n, stream);
  }
}

// ---------------------------------------------------------------- instantiations ---------------------------------
#define AGL_INSTANTIATE_CUDA(T, TM, ACC)                                                                            \
  template size_t terms_fwd_cuda_workspace<T, TM, ACC>(const TermsArgs<T, TM, ACC>&);                               \
  template void terms_fwd_cuda<T, TM, ACC>(const TermsArgs<T, TM, ACC>&, ACC*, ACC*, void*, void*);                 \
  template size_t terms_bwd_cuda_workspace<T, TM, ACC>(const TermsArgs<T, TM, ACC>&);                               \
  template void terms_bwd_cuda<T, TM, ACC>(const TermsArgs<T, TM, ACC>&, const TermsGrads<T, ACC>&, void*, void*);

#ifndef AGL_CUDA_QUICK  // -DAGL_CUDA_QUICK: two instantiations only, for quick register checks while editing
AGL_FOR_EACH_TERMS_COMBO(AGL_INSTANTIATE_CUDA)
#else
AGL_INSTANTIATE_CUDA(float, float, float)
AGL_INSTANTIATE_CUDA(c10::BFloat16, c10::BFloat16, float)
#endif

#endif  // AGL_CUDA_EMULATION

}  // namespace agl
