// Element-wise AGL math, written once and compiled for both the CPU kernel (host) and the CUDA kernels (device).
//
// Per grid element (i, j) the fused op sees
//   d  = D[i,j]   = s * (B @ A)[i,j]
//   da = D_A[i,j] = s * (B_align @ A_align)[i,j]   (or M[i,j] * d in mask mode)
//   dt = D_T[i,j] = d - da
//   g  = G[i,j] (fisher or 1), h = H[i,j] (task_metric or 1)
// and contributes to five sums (the forward output of agl::terms_fwd):
//   S[kAlign]      = sum g * da^2
//   S[kTask]       = sum h * dt^2
//   S[kOverlap]    = sum eta(d) * |da| * |dt|,   eta(d) = 1 + beta * sigmoid(kappa * (|d| - tau))
//   S[kCross]      = sum g * da * dt
//   S[kTaskFisher] = sum g * dt^2
// The four terms are scalar functions of the sums (terms_from_sums, evaluated once per call on the device that
// holds the sums), so the backward receives the gradient of the loss w.r.t. each term, gt[t], turns it into the
// gradient w.r.t. each sum, gs[k] (grad_sums_from_grad_terms), and then needs, per element, the partial
// derivatives of
//   L = sum_k gs[k] * S[k]
// w.r.t. d (holding da fixed) and w.r.t. da (holding d fixed); see docs/MATH.md for the derivation.
#pragma once

#if defined(__CUDACC__)
#define AGL_HD __host__ __device__ __forceinline__
#else
#define AGL_HD inline
#endif

#include <math.h>

namespace agl {

enum SumIndex : int { kAlign = 0, kTask = 1, kOverlap = 2, kCross = 3, kTaskFisher = 4, kNumSums = 5 };
enum TermIndex : int { kTermAlign = 0, kTermTask = 1, kTermOverlap = 2, kTermGeodesic = 3, kNumTerms = 4 };

// The four AGL terms from the five sums over N = m * n elements:
//   align = S0 / N,  task = S1 / N,  overlap = S2 / N,  geodesic = S3^2 / (S0 * S4 + eps)
// (N = 0 gives NaN means, like a mean over an empty grid).
template <typename T>
AGL_HD void terms_from_sums(const T* S, T N, T eps, T* out) {
  out[kTermAlign] = S[kAlign] / N;
  out[kTermTask] = S[kTask] / N;
  out[kTermOverlap] = S[kOverlap] / N;
  out[kTermGeodesic] = S[kCross] * S[kCross] / (S[kAlign] * S[kTaskFisher] + eps);
}

// Chain rule through terms_from_sums: gs[k] = sum_t gt[t] * d term_t / d S_k. With den = S0 * S4 + eps and
// geo = S3^2 / den: d geo/d S3 = 2 S3 / den, d geo/d S0 = -geo * S4 / den, d geo/d S4 = -geo * S0 / den.
// A zero gt[geodesic] (the term unused by the loss) contributes exactly nothing, even where den = 0.
template <typename T>
AGL_HD void grad_sums_from_grad_terms(const T* S, const T* gt, T N, T eps, T* gs) {
  gs[kAlign] = gt[kTermAlign] / N;
  gs[kTask] = gt[kTermTask] / N;
  gs[kOverlap] = gt[kTermOverlap] / N;
  gs[kCross] = T(0);
  gs[kTaskFisher] = T(0);
  const T gg = gt[kTermGeodesic];
  if (gg != T(0)) {
    const T den = S[kAlign] * S[kTaskFisher] + eps;
    const T geo = S[kCross] * S[kCross] / den;
    gs[kAlign] -= gg * geo * S[kTaskFisher] / den;
    gs[kCross] = gg * T(2) * S[kCross] / den;
    gs[kTaskFisher] = -gg * geo * S[kAlign] / den;
  }
}

AGL_HD float agl_exp(float x) { return expf(x); }
AGL_HD double agl_exp(double x) { return exp(x); }

// sign with sign(0) = 0 (and NaN -> 0 is avoided: NaN inputs still poison the products they enter).
template <typename T>
AGL_HD T sgn(T x) {
  return static_cast<T>((T(0) < x) - (x < T(0)));
}

template <typename T>
AGL_HD T sigmoid(T x) {
  return T(1) / (T(1) + agl_exp(-x));
}

// Scalar hyper-parameters of the overlap weight eta, in the accumulation type.
template <typename T>
struct EtaParams {
  T beta, tau, kappa;
};

// sigma = sigmoid(kappa * (|d| - tau)), the logistic part of eta(d). The *_sig variants below take it precomputed
// so a CPU loop can evaluate all the exponentials of a row first (one tight loop) and the rest of the arithmetic in
// a second, vectorisable loop; the plain variants compute it themselves. Both give the same arithmetic.
template <typename T>
AGL_HD T eta_sigmoid(T d, const EtaParams<T>& p) {
  return sigmoid(p.kappa * (fabs(d) - p.tau));
}

// Adds the contributions of one element to the five running sums s[0..4].
template <typename T>
AGL_HD void accumulate_forward_sig(T d, T da, T g, T h, T sig, const EtaParams<T>& p, T* s) {
  const T dt = d - da;
  const T eta = T(1) + p.beta * sig;
  s[kAlign] += g * da * da;
  s[kTask] += h * dt * dt;
  s[kOverlap] += eta * fabs(da) * fabs(dt);
  s[kCross] += g * da * dt;
  s[kTaskFisher] += g * dt * dt;
}

template <typename T>
AGL_HD void accumulate_forward(T d, T da, T g, T h, const EtaParams<T>& p, T* s) {
  accumulate_forward_sig(d, da, g, h, eta_sigmoid(d, p), p, s);
}

// Partial derivatives of L = sum_k gs[k] * S[k] at one element:
//   dd  = dL/dd  with da held fixed (D_T = D - D_A moves with D)
//   dda = dL/dda with d held fixed  (D_T moves against D_A)
// In mask mode (da = M * d) the caller forms the total derivative dd + M * dda.
template <typename T>
AGL_HD void element_grads_sig(T d, T da, T g, T h, T sig, const EtaParams<T>& p, const T* gs, T& dd, T& dda) {
  const T dt = d - da;
  const T ada = fabs(da), adt = fabs(dt);
  const T eta = T(1) + p.beta * sig;
  const T deta_dd = p.beta * p.kappa * sig * (T(1) - sig) * sgn(d);
  const T sdt = sgn(dt), sda = sgn(da);
  // d/dd: task (h dt^2), overlap (eta(d) |da| |dt|), cross (g da dt), task-fisher (g dt^2)
  dd = gs[kTask] * T(2) * h * dt + gs[kOverlap] * (deta_dd * ada * adt + eta * ada * sdt) + gs[kCross] * g * da +
       gs[kTaskFisher] * T(2) * g * dt;
  // d/dda: align (g da^2), task, overlap, cross (g da (d - da)), task-fisher
  dda = gs[kAlign] * T(2) * g * da - gs[kTask] * T(2) * h * dt + gs[kOverlap] * eta * (sda * adt - ada * sdt) +
        gs[kCross] * g * (dt - da) - gs[kTaskFisher] * T(2) * g * dt;
}

template <typename T>
AGL_HD void element_grads(T d, T da, T g, T h, const EtaParams<T>& p, const T* gs, T& dd, T& dda) {
  element_grads_sig(d, da, g, h, eta_sigmoid(d, p), p, gs, dd, dda);
}

}  // namespace agl
