"""The CUDA kernels of the fused AGL op against the float64 reference (all tests need a GPU: marked `cuda`).

Forward and backward are always checked together, through a loss that is not the last op (each term multiplied by a
random factor), so kernels that assume grad_output = 1 fail. Tolerances:
- float64: gradcheck; float32: tight relative errors against the float64 reference;
- bfloat16/float16: the kernel's error against the float64 reference must be at most twice the error of the
  reference evaluated in that dtype (plus a tiny floor), the rule flash-attention uses.
"""
from __future__ import annotations

import os

import pytest
import torch

from agl import reference
from agl.functional import agl_terms

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
TERMS = ("align", "task", "overlap", "geodesic")


def _kernel_ok():
    from agl import ops

    if not ops.supports_device(DEV):
        pytest.skip("agl was built without CUDA kernels")


@pytest.fixture(autouse=True)
def _need_kernel():
    _kernel_ok()


# ------------------------------------------------------------------------------------------------ inputs -----------
def make_inputs(m, n, r, ra=None, *, dtype=torch.float32, mdtype=None, mode="align", fisher=True, task=True,
                seed=0, device=DEV, noncontig=False, misaligned_metrics=False):
    """Factors (leaf tensors needing grad) and metrics. mode: "align" (B_align, A_align), "mask" or "none"."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mdtype = mdtype or dtype
    ra = r if ra is None else ra

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std)

    def factor(rows, cols, std):
        if noncontig:  # a transposed view of a (cols, rows) tensor, then every other column of a wider one
            base = randn(cols, 2 * rows, std=std).to(device=device, dtype=dtype)
            t = base.t()[::2]
            assert not t.is_contiguous() or t.numel() <= 1
        else:
            t = randn(rows, cols, std=std).to(device=device, dtype=dtype)
        return t.detach().requires_grad_()

    # D = s * B @ A of order 0.05 so that |D| straddles tau = 0.01 and the sigmoid of eta is exercised.
    std = (0.05 / max(r, 1) ** 0.5) ** 0.5
    B, A = factor(m, r, std), factor(r, n, std)
    Ba = Aa = None
    if mode == "align":
        Ba, Aa = factor(m, ra, std), factor(ra, n, std)

    def metric(lo, hi):
        v = (torch.rand(m, n, generator=g, dtype=torch.float64) * (hi - lo) + lo)
        if misaligned_metrics:  # contiguous, but one element past an aligned address: the scalar (non-vector) path
            flat = torch.empty(m * n + 1, dtype=mdtype, device=device)
            flat[1:] = v.reshape(-1).to(device=device, dtype=mdtype)
            return flat[1:].view(m, n)
        t = v.to(device=device, dtype=mdtype)
        return t.t().contiguous().t() if noncontig else t

    kw = {}
    if fisher:
        kw["fisher"] = metric(0.1, 2.0)
    if task:
        kw["task_metric"] = metric(0.1, 2.0)
    if mode == "mask":
        kw["align_mask"] = metric(0.1, 0.9)  # away from 0 and 1: |D_T| is never at its kink
    return B, A, Ba, Aa, kw


def _leaves(B, A, Ba, Aa):
    return [t for t in (B, A, Ba, Aa) if t is not None]


def run(B, A, Ba, Aa, kw, *, backend, weights, scale=1.3, cast=None):
    """Terms (float64 vector) and grads of sum(weights * terms) w.r.t. the factors, optionally on cast copies."""
    if cast is not None:
        B, A, Ba, Aa = [None if t is None else t.detach().to(cast).requires_grad_() for t in (B, A, Ba, Aa)]
        kw = {k: v.to(cast) for k, v in kw.items()}
    leaves = _leaves(B, A, Ba, Aa)
    if backend == "reference":
        out = reference.agl_terms(B, A, Ba, Aa, scale=scale, **kw)
    else:
        out = agl_terms(B, A, Ba, Aa, scale=scale, backend="kernel", **kw)
    terms = torch.stack([t.to(torch.float64) for t in out])
    loss = (terms.to(weights.dtype) * weights.to(terms.device)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
    return terms.detach(), [gr.detach() for gr in grads]


def _weights(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(4, generator=g, dtype=torch.float64) * 2 + 0.5) * torch.tensor([1.0, -1.0, 1.0, -1.0],
                                                                                    dtype=torch.float64)


def rel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item() if ref.norm() > 0 else x.norm().item()


def assert_close_rel(terms, grads, rterms, rgrads, tol, what):
    for k, name in enumerate(TERMS):
        err = abs(terms[k].item() - rterms[k].item())
        assert err <= tol * abs(rterms[k].item()) + 1e-12, f"{what}: term {name}: {terms[k].item()} vs {rterms[k].item()}"
    for i, (gk, gr) in enumerate(zip(grads, rgrads)):
        assert gk.shape == gr.shape, f"{what}: grad {i} shape {tuple(gk.shape)} vs {tuple(gr.shape)}"
        assert torch.isfinite(gk).all(), f"{what}: grad {i} not finite"
        e = rel(gk, gr)
        assert e <= tol or gr.abs().max().item() < 1e-30, f"{what}: grad {i} rel err {e:.3g} > {tol}"


# ------------------------------------------------------------------------------------------------ float64 -----------
@pytest.mark.parametrize("mode", ["align", "mask", "none"])
@pytest.mark.parametrize("shape", [(5, 7, 3, 2), (1, 1, 1, 1), (9, 130, 2, 3)])
def test_gradcheck_float64(mode, shape):
    m, n, r, ra = shape
    B, A, Ba, Aa, kw = make_inputs(m, n, r, ra, dtype=torch.float64, mode=mode, seed=3)
    w = _weights().to(DEV)

    def f(*leaves):
        it = iter(leaves)
        b, a = next(it), next(it)
        ba, aa = (next(it), next(it)) if Ba is not None else (None, None)
        out = agl_terms(b, a, ba, aa, scale=1.3, backend="kernel", **kw)
        return (torch.stack(list(out)) * w).sum()

    assert torch.autograd.gradcheck(f, tuple(_leaves(B, A, Ba, Aa)), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", ["align", "mask", "none"])
def test_float64_matches_reference(mode):
    B, A, Ba, Aa, kw = make_inputs(70, 300, 5, 4, dtype=torch.float64, mode=mode, seed=4)
    w = _weights()
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w)
    assert_close_rel(t, g, rt, rg, 1e-10, f"float64 {mode}")


# ------------------------------------------------------------------------------------------------ float32 -----------
SHAPES = [
    (1, 1, 1, 1),
    (7, 129, 3, 5),
    (129, 7, 5, 3),
    (33, 65, 1, 1),
    (64, 128, 16, 16),   # exactly one tile
    (65, 129, 17, 15),   # one past a tile and a rank chunk
    (130, 300, 64, 32),  # r = 64: four rank chunks
    (300, 520, 16, 8),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["align", "mask", "none"])
def test_float32_vs_float64(shape, mode):
    m, n, r, ra = shape
    B, A, Ba, Aa, kw = make_inputs(m, n, r, ra, mode=mode, seed=5)
    w = _weights()
    if m * n == 1:  # one element: geodesic = 1 - O(eps), its gradient is pure rounding noise in float32
        w[3] = 0.0
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, f"float32 {shape} {mode}")


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("task", [False, True])
@pytest.mark.parametrize("mode", ["align", "mask", "none"])
def test_optional_args(fisher, task, mode):
    B, A, Ba, Aa, kw = make_inputs(70, 260, 6, 5, mode=mode, fisher=fisher, task=task, seed=6)
    w = _weights(2)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, f"optional fisher={fisher} task={task} {mode}")


@pytest.mark.parametrize("misaligned", [False, True])
def test_noncontiguous_and_misaligned(misaligned):
    B, A, Ba, Aa, kw = make_inputs(67, 132, 8, 6, noncontig=not misaligned, misaligned_metrics=misaligned, seed=7)
    w = _weights(3)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, f"noncontig/misaligned={misaligned}")


def test_rank_zero():
    """r = 0: D = 0 everywhere; the align pair still gets its gradients."""
    B, A, Ba, Aa, kw = make_inputs(40, 150, 0, 3, seed=8)
    w = _weights(4)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert g[0].shape == (40, 0) and g[1].shape == (0, 150)
    assert_close_rel(t, g, rt, rg, 2e-4, "r=0")


def test_scale_and_eta_params():
    B, A, Ba, Aa, kw = make_inputs(50, 200, 4, 4, seed=9)
    kw2 = dict(kw, beta=2.5, tau=0.03, sharpness=40.0, scale=0.7)
    outs = agl_terms(B, A, Ba, Aa, backend="kernel", **kw2)
    refs = reference.agl_terms(*(t.detach().double() for t in (B, A, Ba, Aa)),
                               **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw2.items()})
    for o, rf, name in zip(outs, refs, TERMS):
        assert abs(o.item() - rf.item()) <= 2e-4 * abs(rf.item()) + 1e-12, name


def test_large_4096_r16():
    B, A, Ba, Aa, kw = make_inputs(4096, 4096, 16, 16, seed=10)
    w = _weights(5)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, "4096x4096 r16")


# ------------------------------------------------------------------------------------------------ 16-bit -------------
def _assert_finite(terms, grads, what):
    assert torch.isfinite(terms).all(), f"{what}: terms not finite: {terms.tolist()}"
    for i, gr in enumerate(grads):
        assert torch.isfinite(gr).all(), f"{what}: grad {i} not finite"


def _check_low_precision(B, A, Ba, Aa, kw, what, floor=1e-5):
    """The flash-attention rule: kernel error <= 2 x the error of the reference run in the inputs' own dtype (+ floor).
    Both the kernel's and the low-precision reference's terms and gradients must be finite: a NaN or inf in the
    reference would bound nothing, so the inputs are chosen such that no sum overflows the dtype (float16: S0 * S4 must
    stay below 65504), and a non-finite reference fails the test instead of passing it."""
    w = _weights(6)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt64, rg64 = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    rtl, rgl = run(B, A, Ba, Aa, kw, backend="reference", weights=w)  # the reference in the inputs' own dtypes
    _assert_finite(t, g, f"{what}: kernel")
    _assert_finite(rtl, rgl, f"{what}: low-precision reference (inputs overflow the dtype: choose smaller ones)")
    for k, name in enumerate(TERMS):
        ek = abs(t[k].item() - rt64[k].item())
        er = abs(rtl[k].item() - rt64[k].item())
        assert ek <= 2 * er + floor * abs(rt64[k].item()) + 1e-12, f"{what}: term {name}: kernel err {ek:.3g}, ref {er:.3g}"
    for i, (gk, gr64, grl) in enumerate(zip(g, rg64, rgl)):
        ek, er = rel(gk, gr64), rel(grl, gr64)
        assert ek <= 2 * er + floor, f"{what}: grad {i}: kernel rel err {ek:.3g}, reference's own {er:.3g}"


# float16: a 96 x 160 grid keeps S0 * S4 (about 1e4 here) inside float16's range; at 256 x 384 it overflowed and the
# float16 reference's geodesic term was inf, which used to turn into an infinite (never failing) bound.
LOW_PRECISION_SHAPES = {torch.bfloat16: (256, 384, 16, 16), torch.float16: (96, 160, 16, 16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["align", "mask"])
def test_16bit_vs_reference_rule(dtype, mode):
    B, A, Ba, Aa, kw = make_inputs(*LOW_PRECISION_SHAPES[dtype], dtype=dtype, mode=mode, seed=11)
    _check_low_precision(B, A, Ba, Aa, kw, f"{dtype} {mode}")


@pytest.mark.parametrize("mdtype", [torch.bfloat16, torch.float16])
def test_16bit_metrics_float32_factors(mdtype):
    """16-bit fisher/task_metric with float32 factors: compare to the reference fed the same (rounded) metrics."""
    B, A, Ba, Aa, kw = make_inputs(96, 200, 8, 8, mdtype=mdtype, seed=12)
    w = _weights(7)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, f"metrics {mdtype}")
    # and the mask mode with a 16-bit mask
    B, A, Ba, Aa, kw = make_inputs(96, 200, 8, 8, mdtype=mdtype, mode="mask", seed=13)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt, rg = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    assert_close_rel(t, g, rt, rg, 2e-4, f"mask {mdtype}")


# ------------------------------------------------------------------------------------------------ determinism --------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    B, A, Ba, Aa, kw = make_inputs(1000, 1500, 16, 12, dtype=dtype, seed=14)
    w = _weights(8)
    t1, g1 = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    t2, g2 = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    assert torch.equal(t1, t2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ CPU vs CUDA --------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-4)])
@pytest.mark.parametrize("mode", ["align", "mask"])
def test_cpu_kernel_matches_cuda_kernel(dtype, tol, mode):
    B, A, Ba, Aa, kw = make_inputs(77, 190, 9, 7, dtype=dtype, mode=mode, seed=15)
    w = _weights(9)
    tc, gc = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    cpu = [None if x is None else x.detach().cpu().requires_grad_() for x in (B, A, Ba, Aa)]
    t0, g0 = run(*cpu, {k: v.cpu() for k, v in kw.items()}, backend="kernel", weights=w)
    assert_close_rel(tc.cpu(), [x.cpu() for x in gc], t0, g0, tol, f"cpu vs cuda {dtype} {mode}")


# ------------------------------------------------------------------------------------------------ opcheck ------------
@pytest.mark.parametrize("mode", ["align", "mask", "none"])
def test_opcheck_cuda(mode):
    B, A, Ba, Aa, kw = make_inputs(9, 20, 3, 2, mode=mode, seed=16)
    args = (B, A, Ba, Aa, kw.get("fisher"), kw.get("task_metric"), kw.get("align_mask"), 1.3, 4.0, 0.01, 100.0,
            1e-12)
    torch.library.opcheck(torch.ops.agl.terms_fwd.default, args)
    plain = tuple(x.detach() if torch.is_tensor(x) else x for x in args)
    torch.library.opcheck(torch.ops.agl.terms_fwd.default, plain)
    gt, sums = torch.randn(4, device=DEV), torch.rand(5, device=DEV)
    torch.library.opcheck(torch.ops.agl.terms_bwd.default, (gt, sums) + plain)


# ------------------------------------------------------------------------------------------------ no host sync -------
def _bwd_args(seed):
    B, A, Ba, Aa, kw = make_inputs(70, 260, 6, 5, seed=seed)
    args = tuple(x.detach() for x in (B, A, Ba, Aa)) + (kw["fisher"], kw["task_metric"], None, 1.3, 4.0, 0.01, 100.0,
                                                         1e-12)
    _, sums = torch.ops.agl.terms_fwd(*args)
    return sums, args


def test_backward_reads_grads_and_sums_on_device_without_sync():
    """terms_bwd takes dL/dterms and the sums from device memory: no device->host copy, so torch's sync debug mode
    stays quiet; the grads match the CPU kernel's."""
    sums, args = _bwd_args(17)
    gt = torch.randn(4, device=DEV)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.agl.terms_bwd(gt, sums, *args)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    cpu = tuple(x.cpu() if torch.is_tensor(x) else x for x in args)
    ref = torch.ops.agl.terms_bwd(gt.cpu(), sums.cpu(), *cpu)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert rel(o, r) <= 2e-4


def test_backward_grad_terms_dtype_and_strides():
    """float64 and non-contiguous grad_terms/sums are converted on the device: same bits as float32 contiguous."""
    sums, args = _bwd_args(18)
    wide = torch.randn(8, device=DEV, dtype=torch.float64)
    gt = wide[::2]
    assert not gt.is_contiguous()
    s_wide = torch.stack([sums.double(), sums.double()], 1).reshape(-1)[::2]
    assert not s_wide.is_contiguous()
    a = torch.ops.agl.terms_bwd(gt, s_wide, *args)
    b = torch.ops.agl.terms_bwd(gt.float().contiguous(), sums, *args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_empty_grid_terms_and_grads():
    """m = 0: zero sums, NaN means (an empty mean), geodesic 0/(0+eps) = 0, empty/zero grads: as on the CPU."""
    B, A = torch.randn(0, 3, device=DEV), torch.randn(3, 5, device=DEV)
    args = (B, A, None, None, None, None, None, 1.0, 4.0, 0.01, 100.0, 1e-12)
    t, s = torch.ops.agl.terms_fwd(*args)
    tc, sc = torch.ops.agl.terms_fwd(*(x.cpu() if torch.is_tensor(x) else x for x in args))
    torch.testing.assert_close(t.cpu(), tc, equal_nan=True)
    torch.testing.assert_close(s.cpu(), sc)
    gB, gA, _, _ = torch.ops.agl.terms_bwd(torch.ones(4, device=DEV), s, *args)
    assert gB.shape == (0, 3) and torch.equal(gA.cpu(), torch.zeros(3, 5))


# ------------------------------------------------------------------------------------------------ grouped ------------
# Mixed odd shapes in one call: m, n off the tiles, r in {1, 3, 8, 16}, r' = 0 and > 0, with and without F/H, one layer
# with several bands, one 576 x 576 r8 layer (the 135M model's shape).
GROUPED_LAYERS = [  # m, n, r, r', fisher, task
    (67, 131, 3, 5, True, False),
    (130, 70, 8, 0, False, True),
    (129, 200, 16, 16, True, True),
    (1, 3, 1, 0, True, True),  # 1 x 1 would make the geodesic gradient pure rounding noise (see float32 tests)
    (70, 65, 1, 3, False, False),
    (600, 40, 8, 8, True, True),
    (576, 576, 8, 8, True, True),
]


def make_grouped(dtype=torch.float32, layers=GROUPED_LAYERS, seed=30):
    """Per-layer leaves and metrics (lists, None where a layer has no align pair / metric) and one scale each."""
    Bs, As, Bas, Aas, Fs, Hs = [], [], [], [], [], []
    for i, (m, n, r, ra, fisher, task) in enumerate(layers):
        B, A, Ba, Aa, kw = make_inputs(m, n, r, ra, dtype=dtype, mode="align" if ra > 0 else "none", fisher=fisher,
                                       task=task, seed=seed + i)
        Bs.append(B), As.append(A), Bas.append(Ba), Aas.append(Aa)
        Fs.append(kw.get("fisher")), Hs.append(kw.get("task_metric"))
    scales = [1.3 - 0.1 * i for i in range(len(layers))]
    return Bs, As, Bas, Aas, Fs, Hs, scales


def _grouped_leaves(Bs, As, Bas, Aas):
    return [t for quad in zip(Bs, As, Bas, Aas) for t in quad if t is not None]


def _grouped_weights(L, seed=31):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(L, 4, generator=g, dtype=torch.float64) * 2 + 0.5) * torch.tensor([1.0, -1.0, 1.0, -1.0])


def run_grouped(Bs, As, Bas, Aas, Fs, Hs, scales, weights):
    """(L, 4) terms (float64, detached) and the grads of sum(weights * terms) w.r.t. every leaf (list order)."""
    from agl.functional import agl_terms_grouped

    out = agl_terms_grouped(Bs, As, Bas, Aas, fishers=Fs, task_metrics=Hs, scales=scales, backend="kernel")
    assert out.shape == (len(Bs), 4)
    loss = (out.double() * weights.to(out.device)).sum()
    leaves = _grouped_leaves(Bs, As, Bas, Aas)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out.detach().double(), [torch.zeros_like(x) if gr is None else gr.detach() for x, gr in zip(leaves, grads)]


def run_per_layer(Bs, As, Bas, Aas, Fs, Hs, scales, weights, backend="kernel", cast=None):
    """The same through one agl_terms call per layer (or the reference, optionally on cast copies)."""
    rows, grads = [], []
    for l in range(len(Bs)):
        kw = {k: v for k, v in (("fisher", Fs[l]), ("task_metric", Hs[l])) if v is not None}
        t, g = run(Bs[l], As[l], Bas[l], Aas[l], kw, backend=backend, weights=weights[l], scale=scales[l], cast=cast)
        rows.append(t), grads.extend(g)
    return torch.stack(rows), grads


@pytest.fixture
def cuda_grouped():
    """The opt-in grouped tensor-core kernels on for the test (off afterwards); fails if the build lacks them."""
    from agl import ops

    assert ops.set_cuda_grouped(True), "the opt-in grouped CUDA kernels are not in this build"
    assert ops.cuda_grouped_status()["implementation"] == "grouped-tc"
    try:
        yield
    finally:
        ops.set_cuda_grouped(os.environ.get("AGL_CUDA_GROUPED") == "1")


@pytest.fixture
def default_grouped():
    """The default CUDA path of the grouped op (the verified per-layer kernels in a loop), whatever the environment."""
    from agl import ops

    ops.set_cuda_grouped(False)
    try:
        yield
    finally:
        ops.set_cuda_grouped(os.environ.get("AGL_CUDA_GROUPED") == "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_default_path_bitwise_equals_per_layer_calls(default_grouped, dtype):
    x = make_grouped(dtype)
    w = _grouped_weights(len(x[0]))
    tg, gg = run_grouped(*x, w)
    tp, gp = run_per_layer(*x, w)
    assert torch.equal(tg, tp)
    for a, b in zip(gg, gp):
        assert torch.equal(a, b)


def test_grouped_tc_float32_vs_float64_reference(cuda_grouped):
    x = make_grouped(torch.float32)
    w = _grouped_weights(len(x[0]))
    tg, gg = run_grouped(*x, w)
    tr, gr = run_per_layer(*x, w, backend="reference", cast=torch.float64)
    for l in range(tg.shape[0]):
        assert_close_rel(tg[l], [], tr[l], [], 2e-4, f"grouped-tc float32 layer {l}")
    assert_close_rel(tg[0], gg, tr[0], gr, 2e-4, "grouped-tc float32 grads")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_tc_16bit_vs_reference_rule(cuda_grouped, dtype):
    """Per layer, the flash-attention rule of _check_low_precision, on the grouped op's rows and gradients."""
    layers = [s for s in GROUPED_LAYERS if s[0] * s[1] <= 96 * 160] + [(96, 160, 16, 16, True, True)]
    x = make_grouped(dtype, layers=layers)
    w = _grouped_weights(len(layers))
    tg, gg = run_grouped(*x, w)
    t64, g64 = run_per_layer(*x, w, backend="reference", cast=torch.float64)
    tlo, glo = run_per_layer(*x, w, backend="reference")
    _assert_finite(tg, gg, f"grouped-tc {dtype}")
    _assert_finite(tlo, glo, f"{dtype} reference (inputs overflow the dtype)")
    ek, er = (tg - t64).abs(), (tlo - t64).abs()
    assert (ek <= 2 * er + 1e-5 * t64.abs() + 1e-12).all(), f"{dtype}: terms err {ek.tolist()} vs ref {er.tolist()}"
    for i, (a, b, c) in enumerate(zip(gg, g64, glo)):
        assert rel(a, b) <= 2 * rel(c, b) + 1e-5, f"{dtype}: grad {i}: {rel(a, b):.3g} vs reference's {rel(c, b):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_tc_close_to_default_path(dtype):
    """Opt-in tensor-core kernels against the verified default path (same inputs): float32 tolerance for float32,
    bf16 output rounding for bf16 gradients."""
    from agl import ops

    x = make_grouped(dtype)
    w = _grouped_weights(len(x[0]))
    ops.set_cuda_grouped(False)
    try:
        td, gd = run_grouped(*x, w)
        assert ops.set_cuda_grouped(True)
        tt, gt = run_grouped(*x, w)
    finally:
        ops.set_cuda_grouped(os.environ.get("AGL_CUDA_GROUPED") == "1")
    assert ((tt - td).abs() <= 2e-4 * td.abs() + 1e-12).all(), (tt - td).abs().max().item()
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    for i, (a, b) in enumerate(zip(gt, gd)):
        assert torch.isfinite(a).all() and rel(a, b) <= tol, f"grad {i}: rel err {rel(a, b):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_tc_bitwise_deterministic_and_layer_alone(cuda_grouped, dtype):
    """Run to run the same bits; and row l of the grouped call is bitwise the grouped op on layer l alone (the band
    plan depends on the layer's shape only, never on the other layers or the number of SMs)."""
    x = make_grouped(dtype)
    w = _grouped_weights(len(x[0]))
    t1, g1 = run_grouped(*x, w)
    t2, g2 = run_grouped(*x, w)
    assert torch.equal(t1, t2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    gi = 0
    for l in range(len(x[0])):
        one = [[lst[l]] for lst in x[:6]] + [[x[6][l]]]
        tl, gl = run_grouped(*one, w[l : l + 1])
        assert torch.equal(tl[0], t1[l]), f"layer {l}: {tl[0].tolist()} vs {t1[l].tolist()}"
        for a in gl:
            assert torch.equal(a, g1[gi]), f"layer {l}: grad differs from its part of the grouped call"
            gi += 1


def test_grouped_tc_one_launch_per_pass_and_no_sync(cuda_grouped):
    """The override really runs (its kernels appear in the profile, once per pass, whatever L), and forward plus
    backward need no host synchronisation."""
    x = make_grouped(torch.float32)
    w = _grouped_weights(len(x[0])).to(DEV)  # on the device: a pageable host->device copy would itself sync
    run_grouped(*x, w)  # warm-up (kernel attributes, allocator)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_grouped(*x, w)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for k in ("grouped_fwd_kernel", "grouped_fwd_final_kernel", "grouped_bwd_kernel", "grouped_bwd_final_kernel"):
        assert sum(k in nm for nm in names) == 1, f"{k}: {sum(k in nm for nm in names)} launches"
    uploads = sum("upload_table_chunk_kernel" in nm for nm in names)  # the layer table, ~21 layers per 4 KB chunk
    assert 2 <= uploads <= 2 * (len(x[0]) // 20 + 1), uploads
    assert not any("terms_fwd_kernel" in nm or "terms_bwd_kernel" in nm for nm in names), "per-layer kernels ran"
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_grouped(*x, w)
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def test_grouped_tc_declines_what_it_cannot_take(cuda_grouped):
    """Rank 80 (above the kernels' shared-memory tiles) and mixed factor dtypes fall back to the per-layer kernels:
    still correct."""
    layers = [(70, 90, 80, 4, True, True), (50, 60, 4, 0, False, True)]
    x = make_grouped(torch.float32, layers=layers)
    w = _grouped_weights(2)
    tg, gg = run_grouped(*x, w)
    tr, gr = run_per_layer(*x, w, backend="reference", cast=torch.float64)
    assert_close_rel(tg[0], gg, tr[0], gr, 2e-4, "declined: rank 80")
    Bs, As, Bas, Aas, Fs, Hs, scales = make_grouped(torch.float32, layers=layers[1:])
    B2, A2, Ba2, Aa2, F2, H2, s2 = make_grouped(torch.bfloat16, layers=layers[1:], seed=40)
    mixed = (Bs + B2, As + A2, Bas + Ba2, Aas + Aa2, Fs + F2, Hs + H2, scales + s2)
    tg, gg = run_grouped(*mixed, w)
    tr, gr = run_per_layer(*mixed, w)
    assert torch.equal(tg, tr), "mixed dtypes: the per-layer kernels' results"


def test_grouped_tc_cuda_graph_replay(cuda_grouped):
    """Forward + backward captured in a CUDA graph: replay gives the eager bits, and after the inputs change in place
    the replay follows them (the layer table is captured by value, nothing is re-read from host memory)."""
    x = make_grouped(torch.float32)
    w = _grouped_weights(len(x[0])).to(DEV)
    t_eager, g_eager = run_grouped(*x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_grouped(*x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t_cap, g_cap = run_grouped(*x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(t_cap, t_eager) and all(torch.equal(a, b) for a, b in zip(g_cap, g_eager))
    with torch.no_grad():
        for B in x[0]:
            B.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    t_new, g_new = run_grouped(*x, w)
    assert not torch.equal(t_new, t_eager)
    assert torch.equal(t_cap, t_new) and all(torch.equal(a, b) for a, b in zip(g_cap, g_new))


def test_grouped_tc_projections_match_default_path():
    """Us/Vs (B_align = U(UᵀB), A_align = (AV)Vᵀ formed inside the op, as AGLLoss calls it): the opt-in kernels'
    align gradients, chained back through the projections by the glue, agree with the default path."""
    from agl import ops
    from agl.functional import agl_terms_grouped

    layers = [(130, 70, 8, 0, True, False), (96, 200, 16, 0, True, True), (576, 576, 8, 0, True, False)]
    Bs, As, _, _, Fs, Hs, scales = make_grouped(torch.float32, layers=layers, seed=50)
    g = torch.Generator(device="cpu").manual_seed(51)
    Us = [torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))[0].float().to(DEV) for m, *_ in layers]
    Vs = [torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))[0].float().to(DEV) for _, n, *_ in layers]
    w = _grouped_weights(len(layers)).to(DEV)

    def go():
        out = agl_terms_grouped(Bs, As, Us=Us, Vs=Vs, fishers=Fs, task_metrics=Hs, scales=scales, backend="kernel")
        return out.detach().double(), torch.autograd.grad((out.double() * w).sum(), Bs + As)

    ops.set_cuda_grouped(False)
    try:
        td, gd = go()
        assert ops.set_cuda_grouped(True)
        tt, gt = go()
    finally:
        ops.set_cuda_grouped(os.environ.get("AGL_CUDA_GROUPED") == "1")
    assert ((tt - td).abs() <= 2e-4 * td.abs() + 1e-12).all(), (tt - td).abs().max().item()
    for i, (a, b) in enumerate(zip(gt, gd)):
        assert torch.isfinite(a).all() and rel(a, b) <= 2e-4, f"grad {i}: rel err {rel(a, b):.3g}"
