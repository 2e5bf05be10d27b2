// The double-precision oracle of the fused op (a plain loop over the grid), shared by the emulators.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "agl_math.h"

namespace agl_emu {
using namespace agl;

struct Problem {
  int64_t m, n, r, ra;
  bool mask, fisher, task;
  int64_t slots;
  std::vector<double> B, A, Ba, Aa, F, H, M;  // values already rounded to the kernel's input types
};

inline void oracle(const Problem& P, double s, const EtaParams<double>& eta, const double* gs, double* sums,
                   std::vector<double>& dB, std::vector<double>& dA, std::vector<double>& dBa, std::vector<double>& dAa) {
  const int64_t m = P.m, n = P.n, r = P.r, ra = P.mask ? 0 : P.ra;
  for (int k = 0; k < kNumSums; ++k) sums[k] = 0;
  dB.assign(m * r, 0);
  dA.assign(r * n, 0);
  dBa.assign(m * ra, 0);
  dAa.assign(ra * n, 0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double d = 0, da = 0;
      for (int64_t k = 0; k < r; ++k) d += P.B[i * r + k] * P.A[k * n + j];
      for (int64_t k = 0; k < ra; ++k) da += P.Ba[i * ra + k] * P.Aa[k * n + j];
      d *= s;
      da *= s;
      const double mk = P.mask ? P.M[i * n + j] : 0;
      if (P.mask) da = mk * d;
      const double gv = P.fisher ? P.F[i * n + j] : 1, hv = P.task ? P.H[i * n + j] : 1;
      accumulate_forward(d, da, gv, hv, eta, sums);
      double dd, dda;
      element_grads(d, da, gv, hv, eta, gs, dd, dda);
      const double pv = P.mask ? dd + mk * dda : dd;
      for (int64_t k = 0; k < r; ++k) {
        dB[i * r + k] += s * pv * P.A[k * n + j];
        dA[k * n + j] += s * P.B[i * r + k] * pv;
      }
      for (int64_t k = 0; k < ra; ++k) {
        dBa[i * ra + k] += s * dda * P.Aa[k * n + j];
        dAa[k * n + j] += s * P.Ba[i * ra + k] * dda;
      }
    }
  }
}

template <typename U>
inline std::vector<U> to_type(const std::vector<double>& v) {
  std::vector<U> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<U>(v[i]);
  return o;
}

inline double max_rel(const std::vector<double>& x, const std::vector<double>& ref, bool& finite) {
  double num = 0, den = 0;
  finite = true;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) finite = false;
    num = std::max(num, std::fabs(x[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return den > 0 ? num / den : num;
}

}  // namespace agl_emu
