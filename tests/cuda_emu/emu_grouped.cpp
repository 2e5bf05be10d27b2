// Runs the grouped CUDA kernels (csrc/cuda/agl_cuda_grouped.cu) on the CPU: one std::thread per CUDA thread, the
// tensor-core instructions through the fragment emulator (emu_mma.h), every buffer starting as NaN. Checks, for
// mixed odd-shaped layers in one call (m, n not multiples of the tiles, r in {1, 3, 8, 16}, r' = 0 and > 0, with and
// without F/H, an empty layer, several bands):
//   * every layer's terms, sums and factor gradients against the double-precision oracle (tolerance per dtype);
//   * bitwise: the same call with a different number of persistent CTAs, and each layer called alone, give the
//     same bits as the grouped call (the shape-only plan at work).
// Build and run (tests/test_cuda_emulation.py does this):
//   g++ -std=c++20 -O1 -pthread -Wno-unknown-pragmas -I csrc -I csrc/cuda -I <torch>/include \
//       tests/cuda_emu/emu_grouped.cpp -o emu_grouped && ./emu_grouped      -> "ALL OK", exit status 0
#include "emu_shim.h"

#include "cuda/agl_cuda_grouped.cu"
#include "emu_oracle.h"

using namespace agl;
using namespace agl_emu;

namespace {

struct LayerSpec {
  int64_t m, n, r, ra;
  bool fisher, task;
};

template <typename T, typename TM>
struct LayerData {
  Problem P;  // values as doubles (already rounded to T / TM) for the oracle
  std::vector<T> B, A, Ba, Aa;
  std::vector<TM> F, H;
};

template <typename T, typename TM, typename Acc>
struct Result {
  std::vector<Acc> terms, sums;
  std::vector<std::vector<T>> dB, dA, dBa, dAa;
};

const EtaParams<double> kEta{4.0, 0.01, 100.0};
constexpr double kScale = 1.3, kEps = 1e-12;

double grad_term(int64_t l, int k) {  // dL/dterms of layer l: not all one, different per layer
  static const double base[kNumTerms] = {0.7, -1.1, 0.9, 1.7};
  return base[k] * (1.0 + 0.1 * double(l));
}

template <typename T, typename TM, typename Acc>
std::vector<LayerData<T, TM>> make_layers(const std::vector<LayerSpec>& specs, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<LayerData<T, TM>> out;
  for (const LayerSpec& s : specs) {
    std::normal_distribution<double> nd(0.0, std::sqrt(0.05 / std::sqrt(double(std::max<int64_t>(s.r, 1)))));
    std::uniform_real_distribution<double> ud(0.1, 2.0);
    LayerData<T, TM> d;
    d.P = Problem{s.m, s.n, s.r, s.ra, false, s.fisher, s.task, 0, {}, {}, {}, {}, {}, {}, {}};
    auto gen = [&](int64_t cnt, auto& dist, bool factor) {
      std::vector<double> v(cnt);
      for (auto& x : v) x = factor ? double(static_cast<Acc>(static_cast<T>(dist(rng))))
                                   : double(static_cast<Acc>(static_cast<TM>(dist(rng))));
      return v;
    };
    d.P.B = gen(s.m * s.r, nd, true);
    d.P.A = gen(s.r * s.n, nd, true);
    d.P.Ba = gen(s.m * s.ra, nd, true);
    d.P.Aa = gen(s.ra * s.n, nd, true);
    if (s.fisher) d.P.F = gen(s.m * s.n, ud, false);
    if (s.task) d.P.H = gen(s.m * s.n, ud, false);
    d.B = to_type<T>(d.P.B), d.A = to_type<T>(d.P.A), d.Ba = to_type<T>(d.P.Ba), d.Aa = to_type<T>(d.P.Aa);
    d.F = to_type<TM>(d.P.F), d.H = to_type<TM>(d.P.H);
    out.push_back(std::move(d));
  }
  return out;
}

// The emulated grouped_terms_fwd_cuda + grouped_terms_bwd_cuda for the layers `which` (in that order), with `ctas` persistent CTAs.
template <typename T, typename TM, typename Acc>
Result<T, TM, Acc> run_grouped(std::vector<LayerData<T, TM>>& layers, const std::vector<int>& which, int64_t ctas) {
  const int64_t L = int64_t(which.size());
  Result<T, TM, Acc> res;
  res.terms.resize(L * kNumTerms), res.sums.resize(L * kNumSums);
  fill_nan(res.terms), fill_nan(res.sums);
  std::vector<GroupedLayerDesc<T, TM, Acc>> table(L);
  res.dB.resize(L), res.dA.resize(L), res.dBa.resize(L), res.dAa.resize(L);
  for (int64_t i = 0; i < L; ++i) {
    LayerData<T, TM>& d = layers[which[i]];
    GroupedLayerDesc<T, TM, Acc>& t = table[i];
    t.m = d.P.m, t.n = d.P.n, t.r = d.P.r, t.ra = d.P.ra;
    t.B = d.B.data(), t.A = d.A.data();
    t.Ba = d.P.ra > 0 ? d.Ba.data() : nullptr, t.Aa = d.P.ra > 0 ? d.Aa.data() : nullptr;
    t.F = d.P.fisher ? d.F.data() : nullptr, t.H = d.P.task ? d.H.data() : nullptr;
    t.scale = Acc(kScale);
    res.dB[i].resize(t.m * t.r), res.dA[i].resize(t.r * t.n), res.dBa[i].resize(t.m * t.ra), res.dAa[i].resize(t.ra * t.n);
    fill_nan(res.dB[i]), fill_nan(res.dA[i]), fill_nan(res.dBa[i]), fill_nan(res.dAa[i]);
    t.dB = res.dB[i].data(), t.dA = res.dA[i].data();
    t.dBa = t.Ba ? res.dBa[i].data() : nullptr, t.dAa = t.Ba ? res.dAa[i].data() : nullptr;
  }
  const GroupedTotals tot = grouped_plan(table);
  const EtaParams<Acc> eta{Acc(kEta.beta), Acc(kEta.tau), Acc(kEta.kappa)};
  const unsigned nct = unsigned(std::max<int64_t>(1, std::min(ctas, tot.items)));

  std::vector<Acc> ws(std::max<int64_t>(tot.ws_fwd, 1));
  fill_nan(ws);
  if (tot.items > 0) {
    launch(dim3{nct, 1, 1}, grouped::kThreads, grouped_smem_bytes(tot.rank_pad, false, sizeof(Acc)), [&] {
      grouped::grouped_fwd_kernel<T, TM, Acc>(table.data(), L, tot.items, tot.rank_pad, eta, ws.data());
    });
  }
  launch(dim3{unsigned(L), 1, 1}, grouped::kThreads, kNumSums * 4 * sizeof(Acc), [&] {
    grouped::grouped_fwd_final_kernel<T, TM, Acc>(table.data(), ws.data(), Acc(kEps), res.terms.data(),
                                                  res.sums.data());
  });

  std::vector<Acc> gt(L * kNumTerms);
  for (int64_t i = 0; i < L; ++i)
    for (int k = 0; k < kNumTerms; ++k) gt[i * kNumTerms + k] = Acc(grad_term(which[i], k));
  std::vector<Acc> wsb(std::max<int64_t>(tot.ws_bwd, 1));
  fill_nan(wsb);
  if (tot.items > 0) {
    launch(dim3{nct, 1, 1}, grouped::kThreads, grouped_smem_bytes(tot.rank_pad, true, sizeof(Acc)), [&] {
      grouped::grouped_bwd_kernel<T, TM, Acc>(table.data(), L, tot.items, tot.rank_pad, eta, Acc(kEps), gt.data(),
                                              res.sums.data(), wsb.data());
    });
  }
  if (tot.out_total > 0) {
    const unsigned blocks = unsigned(std::min<int64_t>(grouped::cdiv(tot.out_total, grouped::kThreads), 3));
    launch(dim3{blocks, 1, 1}, grouped::kThreads, 0, [&] {
      grouped::grouped_bwd_final_kernel<T, TM, Acc>(table.data(), L, tot.out_total, wsb.data());
    });
  }
  return res;
}

template <typename U>
bool same_bits(const std::vector<U>& x, const std::vector<U>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(U)) == 0);
}

template <typename T, typename TM, typename Acc>
bool layer_bits_equal(const Result<T, TM, Acc>& a, int64_t la, const Result<T, TM, Acc>& b, int64_t lb) {
  const bool t = std::memcmp(&a.terms[la * kNumTerms], &b.terms[lb * kNumTerms], kNumTerms * sizeof(Acc)) == 0 &&
                 std::memcmp(&a.sums[la * kNumSums], &b.sums[lb * kNumSums], kNumSums * sizeof(Acc)) == 0;
  return t && same_bits(a.dB[la], b.dB[lb]) && same_bits(a.dA[la], b.dA[lb]) && same_bits(a.dBa[la], b.dBa[lb]) &&
         same_bits(a.dAa[la], b.dAa[lb]);
}

// Layer l of a grouped result against the oracle; prints one line.
template <typename T, typename TM, typename Acc>
bool check_layer(const char* name, const LayerData<T, TM>& d, const Result<T, TM, Acc>& res, int64_t l,
                 int64_t layer_id, double tol) {
  const Problem& P = d.P;
  const double N = double(P.m) * double(P.n);
  double rs[kNumSums], gs[kNumSums] = {0, 0, 0, 0, 0}, rt[kNumTerms], gt[kNumTerms];
  for (int k = 0; k < kNumTerms; ++k) gt[k] = grad_term(layer_id, k);
  std::vector<double> rB, rA, rBa, rAa;
  oracle(P, kScale, kEta, gs, rs, rB, rA, rBa, rAa);
  grad_sums_from_grad_terms(rs, gt, N, kEps, gs);
  terms_from_sums(rs, N, kEps, rt);
  oracle(P, kScale, kEta, gs, rs, rB, rA, rBa, rAa);
  bool ok = true;
  double worst = 0;
  for (int k = 0; k < kNumSums + kNumTerms; ++k) {
    const bool is_sum = k < kNumSums;
    const double x = is_sum ? double(res.sums[l * kNumSums + k]) : double(res.terms[l * kNumTerms + k - kNumSums]);
    const double ref = is_sum ? rs[k] : rt[k - kNumSums];
    if (std::isnan(ref)) {  // an empty grid: NaN means, like the per-layer op
      if (!std::isnan(x)) ok = false, std::printf("  %s %d: %g, expected NaN\n", is_sum ? "sum" : "term", k, x);
      continue;
    }
    const double e = std::fabs(x - ref) / std::max(std::fabs(ref), 1e-30);
    if (!(e <= tol) && std::fabs(ref) > 1e-30) ok = false, std::printf("  %s %d: %.10g vs %.10g\n", is_sum ? "sum" : "term", k, x, ref);
    if (std::fabs(ref) > 1e-30) worst = std::max(worst, e);
  }
  auto cmp = [&](const char* what, const std::vector<T>& x, const std::vector<double>& ref) {
    std::vector<double> xd(x.size());
    for (size_t i = 0; i < x.size(); ++i) xd[i] = double(static_cast<Acc>(x[i]));
    bool fin;
    const double e = max_rel(xd, ref, fin);
    if (!fin || !(e <= tol)) ok = false, std::printf("  %s: max rel err %.3g finite=%d\n", what, e, int(fin));
    worst = std::max(worst, e);
  };
  cmp("dB", res.dB[l], rB);
  cmp("dA", res.dA[l], rA);
  cmp("dBa", res.dBa[l], rBa);
  cmp("dAa", res.dAa[l], rAa);
  int64_t tpb, bands;
  grouped_band_plan(P.m, P.n, tpb, bands);
  std::printf("%-4s %-22s layer %lld m=%lld n=%lld r=%lld ra=%lld F=%d H=%d bands=%lld: worst rel err %.3g\n",
              ok ? "ok" : "FAIL", name, (long long)layer_id, (long long)P.m, (long long)P.n, (long long)P.r,
              (long long)P.ra, int(P.fisher), int(P.task), (long long)bands, worst);
  return ok;
}

template <typename T, typename TM, typename Acc>
bool run_group(const char* name, const std::vector<LayerSpec>& specs, double tol, unsigned seed, bool bitwise) {
  auto layers = make_layers<T, TM, Acc>(specs, seed);
  std::vector<int> all(specs.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = int(i);
  const auto res = run_grouped<T, TM, Acc>(layers, all, 3);
  bool ok = true;
  for (size_t l = 0; l < specs.size(); ++l) ok &= check_layer(name, layers[l], res, int64_t(l), int64_t(l), tol);
  if (bitwise) {
    const auto one_cta = run_grouped<T, TM, Acc>(layers, all, 1);
    bool same = true;
    for (size_t l = 0; l < specs.size(); ++l) same &= layer_bits_equal(res, int64_t(l), one_cta, int64_t(l));
    std::printf("%-4s %-22s grouped with 3 CTAs == grouped with 1 CTA, bitwise\n", same ? "ok" : "FAIL", name);
    ok &= same;
    for (size_t l = 0; l < specs.size(); ++l) {
      const auto alone = run_grouped<T, TM, Acc>(layers, {int(l)}, 2);
      const bool eq = layer_bits_equal(res, int64_t(l), alone, 0);
      if (!eq) std::printf("FAIL %-22s layer %zu alone differs from its row of the grouped call\n", name, l);
      ok &= eq;
    }
    std::printf("%-4s %-22s every layer alone == its row of the grouped call, bitwise\n", ok ? "ok" : "FAIL", name);
  }
  return ok;
}

// warp_mma alone on one warp: C (16 x 8) += X (16 x K) Y (K x 8) through row-major and transposed views (the
// rebuild reads both operands row-major, the grad_B contraction reads Y transposed, grad_A reads X transposed), for
// values that need the big + small split (a + b 2^-13: not exact in tf32 or bf16), against a double product.
template <grouped::MmaKind kKind, bool kXExact, bool kYExact>
bool check_warp_mma(const char* name, double tol) {
  constexpr int K = 32;
  std::vector<float> X(16 * K), Y(K * 8), Xt(K * 16), Yt(8 * K);
  auto val = [](int i, int j, bool exact) {
    const float a = float((i * 7 + j * 3) % 9 - 4);
    return exact ? a : a + float((i + 2 * j) % 5 - 2) * 0x1p-13f;
  };
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < K; ++k) X[i * K + k] = Xt[k * 16 + i] = val(i, k, kXExact);
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < 8; ++j) Y[k * 8 + j] = Yt[j * K + k] = val(k + 3, j, kYExact);
  bool ok = true;
  for (int v = 0; v < 4; ++v) {
    const bool xt = v & 1, yt = v & 2;
    const grouped::View<float> xv = xt ? grouped::View<float>{Xt.data(), 1, 16} : grouped::View<float>{X.data(), K, 1};
    const grouped::View<float> yv = yt ? grouped::View<float>{Yt.data(), 1, K} : grouped::View<float>{Y.data(), 8, 1};
    std::vector<float> C(16 * 8, 0.5f);  // a non-zero accumulator: the mma adds to it
    launch(dim3{1, 1, 1}, 32, 0, [&] {
      const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
      float c[4];
      for (int e = 0; e < 4; ++e) c[e] = C[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)];
      grouped::warp_mma<kKind, kXExact, kYExact>(c, xv, yv, K);
      g_warp_barrier[0]->arrive_and_wait();  // every lane has read its C before anyone writes
      for (int e = 0; e < 4; ++e) C[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
    });
    double worst = 0;
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double ref = 0.5;
        for (int k = 0; k < K; ++k) ref += double(X[i * K + k]) * double(Y[k * 8 + j]);
        worst = std::max(worst, std::fabs(C[i * 8 + j] - ref) / std::max(1.0, std::fabs(ref)));
      }
    }
    const bool good = worst <= tol;
    ok &= good;
    std::printf("%-4s warp_mma %-18s X %s, Y %s: worst err %.3g\n", good ? "ok" : "FAIL", name,
                xt ? "transposed" : "row-major", yt ? "transposed" : "row-major", worst);
  }
  return ok;
}

}  // namespace

int main() {
  // m, n, r, ra, fisher, task: odd edges, r in {1, 3, 8, 16}, r' = 0 and > 0, F/H on and off, an empty layer,
  // a layer with several bands (600 rows: 10 row tiles, 2 per band) and one with r > 16 (two rank steps).
  const std::vector<LayerSpec> mixed = {
      {1, 1, 1, 0, true, true},     {67, 131, 3, 5, true, false}, {130, 70, 8, 0, false, true},
      {129, 200, 16, 16, true, true}, {0, 5, 2, 0, true, true},   {70, 65, 1, 3, false, false},
      {600, 40, 8, 8, true, true},  {40, 77, 17, 2, true, true},
  };
  const std::vector<LayerSpec> small = {{67, 131, 3, 5, true, false}, {130, 70, 8, 0, false, true},
                                        {65, 66, 16, 16, true, true}};
  bool ok = true;
  using grouped::MmaKind;
  ok &= check_warp_mma<MmaKind::kTf32x3, false, false>("3xTF32", 1e-6);
  ok &= check_warp_mma<MmaKind::kTf32x3, true, false>("TF32, X exact", 1e-6);
  ok &= check_warp_mma<MmaKind::kTf32x3, false, true>("TF32, Y exact", 1e-6);
  ok &= check_warp_mma<MmaKind::kBf16x3, false, false>("3xBF16", 1e-5);
  ok &= check_warp_mma<MmaKind::kBf16x3, true, true>("BF16, both exact", 0);
  ok &= check_warp_mma<MmaKind::kFma, false, false>("FMA", 1e-6);
  ok &= run_group<float, float, float>("f32 3xTF32", mixed, 2e-5, 21, true);
  ok &= run_group<c10::BFloat16, c10::BFloat16, float>("bf16 3xBF16", mixed, 1e-2, 22, false);
  ok &= run_group<c10::Half, float, float>("f16 factors 3xTF32", small, 2e-3, 23, false);
  ok &= run_group<float, c10::BFloat16, float>("f32 + bf16 metrics", small, 2e-5, 24, false);
  ok &= run_group<double, double, double>("f64 FMA", small, 1e-12, 25, false);
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
