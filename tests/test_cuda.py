"""The CUDA kernels of the fused AGL op against the float64 reference (all tests need a GPU: marked `cuda`).

Forward and backward are always checked together, through a loss that is not the last op (each term multiplied by a
random factor), so kernels that assume grad_output = 1 fail. Tolerances:
- float64: gradcheck; float32: tight relative errors against the float64 reference;
- bfloat16/float16: the kernel's error against the float64 reference must be at most twice the error of the
  reference evaluated in that dtype (plus a tiny floor), the rule flash-attention uses.
"""
from __future__ import annotations

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
def _check_low_precision(B, A, Ba, Aa, kw, what, floor=1e-5):
    w = _weights(6)
    t, g = run(B, A, Ba, Aa, kw, backend="kernel", weights=w)
    rt64, rg64 = run(B, A, Ba, Aa, kw, backend="reference", weights=w, cast=torch.float64)
    rtl, rgl = run(B, A, Ba, Aa, kw, backend="reference", weights=w)  # the reference in the inputs' own dtypes
    for k, name in enumerate(TERMS):
        ek = abs(t[k].item() - rt64[k].item())
        er = abs(rtl[k].item() - rt64[k].item())
        er = er if er == er else float("inf")  # a NaN in the low-precision reference bounds nothing
        assert ek <= 2 * er + floor * abs(rt64[k].item()) + 1e-12, f"{what}: term {name}: kernel err {ek:.3g}, ref {er:.3g}"
    for i, (gk, gr64, grl) in enumerate(zip(g, rg64, rgl)):
        ek, er = rel(gk, gr64), rel(grl, gr64)
        er = er if er == er else float("inf")
        assert ek <= 2 * er + floor, f"{what}: grad {i}: kernel rel err {ek:.3g}, reference's own {er:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["align", "mask"])
def test_16bit_vs_reference_rule(dtype, mode):
    B, A, Ba, Aa, kw = make_inputs(256, 384, 16, 16, dtype=dtype, mode=mode, seed=11)
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
