"""The fused op (torch.ops.agl.terms_fwd / terms_bwd through agl.functional.agl_terms) against the reference."""
from __future__ import annotations

import functools
import re

import pytest
import torch

from agl import ops
from agl._checks import check_inputs
from agl.functional import agl_terms
from agl.testing import (F64_GRADS, F64_TERMS, FACTORS, assert_close_float32, assert_close_float64,
                         assert_low_precision_rule, metrics_of, random_layer, run_layer)

pytestmark = pytest.mark.skipif(not ops.available(), reason="agl's C++ extension is not built")

# (m, n, r, r') — deliberately odd: 1x1, tails of the 16-wide lanes, r = 1, r = 64, r' != r, more rows than chunks.
SHAPES = [(1, 1, 1, 1), (7, 129, 3, 2), (129, 7, 1, 5), (33, 70, 64, 4), (300, 40, 8, 16)]
# Which optional inputs are present.
OPTIONS = ["plain", "fisher", "task", "fisher+task", "mask", "mask+fisher+task", "no_align"]
LOW = [torch.float16, torch.bfloat16]
SCALE = 0.7
run = functools.partial(run_layer, scale=SCALE)  # terms and weighted grads of one layer (agl/testing.py)


def make(m, n, r, ra, dtype=torch.float64, option="fisher+task", seed=0, mdtype=None):
    """An agl.testing layer with the inputs ``option`` names (D straddles tau = 0.01)."""
    align = "mask" not in option and option != "no_align"
    return random_layer(torch.Generator().manual_seed(seed), m, n, r, ra if align else None, dtype=dtype,
                        mdtype=mdtype, fisher="fisher" in option, task="task" in option, mask="mask" in option)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_reference_float64(shape, option):
    x = make(*shape, option=option)
    kt, kg = run(x, "kernel")
    rt, rg = run(x, "torch")
    assert all(k.dtype == torch.float64 for k in kt)
    assert_close_float64(kt, kg, rt, rg)


@pytest.mark.parametrize("option", ["fisher+task", "mask+fisher+task", "no_align", "plain"])
def test_gradcheck_float64(option):
    x = make(5, 6, 2, 3, option=option)
    fs = [x[k].clone().requires_grad_() for k in FACTORS if x[k] is not None]

    def f(*fs):
        args = list(fs) + [None] * (4 - len(fs))
        return tuple(agl_terms(*args, backend="kernel", scale=1.3, tau=0.05, sharpness=20.0, **metrics_of(x)))

    assert torch.autograd.gradcheck(f, fs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 129, 3, 2), (129, 7, 16, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", ["fisher+task", "mask+fisher+task", "no_align"])
@pytest.mark.parametrize("scale", [0.7, 60.0])  # 60: eta's sigmoid saturates (exp arguments far beyond +-88)
def test_float32_tight(shape, option, scale):
    x = make(*shape, option=option)
    rt, rg = run(x, "torch", scale=scale)  # float64 oracle
    kt, kg = run(x, "kernel", dtype=torch.float32, scale=scale)
    assert_close_float32(kt, kg, rt, rg)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("option,mdtype", [("fisher+task", None), ("mask+fisher+task", None),
                                           ("fisher+task", torch.float32), ("mask", torch.bfloat16)])
def test_low_precision_rule(dtype, option, mdtype):
    """Kernel error vs a float64 reference <= 2x the reference's own error in that dtype (+ a tiny floor)."""
    x = make(64, 96, 8, 6, option=option)
    # Quantise the inputs once; the oracle is float64 arithmetic on exactly those inputs.
    q = {k: None if v is None else v.to(dtype if k in FACTORS else mdtype or dtype) for k, v in x.items()}
    rt, rg = run(q, "torch", dtype=torch.float64)
    lt, lg = run(q, "torch")  # the reference computed in the low dtype
    kt, kg = run(q, "kernel")
    assert all(k.dtype == torch.float32 for k in kt)  # 16-bit factors give float32 terms
    assert all(k.dtype == dtype for k in kg)
    assert_low_precision_rule(kt, kg, lt, lg, rt, rg)


def test_non_contiguous_inputs_bitwise_equal_to_contiguous():
    x = make(40, 50, 4, 3, option="fisher+task")
    c = run(x, "kernel")
    g = torch.Generator().manual_seed(3)
    y = dict(x)
    y["B"] = x["B"].t().contiguous().t()  # transposed view
    wide = torch.randn(4, 100, generator=g, dtype=torch.float64)
    wide[:, ::2] = x["A"]
    y["A"] = wide[:, ::2]  # strided slice
    y["Ba"] = torch.cat([x["Ba"], x["Ba"]], 1)[:, :3]
    y["F"] = x["F"].t().contiguous().t()
    y["H"] = torch.stack([x["H"]] * 2, -1)[..., 1]
    assert not y["B"].is_contiguous() and not y["A"].is_contiguous() and not y["F"].is_contiguous()
    nc = run(y, "kernel")
    for a, b in zip(c[0] + c[1], nc[0] + nc[1]):
        assert torch.equal(a, b)


def test_not_last_op_scales_grads():
    x = make(9, 17, 3, 2)
    w = torch.rand(4, dtype=torch.float64) * 5 - 2.5
    _, kg = run(x, "kernel", weights=w)
    _, rg = run(x, "torch", weights=w)
    _, kg1 = run(x, "kernel", weights=torch.ones(4, dtype=torch.float64))
    for k, r, k1 in zip(kg, rg, kg1):
        torch.testing.assert_close(k, r, **F64_GRADS)
        assert not torch.allclose(k, k1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_threads(dtype):
    x = make(300, 130, 8, 5, option="fisher+task")
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = run(x, "kernel", dtype=dtype)
        b = run(x, "kernel", dtype=dtype)
        torch.set_num_threads(1)
        c = run(x, "kernel", dtype=dtype)
    finally:
        torch.set_num_threads(nt)
    for u, v, w in zip(a[0] + a[1], b[0] + b[1], c[0] + c[1]):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_geodesic_needs_the_fisher_metric():
    """D_A = P D with P an orthogonal projector: Euclidean geodesic is 0 (and flat); a non-uniform Fisher is not."""
    m, n, r = 12, 10, 3
    g = torch.Generator().manual_seed(5)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))
    Ba, Aa = Q @ (Q.T @ B), A.clone()
    fisher = torch.rand(m, n, generator=g, dtype=torch.float64) * 4 + 0.1
    for F, zero in ((None, True), (torch.ones(m, n, dtype=torch.float64), True), (fisher, False)):
        res = []
        for backend in ("kernel", "torch"):
            Bg = B.clone().requires_grad_()
            geo = agl_terms(Bg, A, Ba, Aa, fisher=F, backend=backend).geodesic
            (grad,) = torch.autograd.grad(geo, Bg)
            res.append((geo.detach(), grad))
        (kg, kgrad), (rg, rgrad) = res
        torch.testing.assert_close(kgrad, rgrad, rtol=1e-8, atol=1e-12)
        if zero:
            assert kg.abs().item() < 1e-20 and kgrad.abs().max().item() < 1e-9
        else:
            torch.testing.assert_close(kg, rg)
            assert kg.item() > 1e-6 and kgrad.abs().max().item() > 1e-4


@pytest.mark.parametrize("where", ["B", "A_align", "fisher", "task_metric"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nan_inf_propagate(where, bad, dtype):
    x = make(6, 20, 3, 2, dtype=dtype, option="fisher+task")
    key = {"B": "B", "A_align": "Aa", "fisher": "F", "task_metric": "H"}[where]
    x[key] = x[key].clone()
    x[key][(2, 3) if key in ("F", "H") else (1, 1)] = bad
    kt, kg = run(x, "kernel")
    rt, rg = run(x, "torch")
    for k, r in zip(kt, rt):
        assert torch.isnan(k).item() == torch.isnan(r).item() and torch.isinf(k).item() == torch.isinf(r).item()
    assert any(not torch.isfinite(k).item() for k in kt)
    assert any(not torch.isfinite(g).all().item() for g in kg)


@pytest.mark.parametrize("option", ["no_align", "fisher+task"])
def test_rank_zero(option):
    x = make(5, 7, 0, 0, option=option)
    kt, kg = run(x, "kernel")
    rt, rg = run(x, "torch")
    for k, r in zip(kt, rt):
        torch.testing.assert_close(k, r, rtol=1e-12, atol=0)
        assert k.item() == 0
    for k, r in zip(kg, rg):
        assert k.shape == r.shape and k.numel() == 0


def test_rank_zero_with_align_factors():
    x = make(5, 7, 0, 2, option="fisher")
    kt, kg = run(x, "kernel")
    rt, rg = run(x, "torch")
    for k, r in zip(kt + kg, rt + rg):
        torch.testing.assert_close(k, r, **F64_TERMS)
    assert kt[1].item() > 0  # task = mean(H D_A^2) with D = 0


def _opcheck_samples():
    out = []
    for i, (shape, option) in enumerate([((5, 7, 2, 3), "fisher+task"), ((4, 9, 3, 1), "mask"),
                                         ((3, 4, 1, 1), "no_align"), ((6, 5, 2, 2), "plain")]):
        dtype = torch.float32 if i % 2 else torch.float64
        x = make(*shape, dtype=dtype, option=option, seed=i)
        args = [x[k] for k in FACTORS + ("F", "H", "M")] + [SCALE, 4.0, 0.01, 100.0, 1e-12]
        out.append((args, i % 2 == 0))
    return out


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args, grad = _opcheck_samples()[sample]
    if grad:
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and i < 4 else a for i, a in enumerate(args)]
    torch.library.opcheck(torch.ops.agl.terms_fwd.default, args)
    acc = torch.float64 if args[0].dtype == torch.float64 else torch.float32
    gt, sums = torch.rand(4, dtype=acc), torch.rand(5, dtype=acc)
    torch.library.opcheck(torch.ops.agl.terms_bwd.default, [gt, sums] + [a.detach() if isinstance(a, torch.Tensor)
                                                                           else a for a in args])


def test_torch_compile_fullgraph_cpu():
    x = make(24, 40, 4, 3, dtype=torch.float32, option="fisher+task")

    def loss(B, A, Ba, Aa, F, H):
        t = agl_terms(B, A, Ba, Aa, fisher=F, task_metric=H, backend="kernel", scale=0.7)
        return t.align + 2 * t.task + 0.5 * t.overlap + t.geodesic

    torch._dynamo.reset()
    cl = torch.compile(loss, fullgraph=True)  # inductor: the default backend
    ins = [x[k] for k in FACTORS]
    res = []
    for fn in (loss, cl):
        fs = [t.clone().requires_grad_() for t in ins]
        v = fn(*fs, x["F"], x["H"])
        res.append([v.detach()] + list(torch.autograd.grad(v, fs)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- bad inputs: clear errors naming the argument, through the API and through the raw ops ----
def _bad_cases():
    B, A = torch.randn(4, 2), torch.randn(2, 5)
    Ba, Aa = torch.randn(4, 3), torch.randn(3, 5)
    F = torch.rand(4, 5)
    return {
        "A_shape": (dict(B=B, A=torch.randn(3, 5)), "A"),
        "B_3d": (dict(B=B[None], A=A), "B"),
        "int_dtype": (dict(B=B, A=A.int()), "A"),
        "complex_dtype": (dict(B=B.to(torch.complex64), A=A), "B"),
        "dtype_mismatch": (dict(B=B, A=A.double()), "A"),
        "align_dtype": (dict(B=B, A=A, B_align=Ba.double(), A_align=Aa.double()), "B_align"),
        "B_align_alone": (dict(B=B, A=A, B_align=Ba), "A_align"),
        "align_shape": (dict(B=B, A=A, B_align=Ba, A_align=torch.randn(3, 6)), "B_align"),
        "mask_and_align": (dict(B=B, A=A, B_align=Ba, A_align=Aa, align_mask=F), "align_mask"),
        "fisher_shape": (dict(B=B, A=A, fisher=torch.rand(5, 4)), "fisher"),
        "task_dtype": (dict(B=B, A=A, task_metric=F.int()), "task_metric"),
        "mask_shape": (dict(B=B, A=A, align_mask=torch.rand(4, 6)), "align_mask"),
        "device": (dict(B=B, A=A, fisher=F.to("meta")), "fisher"),
        "device_A": (dict(B=B, A=A.to("meta")), "A"),
        "scale_nan": (dict(B=B, A=A, scale=float("nan")), "scale"),
        "beta_inf": (dict(B=B, A=A, beta=float("inf")), "beta"),
        "tau_nan": (dict(B=B, A=A, tau=float("-inf")), "tau"),
        "sharpness_neg": (dict(B=B, A=A, sharpness=-1.0), "sharpness"),
        "eps_neg": (dict(B=B, A=A, eps=-1e-3), "eps"),
        "eps_nan": (dict(B=B, A=A, eps=float("nan")), "eps"),
    }


_ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_api(case):
    kw, name = _bad_cases()[case]
    kw = dict(kw)
    B, A = kw.pop("B"), kw.pop("A")
    Ba, Aa = kw.pop("B_align", None), kw.pop("A_align", None)
    with pytest.raises(_ERRORS, match=f"`{name}`"):
        agl_terms(B, A, Ba, Aa, backend="kernel", **kw)


def _raw_args(kw):
    return [kw["B"], kw["A"], kw.get("B_align"), kw.get("A_align"), kw.get("fisher"), kw.get("task_metric"),
            kw.get("align_mask"), kw.get("scale", 1.0), kw.get("beta", 4.0), kw.get("tau", 0.01),
            kw.get("sharpness", 100.0), kw.get("eps", 1e-12)]


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_bad_input_raw_ops(case, op):
    kw, name = _bad_cases()[case]
    args = _raw_args(kw)
    with pytest.raises(_ERRORS, match=f"`{name}`"):
        if op == "fwd":
            torch.ops.agl.terms_fwd(*args)
        else:
            torch.ops.agl.terms_bwd(torch.ones(4), torch.ones(5), *args)


def assert_same_rule(cpp: Exception, py: Exception) -> None:
    """The C++ glue (csrc/agl_glue.cpp) and agl._checks (the pure-torch backend's and the fakes' validator) apply one
    table of rules: the same exception type, and the same message up to the offending values ("got ...") but for how
    the two languages print a shape or a dtype (in parentheses)."""
    assert type(cpp) is type(py), (cpp, py)
    rule = lambda e: re.sub(r"\([^()]*\)", "()", str(e))  # noqa: E731
    assert rule(cpp).startswith(rule(py).split(" got ")[0]), (str(cpp), str(py))


# (the "device" cases mix a meta tensor in: the dispatcher sends them to the fake, which runs agl._checks itself)
@pytest.mark.parametrize("case", [c for c in _bad_cases() if not c.startswith("device")])
def test_python_checks_apply_the_cpp_rules(case):
    args = _raw_args(_bad_cases()[case][0])
    with pytest.raises(_ERRORS) as cpp:
        torch.ops.agl.terms_fwd(*args)
    with pytest.raises(_ERRORS) as py:
        check_inputs(*args)
    assert_same_rule(cpp.value, py.value)


_BAD_VECTORS = [torch.ones(5), torch.ones(4, 1), torch.ones(3), torch.ones(4, dtype=torch.int32)]


@pytest.mark.parametrize("which", ["grad_terms", "sums"])
@pytest.mark.parametrize("bad", range(len(_BAD_VECTORS)))
def test_bad_grad_terms_or_sums_raw(which, bad):
    gt, sums = torch.ones(4), torch.ones(5)
    v = _BAD_VECTORS[bad]
    if which == "grad_terms":
        gt = v
    else:
        sums = v if v.shape != (5,) else torch.ones(4)  # (5,) is a valid sums shape: use a wrong one
    with pytest.raises(_ERRORS, match=f"`{which}`"):
        torch.ops.agl.terms_bwd(gt, sums, torch.randn(4, 2), torch.randn(2, 5), None, None, None, None, None,
                                1.0, 4.0, 0.01, 100.0, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_raw_op_terms_are_the_formulas_of_its_sums(dtype):
    """terms = [S0/N, S1/N, S2/N, S3^2/(S0 S4 + eps)], N = m n, formed inside the op from its own sums."""
    x = make(13, 21, 3, 2, dtype=dtype, option="fisher+task")
    for eps in (1e-12, 0.5):
        terms, S = torch.ops.agl.terms_fwd(*(x[k] for k in FACTORS + ("F", "H")), None, SCALE, 4.0, 0.01, 100.0,
                                           eps)
        want = torch.stack([S[0] / 273, S[1] / 273, S[2] / 273, S[3] ** 2 / (S[0] * S[4] + eps)])
        torch.testing.assert_close(terms, want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


def test_unused_geodesic_with_zero_denominator_gives_finite_grads():
    """eps = 0 and a zero align pair make the geodesic 0/0; a loss that does not use it must still get finite grads
    (the op skips the geodesic's share of dL/dsums when dL/dgeodesic is 0)."""
    B, A = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    Ba, Aa = torch.zeros(6, 1, dtype=torch.float64), torch.zeros(1, 7, dtype=torch.float64)
    args = (B, A, Ba, Aa, None, None, None, 1.0, 4.0, 0.01, 100.0, 0.0)
    terms, S = torch.ops.agl.terms_fwd(*args)
    assert torch.isnan(terms[3])  # 0 / 0: the term itself is undefined
    grads = torch.ops.agl.terms_bwd(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), S, *args)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0  # the task term still pulls on B


def test_baseline_cpu_copy_matches_reference():
    """The kernel body is also compiled for baseline x86-64 (used on CPUs without AVX2): force and check it."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, %r)
        from tests.test_ops import make, run
        for dtype in (torch.float64, torch.float32):
            for option in ("fisher+task", "mask+fisher+task", "no_align"):
                x = make(37, 45, 5, 3, option=option)
                (kt, kg), (rt, rg) = run(x, "kernel", dtype=dtype), run(x, "torch")
                tol = dict(rtol=1e-9, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
                for k, r in zip(kt + kg, rt + rg):
                    torch.testing.assert_close(k.double(), r, **tol)
        print("ok")
    """ % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, AGL_CPU_BASELINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_supports_device():
    assert ops.supports_device("cpu") and ops.supports_device(torch.device("cpu"))
    assert ops.supports_device("cuda") == ops.with_cuda()
    assert not ops.supports_device("meta")


def test_meta_shapes():
    B, A = torch.empty(6, 3, device="meta"), torch.empty(3, 8, device="meta")
    Ba, Aa = torch.empty(6, 2, device="meta"), torch.empty(2, 8, device="meta")
    t, s = torch.ops.agl.terms_fwd(B, A, Ba, Aa, None, None, None, 1.0, 4.0, 0.01, 100.0, 1e-12)
    assert t.shape == (4,) and s.shape == (5,) and t.dtype == s.dtype == torch.float32
    outs = torch.ops.agl.terms_bwd(t, s, B, A, Ba, Aa, None, None, None, 1.0, 4.0, 0.01, 100.0, 1e-12)
    assert [tuple(o.shape) for o in outs] == [(6, 3), (3, 8), (6, 2), (2, 8)]
