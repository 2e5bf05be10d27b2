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
//   grad_A[k,:] += s * B[i,k] * P                 (into a per-chunk r x n partial, reduced in chunk order)
// and the same with Q for B_align/A_align. Extra memory: O(chunks * (r + ra) * n + chunks * n + (r + ra) * n).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "agl_kernels.h"

namespace agl {
namespace {

constexpr int64_t kMaxChunks = 32;     // upper bound of row chunks (fixed: independent of the thread count)
constexpr int64_t kMinChunkRows = 16;  // fewer, larger chunks for small m
constexpr int kLanes = 16;             // lane-wise partial sums (vectorisable, fixed summation order)

int64_t num_chunks(int64_t m) {
  if (m <= 0) return 0;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (m + kMinChunkRows - 1) / kMinChunkRows));
}
inline int64_t chunk_begin(int64_t c, int64_t nchunks, int64_t m) { return (m * c) / nchunks; }

template <typename Acc, typename T>
inline Acc to_acc(T x) {
  return static_cast<Acc>(x);
}

// Factors converted to the accumulation type once per call (O((m + n) r) memory), or used in place when T == Acc.
template <typename T, typename Acc>
struct AccView {
  std::vector<Acc> storage;
  const Acc* ptr = nullptr;
  void init(const T* src, int64_t count) {
    if (src == nullptr || count == 0) {
      ptr = nullptr;
      return;
    }
    if constexpr (std::is_same<T, Acc>::value) {
      ptr = src;
    } else {
      storage.resize(count);
      for (int64_t i = 0; i < count; ++i) storage[i] = to_acc<Acc>(src[i]);
      ptr = storage.data();
    }
  }
};

// out[j] = s * sum_k b[k] * A[k, j]  (k ascending: fixed order). r == 0 gives zeros.
template <typename Acc>
inline void rebuild_row(const Acc* b, const Acc* A, int64_t r, int64_t n, Acc s, Acc* out) {
  if (r == 0) {
    std::fill(out, out + n, Acc(0));
    return;
  }
  {
    const Acc b0 = b[0];
    for (int64_t j = 0; j < n; ++j) out[j] = b0 * A[j];
  }
  for (int64_t k = 1; k < r; ++k) {
    const Acc bk = b[k];
    const Acc* Ak = A + k * n;
    for (int64_t j = 0; j < n; ++j) out[j] += bk * Ak[j];
  }
  for (int64_t j = 0; j < n; ++j) out[j] *= s;
}

// sum_j x[j] * y[j] with kLanes lane-wise partial sums combined in a fixed order (vectorisable, deterministic).
template <typename Acc>
inline Acc dot_lanes(const Acc* x, const Acc* y, int64_t n) {
  Acc lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l] * y[j + l];
  for (int l = 0; j < n; ++j, ++l) lane[l] += x[j] * y[j];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// Per-chunk row buffers.
template <typename Acc>
struct RowBufs {
  std::vector<Acc> d, da, g, h, sig, bi, bai;
  void init(int64_t n, int64_t r, int64_t ra) {
    d.resize(n);
    da.resize(n);
    g.resize(n);
    h.resize(n);
    sig.resize(n);
    bi.resize(std::max<int64_t>(r, 1));
    bai.resize(std::max<int64_t>(ra, 1));
  }
};

// Rebuilds the i-th rows of D, D_A, G, H and the sigmoids of eta into the buffers.
template <typename T, typename TM, typename Acc>
inline void load_row(const TermsArgs<T, TM, Acc>& a, const Acc* A, const Acc* Aa, int64_t i, RowBufs<Acc>& rb) {
  const int64_t n = a.n, r = a.r, ra = a.ra;
  for (int64_t k = 0; k < r; ++k) rb.bi[k] = to_acc<Acc>(a.B[i * r + k]);
  rebuild_row(rb.bi.data(), A, r, n, a.scale, rb.d.data());
  Acc* d = rb.d.data();
  Acc* da = rb.da.data();
  if (a.M != nullptr) {
    const TM* Mi = a.M + i * n;
    for (int64_t j = 0; j < n; ++j) da[j] = to_acc<Acc>(Mi[j]) * d[j];
  } else if (a.Ba != nullptr) {
    for (int64_t k = 0; k < ra; ++k) rb.bai[k] = to_acc<Acc>(a.Ba[i * ra + k]);
    rebuild_row(rb.bai.data(), Aa, ra, n, a.scale, da);
  } else {
    std::fill(da, da + n, Acc(0));
  }
  Acc* g = rb.g.data();
  Acc* h = rb.h.data();
  if (a.F != nullptr) {
    const TM* Fi = a.F + i * n;
    for (int64_t j = 0; j < n; ++j) g[j] = to_acc<Acc>(Fi[j]);
  } else {
    std::fill(g, g + n, Acc(1));
  }
  if (a.H != nullptr) {
    const TM* Hi = a.H + i * n;
    for (int64_t j = 0; j < n; ++j) h[j] = to_acc<Acc>(Hi[j]);
  } else {
    std::fill(h, h + n, Acc(1));
  }
  Acc* sig = rb.sig.data();
  for (int64_t j = 0; j < n; ++j) sig[j] = eta_sigmoid(d[j], a.eta);
}

}  // namespace

template <typename T, typename TM, typename Acc>
void terms_fwd_cpu(const TermsArgs<T, TM, Acc>& a, Acc* sums) {
  const int64_t m = a.m, n = a.n;
  const int64_t nchunks = num_chunks(m);
  AccView<T, Acc> Av, Aav;
  Av.init(a.A, a.r * n);
  Aav.init(a.Ba != nullptr ? a.Aa : nullptr, a.ra * n);
  std::vector<double> partial(static_cast<size_t>(nchunks) * kNumSums, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    RowBufs<Acc> rb;
    rb.init(n, a.r, a.ra);
    for (int64_t c = c0; c < c1; ++c) {
      double acc[kNumSums] = {0, 0, 0, 0, 0};
      for (int64_t i = chunk_begin(c, nchunks, m); i < chunk_begin(c + 1, nchunks, m); ++i) {
        load_row(a, Av.ptr, Aav.ptr, i, rb);
        const Acc* d = rb.d.data();
        const Acc* da = rb.da.data();
        const Acc* g = rb.g.data();
        const Acc* h = rb.h.data();
        const Acc* sig = rb.sig.data();
        Acc lane[kNumSums][kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            Acc s[kNumSums] = {0, 0, 0, 0, 0};
            accumulate_forward_sig(d[j + l], da[j + l], g[j + l], h[j + l], sig[j + l], a.eta, s);
            for (int k = 0; k < kNumSums; ++k) lane[k][l] += s[k];
          }
        }
        for (int l = 0; j < n; ++j, ++l) {
          Acc s[kNumSums] = {0, 0, 0, 0, 0};
          accumulate_forward_sig(d[j], da[j], g[j], h[j], sig[j], a.eta, s);
          for (int k = 0; k < kNumSums; ++k) lane[k][l] += s[k];
        }
        for (int k = 0; k < kNumSums; ++k) {
          double row = 0;
          for (int l = 0; l < kLanes; ++l) row += static_cast<double>(lane[k][l]);
          acc[k] += row;
        }
      }
      for (int k = 0; k < kNumSums; ++k) partial[c * kNumSums + k] = acc[k];
    }
  });
  for (int k = 0; k < kNumSums; ++k) {
    double t = 0;
    for (int64_t c = 0; c < nchunks; ++c) t += partial[c * kNumSums + k];
    sums[k] = static_cast<Acc>(t);
  }
}

template <typename T, typename TM, typename Acc>
void terms_bwd_cpu(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& gr) {
  const int64_t m = a.m, n = a.n, r = a.r;
  const bool has_align = a.Ba != nullptr && a.M == nullptr;
  const int64_t ra = has_align ? a.ra : 0;
  const bool mask = a.M != nullptr;
  const int64_t nchunks = num_chunks(m);
  AccView<T, Acc> Av, Aav;
  Av.init(a.A, r * n);
  Aav.init(has_align ? a.Aa : nullptr, ra * n);
  // Per-chunk partials of grad_A (r x n) and grad_A_align (ra x n), without the factor s.
  std::vector<Acc> pA(static_cast<size_t>(nchunks) * r * n);
  std::vector<Acc> pAa(static_cast<size_t>(nchunks) * ra * n);
  const Acc s = a.scale;
  Acc gs[kNumSums];
  for (int k = 0; k < kNumSums; ++k) gs[k] = gr.gs[k];

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    RowBufs<Acc> rb;
    rb.init(n, r, ra);
    std::vector<Acc> P(n), Q(n);
    for (int64_t c = c0; c < c1; ++c) {
      Acc* gA = pA.data() + c * r * n;
      Acc* gAa = pAa.data() + c * ra * n;
      std::fill(gA, gA + r * n, Acc(0));
      std::fill(gAa, gAa + ra * n, Acc(0));
      for (int64_t i = chunk_begin(c, nchunks, m); i < chunk_begin(c + 1, nchunks, m); ++i) {
        load_row(a, Av.ptr, Aav.ptr, i, rb);
        const Acc* d = rb.d.data();
        const Acc* da = rb.da.data();
        const Acc* g = rb.g.data();
        const Acc* h = rb.h.data();
        const Acc* sig = rb.sig.data();
        Acc* Pp = P.data();
        Acc* Qp = Q.data();
        for (int64_t j = 0; j < n; ++j) {
          Acc dd, dda;
          element_grads_sig(d[j], da[j], g[j], h[j], sig[j], a.eta, gs, dd, dda);
          Pp[j] = dd;
          Qp[j] = dda;
        }
        if (mask) {
          const TM* Mi = a.M + i * n;
          for (int64_t j = 0; j < n; ++j) Pp[j] += to_acc<Acc>(Mi[j]) * Qp[j];
        }
        for (int64_t k = 0; k < r; ++k) {
          const Acc* Ak = Av.ptr + k * n;
          gr.dB[i * r + k] = static_cast<T>(s * dot_lanes(Pp, Ak, n));
          const Acc bk = rb.bi[k];
          Acc* gAk = gA + k * n;
          for (int64_t j = 0; j < n; ++j) gAk[j] += bk * Pp[j];
        }
        for (int64_t k = 0; k < ra; ++k) {
          const Acc* Ak = Aav.ptr + k * n;
          gr.dBa[i * ra + k] = static_cast<T>(s * dot_lanes(Qp, Ak, n));
          const Acc bk = rb.bai[k];
          Acc* gAk = gAa + k * n;
          for (int64_t j = 0; j < n; ++j) gAk[j] += bk * Qp[j];
        }
      }
    }
  });

  // Reduce the chunk partials in chunk order, in parallel over columns (each output element has one owner).
  auto reduce = [&](const std::vector<Acc>& part, int64_t rows, T* out) {
    if (rows == 0 || n == 0) return;
    at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
      std::vector<Acc> tmp(j1 - j0);
      for (int64_t k = 0; k < rows; ++k) {
        std::fill(tmp.begin(), tmp.end(), Acc(0));
        for (int64_t c = 0; c < nchunks; ++c) {
          const Acc* src = part.data() + (c * rows + k) * n;
          for (int64_t j = j0; j < j1; ++j) tmp[j - j0] += src[j];
        }
        for (int64_t j = j0; j < j1; ++j) out[k * n + j] = static_cast<T>(s * tmp[j - j0]);
      }
    });
  };
  if (nchunks == 0) {  // m == 0: grad_A and grad_A_align are zero
    for (int64_t x = 0; x < r * n; ++x) gr.dA[x] = static_cast<T>(0);
    if (gr.dAa != nullptr)
      for (int64_t x = 0; x < a.ra * n; ++x) gr.dAa[x] = static_cast<T>(0);
    return;
  }
  reduce(pA, r, gr.dA);
  reduce(pAa, ra, gr.dAa);
}

#define AGL_INST_CPU(T, TM, Acc)                                                  \
  template void terms_fwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, Acc*); \
  template void terms_bwd_cpu<T, TM, Acc>(const TermsArgs<T, TM, Acc>&, const TermsGrads<T, Acc>&);
AGL_FOR_EACH_TERMS_COMBO(AGL_INST_CPU)
#undef AGL_INST_CPU

}  // namespace agl
