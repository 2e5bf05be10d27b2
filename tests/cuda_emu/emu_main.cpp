// Runs the CUDA kernels of csrc/cuda/agl_cuda.cu on the CPU, one std::thread per CUDA thread, to check their
// indexing, tiling, barriers, partial-slot ownership and edge handling without a GPU. It is not a performance or
// memory-model test: it checks that every output is written, that nothing uninitialised is read (buffers start as
// NaN), and that the results match a plain double-precision loop over the grid.
//
// Build and run (tests/test_cuda_emulation.py does this):
//   g++ -std=c++20 -O1 -pthread -Wno-unknown-pragmas -I csrc -I <torch>/include tests/cuda_emu/emu_main.cpp -o emu
//   ./emu            -> prints one line per case and "ALL OK", exit status 0 on success
#include "emu_shim.h"

#include "cuda/agl_cuda.cu"
#include "emu_oracle.h"

using namespace agl;
using namespace agl_emu;

// Emulated versions of terms_fwd_cuda / terms_bwd_cuda (same plan, layout and kernels; `slots` replaces the
// device's resident-block count so small problems still give blocks with several tiles each).
template <typename T, typename TM, typename Acc>
static void emu_fwd(const TermsArgs<T, TM, Acc>& a, int64_t slots, Acc* terms, Acc* sums) {
  const Plan p = make_plan(a.m, a.n, slots);
  std::vector<Acc> part(static_cast<size_t>(p.Pr * p.Pc) * kNumSums);
  fill_nan(part);
  KParams<T, TM, Acc> kp{a, p, metrics_vectorisable(a)};
  const size_t smem = std::max<size_t>(kSmemFwd, kNumSums * (kThreads / 32)) * sizeof(Acc);
  launch(dim3{unsigned(p.Pc), unsigned(p.Pr), 1}, kThreads, smem, [&] { terms_fwd_kernel<T, TM, Acc>(kp, part.data()); });
  launch(dim3{1, 1, 1}, kThreads, kNumSums * (kThreads / 32) * sizeof(Acc),
         [&] { reduce_sums_kernel<Acc>(part.data(), p.Pr * p.Pc, Acc(a.m) * Acc(a.n), a.eps, terms, sums); });
}

template <typename T, typename Acc>
static void emu_reduce(const Acc* part, int64_t nparts, int64_t count, Acc scale, T* out) {
  if (count <= 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(cdiv(count, kThreads), 3));  // few blocks: grid-stride path
  launch(dim3{blocks, 1, 1}, kThreads, 0, [&] { reduce_partials_kernel<T, Acc>(part, nparts, count, scale, out); });
}

template <typename T, typename TM, typename Acc>
static void emu_bwd(const TermsArgs<T, TM, Acc>& a, const TermsGrads<T, Acc>& g, int64_t slots) {
  const Plan p = make_plan(a.m, a.n, slots);
  const BwdLayout l = bwd_layout(a, p);
  std::vector<unsigned char> ws(l.total + 16, 0xFF);
  const BwdParts<Acc> parts{reinterpret_cast<Acc*>(ws.data() + l.dB), reinterpret_cast<Acc*>(ws.data() + l.dA),
                            reinterpret_cast<Acc*>(ws.data() + l.dBa), reinterpret_cast<Acc*>(ws.data() + l.dAa)};
  KParams<T, TM, Acc> kp{a, p, metrics_vectorisable(a)};
  launch(dim3{unsigned(p.Pc), unsigned(p.Pr), 1}, kThreads, size_t(kSmemBwd) * sizeof(Acc),
         [&] { terms_bwd_kernel<T, TM, Acc>(kp, g, parts); });
  const bool align = a.M == nullptr && a.ra > 0;
  emu_reduce(parts.dB, p.Pc, a.m * a.r, a.scale, g.dB);
  emu_reduce(parts.dA, p.Pr, a.r * a.n, a.scale, g.dA);
  if (align) {
    emu_reduce(parts.dBa, p.Pc, a.m * a.ra, a.scale, g.dBa);
    emu_reduce(parts.dAa, p.Pr, a.ra * a.n, a.scale, g.dAa);
  }
}

template <typename T, typename TM, typename Acc>
static bool run_case(const char* name, int64_t m, int64_t n, int64_t r, int64_t ra, bool mask, bool fisher, bool task,
                     int64_t slots, double tol, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, std::sqrt(0.05 / std::sqrt(double(std::max<int64_t>(r, 1)))));
  std::uniform_real_distribution<double> ud(0.1, 2.0), um(0.1, 0.9);
  Problem P{m, n, r, mask ? 0 : ra, mask, fisher, task, slots, {}, {}, {}, {}, {}, {}, {}};
  auto gen = [&](int64_t cnt, auto& dist, bool round_t) {
    std::vector<double> v(cnt);
    for (auto& x : v) x = round_t ? double(static_cast<Acc>(static_cast<T>(dist(rng))))
                                  : double(static_cast<Acc>(static_cast<TM>(dist(rng))));
    return v;
  };
  P.B = gen(m * r, nd, true);
  P.A = gen(r * n, nd, true);
  P.Ba = gen(m * P.ra, nd, true);
  P.Aa = gen(P.ra * n, nd, true);
  if (fisher) P.F = gen(m * n, ud, false);
  if (task) P.H = gen(m * n, ud, false);
  if (mask) P.M = gen(m * n, um, false);
  const double s = 1.3;
  const EtaParams<double> eta{4.0, 0.01, 100.0};
  const double gt[kNumTerms] = {0.7, -1.1, 0.9, 1.7};  // dL/dterms, not all one
  const double eps = 1e-12;

  auto tB = to_type<T>(P.B), tA = to_type<T>(P.A), tBa = to_type<T>(P.Ba), tAa = to_type<T>(P.Aa);
  auto tF = to_type<TM>(P.F), tH = to_type<TM>(P.H), tM = to_type<TM>(P.M);
  TermsArgs<T, TM, Acc> a;
  a.m = m, a.n = n, a.r = r, a.ra = P.ra;
  a.B = tB.data(), a.A = tA.data();
  a.Ba = P.ra ? tBa.data() : nullptr, a.Aa = P.ra ? tAa.data() : nullptr;
  a.F = fisher ? tF.data() : nullptr, a.H = task ? tH.data() : nullptr, a.M = mask ? tM.data() : nullptr;
  a.scale = Acc(s);
  a.eps = Acc(eps);
  a.eta = EtaParams<Acc>{Acc(4.0), Acc(0.01), Acc(100.0)};

  Acc sums[kNumSums], terms[kNumTerms];
  emu_fwd(a, slots, terms, sums);
  std::vector<T> dB(m * r), dA(r * n), dBa(m * P.ra), dAa(P.ra * n);
  fill_nan(dB), fill_nan(dA), fill_nan(dBa), fill_nan(dAa);
  // The CUDA kernels take dL/dterms and the sums from device memory (gt_dev, S_dev; here host memory plays the
  // device's part). The host copy gs is left NaN: reading it instead would poison every gradient.
  TermsGrads<T, Acc> g;
  std::vector<Acc> gt_dev(kNumTerms);
  for (int k = 0; k < kNumTerms; ++k) gt_dev[k] = Acc(gt[k]);
  for (int k = 0; k < kNumSums; ++k) g.gs[k] = std::numeric_limits<Acc>::quiet_NaN();
  g.gt_dev = gt_dev.data();
  g.S_dev = sums;
  g.dB = dB.data(), g.dA = dA.data(), g.dBa = P.ra ? dBa.data() : nullptr, g.dAa = P.ra ? dAa.data() : nullptr;
  emu_bwd(a, g, slots);

  // The oracle in double: its sums first (any gs), then dL/dsums from dL/dterms through its own sums.
  double rs[kNumSums], gs[kNumSums] = {0, 0, 0, 0, 0}, rt[kNumTerms];
  std::vector<double> rB, rA, rBa, rAa;
  oracle(P, s, eta, gs, rs, rB, rA, rBa, rAa);
  grad_sums_from_grad_terms(rs, gt, double(m) * double(n), eps, gs);
  terms_from_sums(rs, double(m) * double(n), eps, rt);
  oracle(P, s, eta, gs, rs, rB, rA, rBa, rAa);

  bool ok = true;
  double worst = 0;
  auto cmp_scalars = [&](const char* what, const Acc* x, const double* ref, int count) {
    for (int k = 0; k < count; ++k) {
      const double e = std::fabs(double(x[k]) - ref[k]) / std::max(std::fabs(ref[k]), 1e-30);
      if (!(e <= tol) && std::fabs(ref[k]) > 1e-30) {
        ok = false;
        std::printf("  %s %d: %.10g vs %.10g\n", what, k, double(x[k]), ref[k]);
      }
      worst = std::max(worst, e);
    }
  };
  cmp_scalars("sum", sums, rs, kNumSums);
  cmp_scalars("term", terms, rt, kNumTerms);
  auto cmp = [&](const char* what, const std::vector<T>& x, const std::vector<double>& ref) {
    std::vector<double> xd(x.size());
    for (size_t i = 0; i < x.size(); ++i) xd[i] = double(static_cast<Acc>(x[i]));
    bool fin;
    const double e = max_rel(xd, ref, fin);
    if (!fin || !(e <= tol)) {
      ok = false;
      std::printf("  %s: max rel err %.3g finite=%d\n", what, e, int(fin));
    }
    worst = std::max(worst, e);
  };
  cmp("dB", dB, rB);
  cmp("dA", dA, rA);
  cmp("dBa", dBa, rBa);
  cmp("dAa", dAa, rAa);
  const Plan p = make_plan(m, n, slots);
  std::printf("%-4s %-28s m=%lld n=%lld r=%lld ra=%lld mask=%d F=%d H=%d plan %lldx%lld groups of %lldx%lld tiles: "
              "worst rel err %.3g\n",
              ok ? "ok" : "FAIL", name, (long long)m, (long long)n, (long long)r, (long long)P.ra, int(mask),
              int(fisher), int(task), (long long)p.Pr, (long long)p.Pc, (long long)p.tpr, (long long)p.tpc, worst);
  return ok;
}

int main() {
  bool ok = true;
  // name, m, n, r, ra, mask, fisher, task, slots, tol
  ok &= run_case<double, double, double>("f64 tiny", 1, 1, 1, 1, false, true, true, 264, 1e-12, 1);
  ok &= run_case<double, double, double>("f64 7x129", 7, 129, 3, 5, false, true, true, 264, 1e-12, 2);
  ok &= run_case<double, double, double>("f64 129x7 mask", 129, 7, 5, 0, true, true, false, 264, 1e-12, 3);
  ok &= run_case<double, double, double>("f64 multi-tile blocks", 130, 300, 17, 33, false, true, true, 2, 1e-12, 4);
  ok &= run_case<double, double, double>("f64 r=0", 70, 260, 0, 3, false, false, true, 3, 1e-12, 5);
  ok &= run_case<double, double, double>("f64 no align", 65, 257, 16, 0, false, true, false, 4, 1e-12, 6);
  ok &= run_case<double, double, double>("f64 one block", 200, 400, 64, 16, false, true, true, 1, 1e-12, 7);
  ok &= run_case<double, double, double>("f64 2-D groups a", 300, 700, 16, 16, false, true, true, 4, 1e-12, 13);
  ok &= run_case<double, double, double>("f64 2-D groups b", 330, 1000, 20, 12, false, true, true, 6, 1e-12, 14);
  ok &= run_case<double, double, double>("f64 2-D groups mask", 520, 300, 8, 0, true, true, true, 9, 1e-12, 15);
  ok &= run_case<float, float, float>("f32 align", 130, 260, 16, 16, false, true, true, 5, 2e-5, 8);
  ok &= run_case<float, float, float>("f32 mask odd", 67, 131, 9, 0, true, true, true, 3, 2e-5, 9);
  ok &= run_case<float, c10::BFloat16, float>("f32 + bf16 metrics", 96, 200, 8, 8, false, true, true, 4, 2e-5, 10);
  ok &= run_case<c10::BFloat16, c10::BFloat16, float>("bf16 align", 100, 256, 16, 8, false, true, true, 6, 1e-2, 11);
  ok &= run_case<c10::Half, float, float>("f16 mask", 80, 129, 4, 0, true, false, true, 2, 2e-3, 12);
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
