"""The grouped op (agl.functional.agl_terms_grouped, torch.ops.agl.terms_grouped_*): bitwise equal to per-layer calls
for any thread count, against the reference, gradients, opcheck, bad inputs, the null provider, and AGLLoss's use of
it (a step dispatches the same number of ops whatever the number of layers)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from agl import _checks, ops  # noqa: E402
from agl._checks import check_grouped, grouped_lists  # noqa: E402
from agl.functional import agl_terms_grouped  # noqa: E402
from agl.testing import (BF16, F16, F32, F64, assert_close_float32, assert_close_float64,  # noqa: E402
                         assert_low_precision_rule, random_layers, run_grouped, run_per_layer)
from test_ops import assert_same_rule  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.available(), reason="agl's C++ extension is not built")

# Layers of one call: (m, n, r, r' (None: no align pair), factor dtype, fisher?, task metric?) - odd shapes (1 x 1,
# tails of the 16-wide lanes, r = 1, r' != r, more rows than chunks), mixed dtypes, per-layer None.
LAYERS = [(7, 129, 3, 2, F32, True, True), (1, 1, 1, 1, F32, False, False), (129, 7, 1, None, F32, True, False),
          (300, 40, 8, 16, F32, True, True), (33, 70, 5, 4, BF16, True, False), (20, 18, 2, 3, F16, False, True)]
# A layer big enough (>= 2^20 elements in the call) that the CPU call runs in a parallel region.
BIG = (1100, 960, 4, 3, F32, True, True)


def with_threads(n, fn, *args, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("big", [False, True], ids=["small", "parallel"])
@pytest.mark.parametrize("with_f64", [False, True], ids=["f32out", "f64out"])
def test_bitwise_equal_to_per_layer_calls_any_thread_count(big, with_f64):
    specs = LAYERS + ([BIG] if big else []) + ([(9, 23, 2, 2, F64, True, True)] if with_f64 else [])
    layers = random_layers(specs)
    rows, grads = with_threads(2, run_per_layer, layers)
    for threads in (1, 2):
        T, gg = with_threads(threads, run_grouped, layers)
        assert T.dtype == (F64 if with_f64 else F32) and T.shape == (len(layers), 4)
        for l, row in enumerate(rows):
            assert torch.equal(T[l], row.to(T.dtype)), (threads, l)
        assert len(gg) == len(grads)
        for a, b in zip(gg, grads):
            assert a.dtype == b.dtype and torch.equal(a, b), threads


def test_non_contiguous_inputs_bitwise_equal_to_contiguous():
    layers = random_layers(LAYERS[:4])
    nc = []
    for x in layers:
        y = dict(x)
        y["B"] = x["B"].t().contiguous().t()
        wide = torch.zeros(x["A"].shape[0], 2 * x["A"].shape[1], dtype=x["A"].dtype)
        wide[:, ::2] = x["A"]
        y["A"] = wide[:, ::2]
        if x["F"] is not None:
            y["F"] = x["F"].t().contiguous().t()
        nc.append(y)
    assert not nc[0]["A"].is_contiguous()
    a, b = run_grouped(layers), run_grouped(nc)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


def _proj(layers, seed=3, none_every=3):
    """Per-layer orthonormal U (m, k) and V (n, k), some None."""
    g = torch.Generator().manual_seed(seed)
    Us, Vs = [], []
    for l, x in enumerate(layers):
        (m, r), n = x["B"].shape, x["A"].shape[1]
        U = torch.linalg.qr(torch.randn(m, min(m, 3), generator=g, dtype=F64))[0].to(x["B"])
        V = torch.linalg.qr(torch.randn(n, min(n, 4), generator=g, dtype=F64))[0].to(x["B"])
        Us.append(None if l % none_every == 1 else U)
        Vs.append(None if l % none_every == 2 else V)
    return Us, Vs


@pytest.mark.parametrize("project", [False, True], ids=["aligns", "Us_Vs"])
def test_matches_reference_float64(project):
    layers = random_layers(LAYERS, dtype=F64)
    p = _proj(layers) if project else None
    kt, kg = run_grouped(layers, "kernel", p)
    rt, rg = run_grouped(layers, "torch", p)
    assert kt.dtype == rt.dtype == F64
    assert_close_float64(kt, kg, rt, rg)


@pytest.mark.parametrize("project", [False, True], ids=["aligns", "Us_Vs"])
def test_gradcheck_float64(project):
    layers = random_layers([(5, 6, 2, 3, F64, True, True), (4, 3, 1, None, F64, False, True),
                            (3, 7, 2, 1, F64, True, False)], seed=4)
    Us, Vs = _proj(layers) if project else (None, None)
    fs, where = [], []
    for l, x in enumerate(layers):
        for k in ("B", "A") + (() if project else ("Ba", "Aa")):
            if x[k] is not None:
                fs.append(x[k].clone().requires_grad_())
                where.append((l, k))

    def f(*fs):
        d = [dict(Ba=None, Aa=None) for _ in layers]
        for (l, k), t in zip(where, fs):
            d[l][k] = t
        kw = dict(Us=Us, Vs=Vs) if project else dict(B_aligns=[x["Ba"] for x in d], A_aligns=[x["Aa"] for x in d])
        return agl_terms_grouped([x["B"] for x in d], [x["A"] for x in d], fishers=[x["F"] for x in layers],
                                 task_metrics=[x["H"] for x in layers], scales=[1.3, 0.8, 1.1], tau=0.05,
                                 sharpness=20.0, backend="kernel", **kw)

    assert torch.autograd.gradcheck(f, fs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("project", [False, True], ids=["aligns", "Us_Vs"])
def test_float32_tight(project):
    layers64 = random_layers(LAYERS[:4], dtype=F64)
    layers32 = [{k: (None if v is None else v.float()) for k, v in x.items()} for x in layers64]
    p = _proj(layers64) if project else None
    p32 = None if p is None else tuple([None if t is None else t.float() for t in ts] for ts in p)
    rt, rg = run_grouped(layers64, "torch", p)
    kt, kg = run_grouped(layers32, "kernel", p32)
    assert_close_float32(kt, kg, rt, rg)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("project", [False, True], ids=["aligns", "Us_Vs"])
def test_low_precision_rule(dtype, project):
    """Kernel error vs a float64 reference on the same (quantised) inputs <= 2x the reference's own error in that
    dtype (+ a tiny floor); everything finite. With Us/Vs the op rounds the projected pair to the factor dtype once
    (as if it had been passed in): the references get that pair, the kernel forms it itself."""
    specs = [(64, 96, 8, 6, dtype, True, True), (40, 33, 4, 2, dtype, True, False)]
    q = random_layers(specs)  # the quantised inputs
    p = _proj(q, none_every=5) if project else None
    if project:
        for x, U, V in zip(q, *p):
            B64, A64 = x["B"].double(), x["A"].double()
            x["Ba"] = x["B"] if U is None else (U.double() @ (U.double().T @ B64)).to(dtype)
            x["Aa"] = x["A"] if V is None else ((A64 @ V.double()) @ V.double().T).to(dtype)
    q64 = [{k: (None if v is None else v.double()) for k, v in x.items()} for x in q]
    rt, rg = run_grouped(q64, "torch")
    lt, lg = run_grouped(q, "torch")  # the reference computed in the low dtype
    kt, kg = run_grouped(q, "kernel", p)
    if project:  # the grads of B and A only (the op chains the pair's grads into them): the references' chained
        rg, lg = (_chain(gs, q64, p) for gs in (rg, lg))
    assert kt.dtype == F32 and torch.isfinite(kt).all()
    assert all(k.dtype == dtype and torch.isfinite(k).all() for k in kg)
    lg = [lo.to(dtype) for lo in lg]  # the reference's own low-precision result
    assert_low_precision_rule(kt.flatten(), kg, lt.flatten(), lg, rt.flatten(), rg)


def _chain(grads, layers, p):
    """Per-layer grads (B, A, B_align, A_align) -> (B + U Uᵀ dB_align, A + dA_align V Vᵀ) in float64."""
    out, it = [], iter(grads)
    for x, U, V in zip(layers, *p):
        dB, dA, dBa, dAa = (next(it).double() for _ in range(4))
        out.append(dB + (dBa if U is None else U.double() @ (U.double().T @ dBa)))
        out.append(dA + (dAa if V is None else (dAa @ V.double()) @ V.double().T))
    return out


# ---- opcheck (schemas, fakes, autograd registration) ----
def _op_args(sample):
    if sample == 0:  # mixed dtypes, explicit align pairs, per-layer None
        layers = random_layers([(5, 7, 2, 3, F64, True, True), (4, 9, 3, None, F32, False, True)], seed=7)
        return [[x["B"] for x in layers], [x["A"] for x in layers], [x["Ba"] for x in layers],
                [x["Aa"] for x in layers], [], [], [x["F"] for x in layers], [x["H"] for x in layers], [0.5, 1.5],
                4.0, 0.01, 100.0, 1e-12]
    layers = random_layers([(6, 5, 2, None, F32, True, False), (3, 4, 1, None, F32, True, False)], seed=8)
    Us, Vs = _proj(layers, none_every=2)
    return [[x["B"] for x in layers], [x["A"] for x in layers], [], [], Us, Vs, [x["F"] for x in layers], [],
            [1.0, 2.0], 4.0, 0.01, 100.0, 1e-12]


@pytest.mark.parametrize("sample", [0, 1])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(sample, grad):
    args = _op_args(sample)
    if grad:
        args = [[t.clone().requires_grad_() if (t is not None and i < 4) else t for t in a] if isinstance(a, list)
                else a for i, a in enumerate(args)]
    torch.library.opcheck(torch.ops.agl.terms_grouped_fwd.default, args)
    acc = F64 if any(B.dtype == F64 for B in args[0]) else F32
    L = len(args[0])
    gt, sums = torch.rand(L, 4, dtype=acc), torch.rand(L, 5, dtype=acc)
    det = [[t.detach() if t is not None else None for t in a] if isinstance(a, list) and a and not
           isinstance(a[0], float) else a for a in args]
    torch.library.opcheck(torch.ops.agl.terms_grouped_bwd.default, [gt, sums] + det)


def test_meta_shapes():
    B = [torch.empty(6, 3, device="meta"), torch.empty(4, 2, device="meta", dtype=F64)]
    A = [torch.empty(3, 8, device="meta"), torch.empty(2, 5, device="meta", dtype=F64)]
    Ba = [torch.empty(6, 2, device="meta"), None]
    Aa = [torch.empty(2, 8, device="meta"), None]
    t, s = torch.ops.agl.terms_grouped_fwd(B, A, Ba, Aa, [], [], [], [], [1.0, 1.0], 4.0, 0.01, 100.0, 1e-12)
    assert t.shape == (2, 4) and s.shape == (2, 5) and t.dtype == F64
    g = torch.ops.agl.terms_grouped_bwd(t, s, B, A, Ba, Aa, [], [], [], [], [1.0, 1.0], 4.0, 0.01, 100.0, 1e-12)
    assert [[tuple(x.shape) for x in lst] for lst in g] == [[(6, 3), (4, 2)], [(3, 8), (2, 5)], [(6, 2), (4, 0)],
                                                             [(2, 8), (0, 5)]]


def test_torch_compile_fullgraph_cpu():
    layers = random_layers(LAYERS[:3])

    def loss(Bs, As):
        T = agl_terms_grouped(Bs, As, [x["Ba"] for x in layers], [x["Aa"] for x in layers],
                              fishers=[x["F"] for x in layers], scales=[0.5, 1.0, 2.0], backend="kernel")
        return (T * torch.tensor([1.0, 2.0, 0.5, 1.0])).sum()

    torch._dynamo.reset()
    cl = torch.compile(loss, fullgraph=True)
    res = []
    for fn in (loss, cl):
        Bs = [x["B"].clone().requires_grad_() for x in layers]
        As = [x["A"].clone().requires_grad_() for x in layers]
        v = fn(Bs, As)
        res.append([v.detach()] + list(torch.autograd.grad(v, Bs + As)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- bad inputs: clear errors naming the argument and the layer ----
def _bad_cases():
    B, A = [torch.randn(4, 2), torch.randn(3, 2)], [torch.randn(2, 5), torch.randn(2, 6)]
    Ba, Aa = [torch.randn(4, 3), torch.randn(3, 1)], [torch.randn(3, 5), torch.randn(1, 6)]
    U, V = [torch.randn(4, 2), torch.randn(3, 2)], [torch.randn(5, 2), torch.randn(6, 3)]
    F = [torch.rand(4, 5), torch.rand(3, 6)]
    s = [1.0, 1.0]
    return {
        "empty": (dict(Bs=[], As=[], scales=[]), "Bs"),
        "As_len": (dict(Bs=B, As=A[:1], scales=s), "As"),
        "scales_len": (dict(Bs=B, As=A, scales=[1.0]), "scales"),
        "fishers_len": (dict(Bs=B, As=A, fishers=F[:1], scales=s), "fishers"),
        "A_shape": (dict(Bs=B, As=[A[0], torch.randn(3, 6)], scales=s), r"As\[1\]"),
        "B_3d": (dict(Bs=[B[0], B[1][None]], As=A, scales=s), r"Bs\[1\]"),
        "int_dtype": (dict(Bs=B, As=[A[0], A[1].int()], scales=s), r"As\[1\]"),
        "dtype_mismatch": (dict(Bs=B, As=[A[0].double(), A[1]], scales=s), r"As\[0\]"),
        "align_alone": (dict(Bs=B, As=A, B_aligns=Ba, A_aligns=[Aa[0], None], scales=s), r"A_aligns\[1\]"),
        "align_shape": (dict(Bs=B, As=A, B_aligns=Ba, A_aligns=[Aa[0], torch.randn(1, 7)], scales=s),
                        r"B_aligns\[1\]"),
        "fisher_shape": (dict(Bs=B, As=A, fishers=[F[0], torch.rand(6, 3)], scales=s), r"fishers\[1\]"),
        "U_shape": (dict(Bs=B, As=A, Us=[U[0], torch.randn(4, 2)], scales=s), r"Us\[1\]"),
        "V_dtype": (dict(Bs=B, As=A, Vs=[V[0].double(), V[1]], scales=s), r"Vs\[0\]"),
        "U_and_aligns": (dict(Bs=B, As=A, B_aligns=Ba, A_aligns=Aa, Us=U, scales=s), "Us"),
        "device": (dict(Bs=B, As=A, fishers=[F[0], F[1].to("meta")], scales=s), r"fishers\[1\]"),
        "layer_device": (dict(Bs=[B[0], B[1].to("meta")], As=[A[0], A[1].to("meta")], scales=s), r"Bs\[1\]"),
        "scale_nan": (dict(Bs=B, As=A, scales=[1.0, float("nan")]), r"scales\[1\]"),
        "sharpness_neg": (dict(Bs=B, As=A, scales=s, sharpness=-1.0), "sharpness"),
    }


_ERRORS = (ValueError, TypeError, RuntimeError)


def _call_raw(kw, op):
    args = [kw["Bs"], kw["As"]] + [kw.get(k, []) for k in ("B_aligns", "A_aligns", "Us", "Vs", "fishers",
                                                            "task_metrics")]
    args += [kw["scales"], 4.0, 0.01, kw.get("sharpness", 100.0), 1e-12]
    if op == "fwd":
        return torch.ops.agl.terms_grouped_fwd(*args)
    L = max(len(kw["Bs"]), 1)
    return torch.ops.agl.terms_grouped_bwd(torch.ones(L, 4), torch.ones(L, 5), *args)


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_bad_input_api(case, backend):
    kw, name = _bad_cases()[case]
    kw = dict(kw)
    with pytest.raises(_ERRORS, match=f"`{name}"):
        agl_terms_grouped(kw.pop("Bs"), kw.pop("As"), kw.pop("B_aligns", None), kw.pop("A_aligns", None),
                          backend=backend, **kw)


# (an empty Bs cannot reach a kernel: the dispatcher itself refuses a call without tensors; the API names `Bs`)
@pytest.mark.parametrize("case", [c for c in _bad_cases() if c != "empty"])
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_bad_input_raw_ops(case, op):
    kw, name = _bad_cases()[case]
    with pytest.raises(_ERRORS, match=f"`{name}"):
        _call_raw(kw, op)


# the Python validator of the torch backend (agl._checks) against the C++ glue, case by case (see tests/test_ops.py)
@pytest.mark.parametrize("case", [c for c in _bad_cases() if c not in ("empty", "device", "layer_device")])
def test_python_checks_apply_the_cpp_rules(case):
    kw = _bad_cases()[case][0]
    with pytest.raises(_ERRORS) as cpp:
        _call_raw(kw, "fwd")
    with pytest.raises(_ERRORS) as py:
        x = grouped_lists(kw["Bs"], kw["As"], *(kw.get(k) for k in _checks._LISTS), kw["scales"])
        check_grouped(*(x[k] for k in ("Bs", "As") + _checks._LISTS + ("scales",)), 4.0, 0.01,
                      kw.get("sharpness", 100.0), 1e-12)
    assert_same_rule(cpp.value, py.value)


def test_bad_structure_names_the_list():
    B, A = [torch.randn(4, 2)], [torch.randn(2, 5)]
    with pytest.raises(TypeError, match="`Bs`"):
        agl_terms_grouped(B[0], A, scales=[1.0])
    with pytest.raises(TypeError, match=r"`fishers\[0\]`"):
        agl_terms_grouped(B, A, fishers=[3], scales=[1.0])
    with pytest.raises(ValueError, match="`backend`"):
        agl_terms_grouped(B, A, scales=[1.0], backend="cuda")


@pytest.mark.parametrize("which,shape", [("grad_terms", (2, 5)), ("sums", (2, 4)), ("grad_terms", (4,))])
def test_bad_grad_terms_or_sums_raw(which, shape):
    B, A = [torch.randn(4, 2), torch.randn(3, 2)], [torch.randn(2, 5), torch.randn(2, 6)]
    gt, sums = torch.ones(2, 4), torch.ones(2, 5)
    if which == "grad_terms":
        gt = torch.ones(shape)
    else:
        sums = torch.ones(shape)
    with pytest.raises(_ERRORS, match=f"`{which}`"):
        torch.ops.agl.terms_grouped_bwd(gt, sums, B, A, [], [], [], [], [], [], [1.0, 1.0], 4.0, 0.01, 100.0, 1e-12)


# ---- the null provider and the CUDA switch ----
@pytest.mark.skipif(not ops.has_null_ops(), reason="not a bench/test build (AGL_BENCH_OPS=1)")
def test_null_provider_allocates_and_differentiates():
    layers = random_layers(LAYERS[:3])
    Bs = [x["B"].clone().requires_grad_() for x in layers]
    As = [x["A"].clone().requires_grad_() for x in layers]
    T = ops.agl_terms_grouped_kernel(Bs, As, [], [], [], [], [], [], [1.0] * 3, 4.0, 0.01, 100.0, 1e-12, null=True)
    assert T.shape == (3, 4) and T.dtype == F32
    gs = torch.autograd.grad(T.sum(), Bs + As)
    assert [g.shape for g in gs] == [t.shape for t in Bs + As]


def test_cuda_grouped_switch_without_override():
    st = ops.cuda_grouped_status()
    assert set(st) == {"enabled", "implementation"}
    before = st["enabled"]
    try:
        on = ops.set_cuda_grouped(True)
        assert ops.cuda_grouped_status()["enabled"] is True
        assert on == (st["implementation"] is not None)
        assert ops.set_cuda_grouped(False) is False and ops.cuda_grouped_status()["enabled"] is False
    finally:
        ops.set_cuda_grouped(before)


# ---- CUDA (skipped without a GPU) ----
def _cuda(layers):
    return [{k: (None if v is None else v.cuda()) for k, v in x.items()} for x in layers]


@pytest.mark.cuda
@pytest.mark.skipif(not ops.with_cuda(), reason="agl was built without its CUDA kernels")
@pytest.mark.parametrize("override", [False, True], ids=["per-layer-loop", "single-launch"])
def test_cuda_grouped_matches_per_layer_calls(override):
    """Default path (a loop over the verified per-layer kernels): bitwise equal to per-layer calls. The opt-in
    single-launch implementation, when this build has one: within float32 tolerances of the float64 reference."""
    st = ops.cuda_grouped_status()
    if override and st["implementation"] is None:
        pytest.skip("this build has no single-launch CUDA grouped implementation")
    specs = LAYERS + [BIG, (9, 23, 2, 2, F64, True, True)]
    layers = _cuda(random_layers(specs))
    try:
        ops.set_cuda_grouped(override)
        T, gg = run_grouped(layers)
        Tp, gp = run_grouped(layers, project=_proj(layers))
    finally:
        ops.set_cuda_grouped(st["enabled"])
    assert T.is_cuda and T.dtype == F64
    if not override:
        rows, grads = run_per_layer(layers)
        for l, row in enumerate(rows):
            assert torch.equal(T[l], row.to(T.dtype)), l
        for a, b in zip(gg, grads):
            assert a.dtype == b.dtype and torch.equal(a, b)
    layers64 = _cuda(random_layers(specs, dtype=F64))
    for (kt, kg), p in (((T, gg), None), ((Tp, gp), _proj(layers64))):
        rt, rg = run_grouped(layers64, "torch", p)
        low = torch.tensor([s[4] in (BF16, F16) for s in specs], device=T.device)
        torch.testing.assert_close(kt[~low], rt[~low], rtol=2e-5, atol=1e-9)
        assert torch.isfinite(kt).all() and all(torch.isfinite(g).all() for g in kg)


# ---- AGLLoss on the grouped op ----
def _loss_for(n_layers, backend="kernel"):
    from _tiny import tiny_llama

    from agl.fisher import AlignmentState, LayerState
    from agl.loss import AGLConfig, AGLLoss
    from agl.peft_binding import find_lora_layers

    model = tiny_llama(init_b=0.05)
    g = torch.Generator().manual_seed(0)
    names = [b.name for b in find_lora_layers(model)][:n_layers]
    layers = {}
    for b in find_lora_layers(model):
        m, n = b.shape
        layers[b.name] = LayerState(torch.rand(m, n, generator=g) * 2, torch.linalg.qr(torch.randn(m, 4, generator=g))[0],
                                    torch.linalg.qr(torch.randn(n, 4, generator=g))[0])
    st = AlignmentState(layers, 1)
    return model, AGLLoss(model, st, AGLConfig(backend=backend, layers=names, per_layer_terms=True))


def _top_level_ops(fn):
    """Ops dispatched by the host path (nested ops, e.g. allocations inside the agl op, are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def is_op(e):
        return e.name.startswith(("aten::", "agl::"))

    count = 0
    for e in prof.events():
        if not is_op(e):
            continue
        p = e.cpu_parent
        while p is not None and not is_op(p):
            p = p.cpu_parent
        count += p is None
    return count


def test_agl_loss_step_op_count_does_not_grow_with_layers():
    counts = {}
    for n in (2, 8):
        model, L = _loss_for(n)
        assert len(L.entries) == n
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            torch.autograd.grad(L.regularizer(), params, allow_unused=True)

        step()  # warm-up (caches the state tensors)
        counts[n] = _top_level_ops(step)
    assert counts[2] == counts[8], counts


def test_agl_loss_kernel_equals_torch_backend_and_logs_layers():
    vals = {}
    for backend in ("torch", "kernel"):
        model, L = _loss_for(8, backend)
        reg = L.regularizer()
        vals[backend] = (float(reg.detach()), L.last_terms["layers"], L.layer_terms())
    (rt, rl, rlt), (kt, kl, klt) = vals["torch"], vals["kernel"]
    assert kt == pytest.approx(rt, rel=1e-4)
    assert kl.keys() == rl.keys() == klt.keys() and len(kl) == 8
    for key in kl:
        for term in ("align", "task", "overlap", "geodesic"):
            assert kl[key][term] == pytest.approx(rl[key][term], rel=1e-3, abs=1e-12)
            assert klt[key][term] == pytest.approx(kl[key][term], rel=1e-6, abs=1e-15)
