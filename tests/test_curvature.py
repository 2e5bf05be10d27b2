"""The cross-layer curvature (agl/curvature.py): C against brute-force per-sample gradients, the penalty against the
brute-force quadratic form, gradients, persistence, AGLLoss wiring and errors."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_llama  # noqa: E402

from agl.curvature import cross_align_nats, estimate_cross_curvature  # noqa: E402
from agl.fisher import estimate_alignment_state, per_sample_losses  # noqa: E402
from agl.peft_binding import find_lora_layers  # noqa: E402


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(dtype=torch.float64, init_b=0.05)


@pytest.fixture(scope="module")
def data():
    return tiny_batches(6, 3)


@pytest.fixture(scope="module")
def state64(model64, data):
    return estimate_alignment_state(model64, data, max_rank=6, energy=0.99, progress=False, dtype=torch.float64,
                                    cross_curvature=True)


def _per_sample_grads(model, data):
    """{layer: (N, m, n)} gradients of each sample's summed token loss w.r.t. the base weights (one backward per
    sample), and the labelled token count."""
    from agl.peft_binding import named_lora_layers

    lora = named_lora_layers(model)
    W = {n: m.get_base_layer().weight for n, m in lora.items()}
    grads = {n: [] for n in W}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in W.values():
            w.requires_grad_(True)
        for b in data:
            for i in range(b["input_ids"].shape[0]):
                one = {k: v[i:i + 1] for k, v in b.items()}
                out = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], use_cache=False)
                loss = per_sample_losses(out.logits, one["labels"]).sum()
                g = torch.autograd.grad(loss, list(W.values()))
                for n, gi in zip(W, g):
                    grads[n].append(gi.detach())
                tokens += int((one["labels"][:, 1:] != -100).sum())
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return {n: torch.stack(v) for n, v in grads.items()}, tokens


@pytest.fixture(scope="module")
def brute(model64, data):
    return _per_sample_grads(model64, data)  # at the model the state was estimated at (adapter included)


def _updates(model):
    """{layer: ΔW = s·B·A} of the active adapter, in the base weight's orientation."""
    out = {}
    for b in find_lora_layers(model):
        a = b.adapters[0]
        out[b.name] = (a.scaling * (a.B @ a.A)).detach()
    return out


def test_C_is_the_projected_per_sample_gradient(state64, brute):
    G, tokens = brute
    assert state64.cross_samples == 6 and state64.cross_tokens == tokens
    for name, ls in state64.layers.items():
        want = ls.U.T @ G[name] @ ls.V
        torch.testing.assert_close(ls.C, want, rtol=1e-9, atol=1e-12)


def test_penalty_is_the_bruteforce_quadratic_form(model64, state64, brute):
    G, tokens = brute
    D = _updates(model64)
    z = torch.zeros(6, dtype=torch.float64)
    for name, ls in state64.layers.items():
        DA = ls.U @ ls.U.T @ D[name] @ ls.V @ ls.V.T
        z += (G[name] * DA).sum(dim=(1, 2))
    want = 0.5 * (z * z).sum() / tokens
    from agl.loss import AGLConfig, AGLLoss

    loss = AGLLoss(model64, state64, AGLConfig(curvature="cross", lambda_align=2.0))
    reg = loss.regularizer()
    torch.testing.assert_close(loss.last_terms["align_nats"], float(want), rtol=1e-9, atol=0)
    torch.testing.assert_close(reg, 2.0 * want, rtol=1e-9, atol=0)
    # λ_T = λ_NC = 0: the grouped op is skipped, only the align term is formed and logged
    assert "task" not in loss.last_terms and "align_nats_diagonal" not in loss.last_terms
    # with another term on, the op runs: same align term, the diagonal prediction logged beside it (another number)
    both = AGLLoss(model64, state64, AGLConfig(curvature="cross", lambda_align=2.0, lambda_task=1.0))
    both.regularizer()
    assert both.last_terms["align_nats"] == pytest.approx(float(want), rel=1e-12)
    assert both.last_terms["align_nats_diagonal"] != pytest.approx(float(want), rel=1e-3)
    shares = both.gradient_shares()
    assert set(shares) >= {"grad_share_align", "grad_share_task"} and shares["grad_share_align"] > 0


def test_gradcheck_float64(state64):
    g = torch.Generator().manual_seed(0)
    names = list(state64.layers)[:3]
    Ls, Rs, Us, Vs, Cs = [], [], [], [], []
    for n in names:
        ls = state64.layers[n]
        m, k = ls.U.shape
        nn_, k2 = ls.V.shape
        Ls.append(torch.randn(m, 3, generator=g, dtype=torch.float64, requires_grad=True))
        Rs.append(torch.randn(3, nn_, generator=g, dtype=torch.float64, requires_grad=True))
        Us.append(ls.U)
        Vs.append(ls.V)
        Cs.append(ls.C)
    scales = [0.5, 2.0, 1.0]
    f = lambda *a: cross_align_nats(a[:3], a[3:], Us, Vs, Cs, scales, 17.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (*Ls, *Rs))
    # a gradient that is not 1
    out = f(*Ls, *Rs)
    (gL,) = torch.autograd.grad(3.5 * out, Ls[0])
    (gL1,) = torch.autograd.grad(f(*Ls, *Rs), Ls[0])
    torch.testing.assert_close(gL, 3.5 * gL1)


def test_save_load_keeps_C(tmp_path, state64):
    from agl.state import AlignmentState

    state64.save(tmp_path)
    back = AlignmentState.load(tmp_path)
    assert back.has_cross and back.cross_samples == state64.cross_samples
    assert back.cross_tokens == state64.cross_tokens
    for n, ls in state64.layers.items():
        assert torch.equal(back.layers[n].C, ls.C)  # float64 stays float64 (float32 otherwise)


def test_float32_model_matches_float64(state64, data):
    m32 = tiny_llama(dtype=torch.float32, init_b=0.05)
    s32 = estimate_alignment_state(m32, data, max_rank=6, energy=0.99, progress=False, cross_curvature=True)
    for n, ls in s32.layers.items():
        # subspaces may differ in sign/rotation: compare the basis-free projector form U C Vᵀ
        a = ls.U.double() @ ls.C.double() @ ls.V.double().transpose(0, 1)
        b = state64.layers[n].U @ state64.layers[n].C @ state64.layers[n].V.T
        if ls.U.shape == state64.layers[n].U.shape and ls.V.shape == state64.layers[n].V.shape:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))


def test_errors(model64, data, state64):
    from agl.loss import AGLConfig, AGLLoss

    with pytest.raises(ValueError, match="curvature"):
        AGLConfig(curvature="full")
    with pytest.raises(ValueError, match="subspaces"):
        AGLConfig(curvature="cross", subspaces=False)
    with pytest.raises(ValueError, match="units"):
        AGLConfig(curvature="cross", units="paper")
    plain = estimate_alignment_state(model64, data, max_rank=6, progress=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="cross_curvature=True"):
        AGLLoss(model64, plain, AGLConfig(curvature="cross"))
    with pytest.raises(ValueError, match="re-iterable"):
        estimate_alignment_state(model64, iter(data), progress=False, cross_curvature=True)
    with pytest.raises(ValueError, match="subspaces"):
        estimate_alignment_state(model64, data, progress=False, subspaces=False, cross_curvature=True)
    nouv = estimate_alignment_state(model64, data, progress=False, subspaces=False)
    with pytest.raises(ValueError, match="U and V"):
        estimate_cross_curvature(model64, data, nouv, progress=False)


def test_cross_budget_meters_the_cross_nats(model64, state64, data):
    """Budget mode with the cross metric steers λ on the cross align_nats, not on the diagonal one."""
    import copy

    from agl.loss import AGLConfig, AGLLoss

    model = copy.deepcopy(model64)
    reg = AGLLoss(model, state64, AGLConfig(curvature="cross", align_budget=1e-6, lambda_align=1.0))
    model.train()
    reg.regularizer()
    a = reg.last_terms["align_nats"]
    assert a == pytest.approx(float(reg.cross_nats().detach()), rel=1e-12)
    reg.optimizer_step()  # the budget steps once per optimiser step
    assert reg.lambda_align > 1.0  # far over the budget: the multiplier rose


def test_decomposition_bench_agrees_with_the_state(data):
    """bench/curvature_decomposition.py's hook-based predictors on the Fisher samples equal what the state gives
    AGLLoss (two independent code paths): the diagonal on ΔW and on ΔW_A, and the cross form on ΔW_A."""
    import importlib.util

    from agl.loss import AGLConfig, AGLLoss

    spec = importlib.util.spec_from_file_location(
        "curvature_decomposition", os.path.join(os.path.dirname(__file__), "..", "bench", "curvature_decomposition.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_llama(dtype=torch.float64)  # B = 0: the state is the start's
    state = estimate_alignment_state(model, data, max_rank=6, energy=0.99, progress=False, dtype=torch.float64,
                                     cross_curvature=True)
    g = torch.Generator().manual_seed(5)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
    got = bench.gradient_terms(model, state, data)
    off = dict(lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0)
    for key, cfg in (("diag_full", AGLConfig(**off, subspaces=False)), ("diag_A", AGLConfig(**off)),
                     ("cross_A", AGLConfig(**off, curvature="cross"))):
        loss = AGLLoss(model, state, cfg)
        loss.regularizer()
        assert got[key] == pytest.approx(loss.last_terms["align_nats"], rel=1e-5), key
    # the cross form keeps the cross-layer terms the block-diagonal form drops: a different number
    assert got["cross"] != pytest.approx(got["block"], rel=1e-3)


@pytest.mark.slow
def test_cross_budget_holds_the_measured_loss():
    """Budget mode with the cross curvature holds the *measured* rise of the alignment loss (on the state's own
    samples) within 2ε on a tiny model, where the diagonal budget at the same ε does not act at all: the diagonal
    under-predicts so much that its λ decays to the floor while the measured loss rises as in a free run.

    The start is the randomly initialised tiny Llama (near-uniform predictions, so the loss is in its quadratic
    regime). A start fitted to the demos until it memorises them is the empirical Fisher's blind spot: the
    per-sample gradients vanish there while the loss still rises (docs/MATH.md §9), and no Fisher budget holds."""
    import copy

    from peft import LoraConfig, get_peft_model

    from agl.experiment._common import mean_nll
    from agl.loss import AGLConfig, AGLLoss

    align = tiny_batches(8, 4, seed=11)
    task = tiny_batches(32, 4, seed=12)
    torch.manual_seed(0)
    base = tiny_llama(lora=False)

    def run(config, steps=60):
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        L0 = mean_nll(model, align, "cpu")
        reg = None
        if config is not None:
            state = estimate_alignment_state(model, align, max_rank=16, energy=0.999, progress=False,
                                             cross_curvature=True)
            reg = AGLLoss(model, state, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        for step in range(steps):
            loss = model(**task[step % len(task)]).loss
            (reg(loss) if reg is not None else loss).backward()
            opt.step()
            opt.zero_grad()
        return mean_nll(model, align, "cpu") - L0

    eps = 0.02
    free = run(None)
    cross = run(AGLConfig(curvature="cross", align_budget=eps, lambda_align=1.0))
    diag = run(AGLConfig(align_budget=eps, lambda_align=1.0))
    assert free > 2 * eps, f"the task does not move the alignment loss enough to test the budget ({free:.4f})"
    assert cross <= 2 * eps, f"measured rise {cross:.4f} > 2ε under the cross budget (free run: {free:.4f})"
    assert cross < diag - 0.1 * eps, f"the cross budget ({cross:.4f}) did no better than the diagonal ({diag:.4f})"


def test_repeatable_and_thread_count_tolerance():
    """The cross term is GEMMs through torch (BLAS): bitwise repeatable at a fixed thread count, and across thread
    counts equal to float32 rounding (BLAS splits its reductions by thread; unlike the fused op, not bitwise)."""
    g = torch.Generator().manual_seed(0)
    n = 12
    Ls = [torch.randn(96, 4, generator=g) for _ in range(n)]
    Rs = [torch.randn(4, 80, generator=g) for _ in range(n)]
    Us = [torch.linalg.qr(torch.randn(96, 16, generator=g))[0] for _ in range(n)]
    Vs = [torch.linalg.qr(torch.randn(80, 12, generator=g))[0] for _ in range(n)]
    Cs = [torch.randn(20, 16, 12, generator=g) for _ in range(n)]

    def run():
        Lg = [x.clone().requires_grad_() for x in Ls]
        v = cross_align_nats(Lg, Rs, Us, Vs, Cs, [0.5] * n, 300.0)
        v.backward()
        return v.detach(), torch.cat([x.grad.flatten() for x in Lg])

    threads = torch.get_num_threads()
    try:
        a, b = run(), run()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.set_num_threads(1 if threads > 1 else 2)
        c = run()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(c[0], a[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(c[1], a[1], rtol=1e-4, atol=1e-5 * float(a[1].abs().max()))
