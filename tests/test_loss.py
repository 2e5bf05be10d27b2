"""AGLLoss: value vs the reference terms, gradients, errors, HF Trainer integration, backends."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_gpt2, tiny_llama, train_trace  # noqa: E402

from agl import reference  # noqa: E402
from agl.fisher import AlignmentState, LayerState, estimate_alignment_state  # noqa: E402
from agl.loss import AGLConfig, AGLLoss, resolve_backend  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    """float64 tiny Llama with a non-zero ("trained") adapter and its alignment state."""
    m = tiny_llama(dtype=torch.float64, init_b=0.05)
    st = estimate_alignment_state(m, tiny_batches(6, 3), progress=False, dtype=torch.float64)
    return m, st


def _hand_sum(model, state, cfg, task_loss):
    from peft.tuners.lora import LoraLayer

    terms = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        ls = state.layers[name]
        B, A, s = mod.lora_B["default"].weight, mod.lora_A["default"].weight, mod.scaling["default"]
        t = reference.agl_terms(B, A, ls.U @ ls.U.T @ B, A @ ls.V @ ls.V.T, fisher=ls.fisher, scale=s,
                                beta=cfg.beta, tau=cfg.tau, sharpness=cfg.sharpness, eps=cfg.eps)
        terms.append(torch.stack(list(t)))
    mean = torch.stack(terms).mean(0)
    reg = cfg.lambda_align * mean[0] + cfg.lambda_task * mean[1] + cfg.lambda_collision * (
        cfg.alpha * mean[2] + (1 - cfg.alpha) * mean[3])
    return task_loss + reg, mean.detach()


def test_value_equals_reference_sum(trained):
    model, st = trained
    cfg = AGLConfig(lambda_align=3.0, lambda_task=0.7, lambda_collision=1.9, alpha=0.3, backend="torch", per_layer_terms=True,
                    units="paper")
    L = AGLLoss(model, st, cfg)
    task = torch.tensor(1.25, dtype=torch.float64)
    got = L(task)
    want, mean = _hand_sum(model, st, cfg, task)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    lt = L.last_terms
    for i, k in enumerate(("align", "task", "overlap", "geodesic")):
        assert lt[k] == pytest.approx(float(mean[i]), rel=1e-6)
        assert lt[k] > 0  # every term non-zero on a trained adapter, the geodesic included
    assert lt["task_loss"] == 1.25 and lt["total"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert len(lt["layers"]) == 8 and all(v["geodesic"] > 0 for v in lt["layers"].values())
    assert L.layer_terms().keys() == lt["layers"].keys()


# ---------------------------------------------------------------------------------------------------- units
class _TwoLinear(torch.nn.Module):
    """Two bias-free linear layers of different shapes: a (2 x 3) and b (4 x 2), for hand-computed terms."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2, bias=False)
        self.b = torch.nn.Linear(2, 4, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _hand_model():
    """peft LoRA r = 1, scaling 1 on both layers with set factors and base weights; float64.
    ΔW_a = [[1, 0, -1], [2, 0, -2]],  ΔW_b = [[1, -1], [1, -1], [1, -1], [0, 0]]."""
    from peft import LoraConfig, get_peft_model

    net = _TwoLinear().double()
    model = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=["a", "b"], lora_dropout=0.0))
    mods = {n.split(".")[-1]: m for n, m in model.named_modules() if hasattr(m, "lora_A") and n.split(".")[-1] in "ab"}
    with torch.no_grad():
        mods["a"].lora_B["default"].weight.copy_(torch.tensor([[1.0], [2.0]]))
        mods["a"].lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        mods["a"].get_base_layer().weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))  # ‖W0‖² = 7
        mods["b"].lora_B["default"].weight.copy_(torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
        mods["b"].lora_A["default"].weight.copy_(torch.tensor([[1.0, -1.0]]))
        mods["b"].lora_B["default"].weight.add_(torch.tensor([[0.0], [1.0], [0.0], [0.0]]))
        mods["b"].get_base_layer().weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))  # 4
    names = {k: next(n for n, m in model.named_modules() if m is v) for k, v in mods.items()}
    return model, mods, names


def _hand_state(names, task=False):
    """F̃_a = rows (1, 2), U_a = (0.6, 0.8), V_a = None; F̃_b = columns (1, 3), U_b = None, V_b = (0.8, 0.6).
    fisher_scale 2, 4 samples, 16 tokens: T̄ = 4, nats_scale c = 0.5 (task state: fisher_scale 3, T̄ = 1, c_H = 3)."""
    d = torch.float64
    Fa = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=d)
    Fb = torch.tensor([[1.0, 3.0]] * 4, dtype=d)
    if task:
        return AlignmentState({names["a"]: LayerState(Fa.flip(0)), names["b"]: LayerState(Fb.flip(1))}, 5, 3.0, {}, 5)
    Ua = torch.tensor([[0.6], [0.8]], dtype=d)
    Vb = torch.tensor([[0.8], [0.6]], dtype=d)
    return AlignmentState({names["a"]: LayerState(Fa, Ua, None), names["b"]: LayerState(Fb, None, Vb)}, 4, 2.0, {}, 16)


def _hand_parts(model, mods, state, subspaces=True):
    """(D, D_A, D_T, F̃, W0) per layer from the factors and the state by explicit matrix products."""
    out = {}
    for k, mod in mods.items():
        ls = state.layers[next(n for n, m in model.named_modules() if m is mod)]
        D = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach()
        DA = D
        if subspaces:
            DA = DA if ls.U is None else ls.U @ ls.U.T @ DA
            DA = DA if ls.V is None else DA @ ls.V @ ls.V.T
        out[k] = (D, DA, D - DA, ls.fisher, mod.get_base_layer().weight.detach())
    return out


def test_units_hand_computed_every_term():
    """Every term in nats units against its definition, on factors and a state set by hand (docs/MATH.md, Units)."""
    model, mods, names = _hand_model()
    st = _hand_state(names)
    assert st.tokens_per_sample == 4.0 and st.nats_scale == 0.5
    P = _hand_parts(model, mods, st)
    D_a = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(P["a"][0], D_a)
    # layer a by hand: D_A = U Uᵀ D has columns ±(1.32, 1.76), D_T = ±(-0.32, 0.24); F̃ rows 1 and 2
    # Σ F̃ D_A² = 2·(1.32² + 2·1.76²) = 15.8752  ->  align_nats_a = ½ · 0.5 · 15.8752 = 3.9688
    # Σ F̃ D_A D_T = 2·(1.32·(-0.32) + 2·1.76·0.24) = 0.8448, Σ F̃ D_T² = 2·(0.32² + 2·0.24²) = 0.4352
    cos2_a = 0.8448 ** 2 / (15.8752 * 0.4352)
    c = 0.5
    sums = {}
    for k, (D, DA, DT, F, W0) in P.items():
        sums[k] = dict(align=float((F * DA**2).sum()), task=float((DT**2).sum()), overlap=float((DA.abs() * DT.abs()).sum()),
                       cos2=float((F * DA * DT).sum() ** 2 / ((F * DA**2).sum() * (F * DT**2).sum())), w0=float((W0**2).sum()))
    assert sums["a"]["align"] == pytest.approx(15.8752) and sums["a"]["cos2"] == pytest.approx(cos2_a)
    assert sums["a"]["w0"] == 7.0 and sums["b"]["w0"] == 4.0
    want = {
        "align": c / 2 * (sums["a"]["align"] + sums["b"]["align"]),
        "task": (sums["a"]["task"] + sums["b"]["task"]) / 11.0,  # relative size Σ‖ΔW_T‖² / Σ‖W0‖²
        "overlap": c / 2 * (sums["a"]["overlap"] + sums["b"]["overlap"]),  # β = 0: η = 1
        "geodesic": c / 2 * (sums["a"]["cos2"] * sums["a"]["align"] + sums["b"]["cos2"] * sums["b"]["align"]),
    }
    assert all(v > 0 for v in want.values())
    lam = dict(lambda_align=0.7, lambda_task=1.3, lambda_collision=2.0)
    L = AGLLoss(model, st, AGLConfig(backend="torch", beta=0.0, alpha=0.25, eps=0.0, per_layer_terms=True, **lam))
    reg = L.regularizer()
    lt = L.last_terms
    for k, v in want.items():
        assert lt[k] == pytest.approx(v, rel=1e-12), k
    assert lt["align_nats"] == pytest.approx(want["align"], rel=1e-12)
    assert lt["layers"][names["a"]]["align_nats"] == pytest.approx(3.9688, rel=1e-12)
    parts = {"align": 0.7 * want["align"], "task": 1.3 * want["task"], "overlap": 2.0 * 0.25 * want["overlap"],
             "geodesic": 2.0 * 0.75 * want["geodesic"]}
    assert float(reg.detach()) == pytest.approx(sum(parts.values()), rel=1e-12)
    assert lt["collision"] == pytest.approx(0.25 * want["overlap"] + 0.75 * want["geodesic"], rel=1e-12)
    for k, v in parts.items():
        assert lt[f"share_{k}"] == pytest.approx(v / sum(parts.values()), rel=1e-12)
    assert lt["lambda_align"] == 0.7
    # the paper's raw units: means over elements and layers, the normalised Fisher
    Lp = AGLLoss(model, st, AGLConfig(backend="torch", beta=0.0, eps=0.0, units="paper"))
    Lp.regularizer()
    N = {"a": 6, "b": 8}
    assert Lp.last_terms["align"] == pytest.approx((sums["a"]["align"] / 6 + sums["b"]["align"] / 8) / 2, rel=1e-12)
    assert Lp.last_terms["geodesic"] == pytest.approx((sums["a"]["cos2"] + sums["b"]["cos2"]) / 2, rel=1e-12)
    assert Lp.last_terms["align_nats"] == pytest.approx(want["align"], rel=1e-12)  # nats are reported in any units
    assert Lp.config.lambda_align == 1e5 and Lp.config.lambda_task == 1e4 and N["a"] * 2 == 12


def test_units_task_term_with_a_task_fisher():
    """With a task Fisher H the task term is ½·c_H·Σ H̃ ΔW_T², nats of the task loss."""
    model, mods, names = _hand_model()
    st, H = _hand_state(names), _hand_state(names, task=True)
    assert H.nats_scale == 3.0
    P = _hand_parts(model, mods, st)
    want = 0.5 * 3.0 * sum(float((H.layers[names[k]].fisher * DT**2).sum()) for k, (_, _, DT, _, _) in P.items())
    L = AGLLoss(model, st, AGLConfig(backend="torch", task_metric=H))
    L.regularizer()
    assert want > 0 and L.last_terms["task"] == pytest.approx(want, rel=1e-12)


def test_ewc_config_equals_the_old_ewc_penalty():
    """AGLConfig.ewc is the experiment's old EWCPenalty, λ·mean_layers mean(F̃ ⊙ ΔW²), in paper units, and
    λ·½·c·Σ F̃ ΔW² in nats; ΔW from peft's own get_delta_weight."""
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    st = estimate_alignment_state(model, tiny_batches(6, 3), progress=False, dtype=torch.float64)
    from peft.tuners.lora import LoraLayer

    per_layer = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            DW = mod.get_delta_weight("default").detach()
            per_layer.append(((st.layers[name].fisher * DW**2).mean(), (st.layers[name].fisher * DW**2).sum()))
    lam = 3.5e4
    old = lam * torch.stack([m for m, _ in per_layer]).mean()
    task = torch.tensor(0.9, dtype=torch.float64)
    paper = AGLLoss(model, st, AGLConfig.ewc(lambda_align=lam, units="paper", backend="torch"))
    torch.testing.assert_close(paper(task), task + old, rtol=1e-12, atol=0)
    assert paper.config.subspaces is False and paper.config.lambda_task == 0 and paper.config.lambda_collision == 0
    assert paper.last_terms["task"] == 0 and paper.last_terms["overlap"] == 0 and paper.last_terms["geodesic"] == 0
    nats = AGLLoss(model, st, AGLConfig.ewc(lambda_align=2.0, backend="torch"))
    want = 2.0 * 0.5 * st.nats_scale * torch.stack([s for _, s in per_layer]).sum()
    torch.testing.assert_close(nats.regularizer(), want, rtol=1e-12, atol=0)
    assert nats.last_terms["share_align"] == 1.0


def _per_token_fisher_by_hand(model, batches):
    """Σ_i g_i ⊙ g_i / Σ_i T_i per LoRA layer: g_i = ∂(summed token NLL of sample i)/∂W0 from one backward per
    sample, T_i its labelled tokens (the empirical Fisher of the token-averaged loss, not normalised)."""
    from peft.tuners.lora import LoraLayer

    mods = {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    F = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    tokens = 0
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            ids, mask, lab = b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1], b["labels"][i : i + 1]
            logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1]
            tgt = lab[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum")
            grads = torch.autograd.grad(nll, [m.weight for m in mods.values()])
            for n, g in zip(mods, grads):
                F[n] += g**2
            tokens += int((tgt != -100).sum())
    for m in mods.values():
        m.weight.requires_grad_(False)
    return {n: f / tokens for n, f in F.items()}


def test_align_nats_is_the_quadratic_form_with_the_unnormalised_fisher():
    """align_nats = ½ Σ_layers Σ_ij F_ij (ΔW_A)_ij², F the per-token empirical Fisher computed by hand (one backward
    per sample), ΔW_A = U Uᵀ ΔW V Vᵀ from peft's ΔW; the same with subspaces=False (ΔW_A = ΔW)."""
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    batches = tiny_batches(6, 3)
    st = estimate_alignment_state(model, batches, progress=False, dtype=torch.float64)
    assert st.num_tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) and st.num_samples == 6
    F = _per_token_fisher_by_hand(model, batches)
    from peft.tuners.lora import LoraLayer

    want_sub = want_all = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            DW = mod.get_delta_weight("default").detach()
            U, V = st.layers[name].U, st.layers[name].V
            want_sub += 0.5 * float((F[name] * (U @ U.T @ DW @ V @ V.T) ** 2).sum())
            want_all += 0.5 * float((F[name] * DW**2).sum())
    for cfg, want in ((AGLConfig(backend="torch"), want_sub), (AGLConfig(backend="torch", subspaces=False), want_all)):
        L = AGLLoss(model, st, cfg)
        L.regularizer()
        assert L.last_terms["align_nats"] == pytest.approx(want, rel=1e-9)
    assert 0 < want_sub < want_all


def test_state_token_count_round_trip_and_old_files(tmp_path):
    """num_tokens survives save/load; a file without it (older agl) loads as unknown and nats_scale = fisher_scale."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_llama()
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    path = st.save(tmp_path / "s")
    back = AlignmentState.load(path)
    assert back.num_tokens == st.num_tokens > 0 and back.nats_scale == pytest.approx(st.fisher_scale * 3 / st.num_tokens)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["agl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["num_tokens"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"agl": json.dumps(meta)})
    old = AlignmentState.load(tmp_path / "old.safetensors")
    assert old.num_tokens == 0 and old.tokens_per_sample is None and old.nats_scale == st.fisher_scale


def test_budget_controller_holds_the_predicted_rise():
    """With align_budget = ε the predicted rise settles at ε (last 30 of 80 steps within [0.7ε, 1.35ε], never above
    1.8ε) while the unconstrained run ends at > 4ε; λ_align is logged and moves."""
    eps = 3e-4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 80-step tiny runs: threading only costs here (10x slower on a busy 2-core box)
    try:
        _check_budget(eps)
    finally:
        torch.set_num_threads(threads)


def _check_budget(eps):
    free = train_trace(AGLConfig(backend="torch", lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0))
    assert free[-1][0] > 4 * eps
    held = train_trace(AGLConfig(backend="torch", lambda_align=1.0, lambda_task=0.0, lambda_collision=0.0, align_budget=eps))
    a = [x for x, _ in held]
    tail = a[-30:]
    assert max(a) < 1.8 * eps and 0.7 * eps < min(tail) and max(tail) < 1.35 * eps, [round(x / eps, 2) for x in a]
    assert sum(a[-20:]) / 20 == pytest.approx(eps, rel=0.15)
    lams = [lam for _, lam in held]
    assert lams[0] == 1.0 and max(lams) > 5.0  # the multiplier had to rise well above its start to hold the budget
    # no-grad calls (evaluation, logging) do not move the multiplier
    model = tiny_llama(init_b=0.05)
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    L = AGLLoss(model, st, AGLConfig(backend="torch", align_budget=1e-9))
    lam0 = AGLConfig().lambda_align  # the budget starts from the λ_A default
    with torch.no_grad():
        L.regularizer()
        L.regularizer()
    assert L.lambda_align == lam0
    L.regularizer()
    with torch.no_grad():
        L.entries[0].B.mul_(1.0)  # what optimizer.step() does: the factors change in place, so a new step begins
    L.regularizer()
    assert L.lambda_align > lam0


def test_bad_unit_and_budget_values():
    with pytest.raises(ValueError, match="units"):
        AGLConfig(units="bits")
    with pytest.raises(ValueError, match="align_budget"):
        AGLConfig(align_budget=-0.1)
    with pytest.raises(ValueError, match="align_budget"):
        AGLConfig(align_budget=float("nan"))
    with pytest.raises(ValueError, match="lambda_align"):
        AGLConfig(align_budget=0.1, lambda_align=0.0)
    with pytest.raises(ValueError, match="budget_lr"):
        AGLConfig(align_budget=0.1, budget_lr=0.0)
    with pytest.raises(ValueError, match="budget_horizon"):
        AGLConfig(budget_horizon=-1)
    with pytest.raises(ValueError, match="subspaces"):
        AGLConfig(subspaces="no")
    with pytest.raises(ValueError, match="lambda_task"):
        AGLConfig(lambda_task=float("inf"))
    with pytest.raises(ValueError, match="subspaces"):
        AGLConfig.ewc(lambda_align=1.0, subspaces=True)
    # the defaults: the alignment term is on in both units, each unit with its own weight (nats: chosen by rules 5-7
    # of docs/EXPERIMENT.md; paper: the paper's)
    assert AGLConfig().lambda_align > 0 and AGLConfig(units="paper").lambda_align > 0
    assert AGLConfig(units="paper").lambda_align != AGLConfig().lambda_align


def test_gradient_shares(trained):
    """grad_norm_<term> is the gradient norm of that weighted term alone (an AGLLoss with the other weights 0), shares
    sum to 1, and the probe leaves .grad and last_terms alone."""
    model, st = trained
    cfg = AGLConfig(backend="torch", lambda_align=2.0, lambda_task=3e3, lambda_collision=5.0, alpha=0.5)
    L = AGLLoss(model, st, cfg)
    L.regularizer()
    before = L.last_terms
    g = L.gradient_shares()
    assert L.last_terms == before and all(p.grad is None for p in model.parameters())
    assert sum(g[f"grad_share_{k}"] for k in ("align", "task", "overlap", "geodesic")) == pytest.approx(1.0)
    assert 0 < g["grad_norm_total"] <= sum(g[f"grad_norm_{k}"] for k in ("align", "task", "overlap", "geodesic")) * (1 + 1e-12)
    only_align = AGLLoss(model, st, AGLConfig(backend="torch", lambda_align=2.0, lambda_task=0.0, lambda_collision=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(only_align.regularizer(), params, allow_unused=True)
    want = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads if gr is not None)))
    assert g["grad_norm_align"] == pytest.approx(want, rel=1e-9)
    assert all(g[f"grad_norm_{k}"] > 0 for k in ("align", "task", "overlap", "geodesic"))


def test_term_matrix_is_per_layer_means(trained):
    model, st = trained
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    T = L._term_matrix("torch")
    assert T.shape == (len(L.entries), 4) and T.requires_grad
    per = L.layer_terms()
    for i, e in enumerate(L.entries):
        assert [float(v) for v in T[i].detach()] == pytest.approx([per[e.key][k] for k in ("align", "task", "overlap", "geodesic")])


def test_one_sided_subspaces(trained):
    model, st = trained
    one = AlignmentState({n: LayerState(ls.fisher, ls.U, None) for n, ls in st.layers.items()})
    L = AGLLoss(model, one, AGLConfig(backend="torch"))
    L.regularizer()
    from peft.tuners.lora import LoraLayer

    name, mod = next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))
    B, A = mod.lora_B["default"].weight, mod.lora_A["default"].weight
    U = st.layers[name].U
    t = reference.agl_terms(B, A, U @ U.T @ B, A, fisher=st.layers[name].fisher, scale=mod.scaling["default"])
    got = AGLLoss(model, one, AGLConfig(backend="torch", layers=[name], units="paper"))
    got.regularizer()
    assert got.last_terms["align"] == pytest.approx(float(t.align.detach()), rel=1e-6)


def test_grads_reach_every_factor_from_zero_init():
    model = tiny_llama(dtype=torch.float32)  # peft default init: B = 0
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in params) and len(params) == 16
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    batch = tiny_batches(3, 3, seed=5)[0]
    loss = L(model(**batch).loss)
    assert L.last_terms["regularizer"] == 0.0  # B = 0: D = 0
    loss.backward()
    opt.step()
    opt.zero_grad()
    L.regularizer().backward()  # the regulariser alone, after one step
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
    assert all(L.last_terms[k] > 0 for k in ("align", "task", "overlap", "geodesic"))


def test_fan_in_fan_out_uses_weight_orientation():
    model = tiny_gpt2()
    st = estimate_alignment_state(model, tiny_batches(3, 3, vocab=64), progress=False, dtype=torch.float64)
    (name, ls), = st.layers.items()
    assert ls.shape == (32, 96)  # Conv1D weight: (in, out)
    mod = dict(model.named_modules())[name]
    # Fisher of a Conv1D layer equals the brute-force W0.grad loop (weight orientation)
    from agl.fisher import estimate_alignment_state_loop

    ref = estimate_alignment_state_loop(model, tiny_batches(3, 3, vocab=64), dtype=torch.float64)
    torch.testing.assert_close(ls.fisher, ref.layers[name].fisher, rtol=1e-10, atol=1e-12)
    L = AGLLoss(model, st, AGLConfig(backend="torch", units="paper"))
    L.regularizer()
    B, A = mod.lora_B["default"].weight, mod.lora_A["default"].weight
    DW = mod.get_delta_weight("default")  # peft's own ΔW, (in, out)
    t = reference.agl_terms(A.T, B.T, ls.U @ ls.U.T @ A.T, B.T @ ls.V @ ls.V.T, fisher=ls.fisher, scale=mod.scaling["default"])
    torch.testing.assert_close(mod.scaling["default"] * A.T @ B.T, DW)
    assert L.last_terms["align"] == pytest.approx(float(t.align.detach()), rel=1e-6)


def test_errors(trained, tmp_path):
    model, st = trained
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        AGLLoss(tiny_llama(lora=False), st)
    bad = AlignmentState({k: v for i, (k, v) in enumerate(st.layers.items()) if i})
    with pytest.raises(ValueError, match="missing from the state"):
        AGLLoss(model, bad)
    m2 = tiny_llama(dtype=torch.float64)
    m2.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        AGLLoss(m2, st)
    with pytest.raises(ValueError, match="alpha"):
        AGLConfig(alpha=2)
    with pytest.raises(ValueError, match="lambda_align"):
        AGLConfig(lambda_align=-1)
    with pytest.raises(ValueError, match="backend"):
        AGLConfig(backend="cuda")
    with pytest.raises(ValueError, match="task_metric"):
        AGLConfig(task_metric="fisher")
    with pytest.raises(TypeError, match="AlignmentState"):
        AGLLoss(model, {"a": 1})
    with pytest.raises(ValueError, match="layer filter"):
        AGLLoss(model, st, AGLConfig(layers="nomatch$"))


def test_sharded_parameters_rejected(trained):
    """FSDP / ZeRO-3 are not supported: a partitioned LoRA factor (DeepSpeed marks it with ds_id) is a clear error."""
    model, st = trained
    m = tiny_llama(dtype=torch.float64)
    w = next(p for n, p in m.named_parameters() if "lora_A" in n)
    w.ds_id = 7
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        AGLLoss(m, st)


def test_task_metric_state_and_layer_filter(trained):
    model, st = trained
    H = AlignmentState({n: LayerState(torch.rand_like(ls.fisher)) for n, ls in st.layers.items()})
    a = AGLLoss(model, st, AGLConfig(backend="torch", task_metric=H, layers=r"q_proj"))
    assert len(a.entries) == 2
    a.regularizer()
    b = AGLLoss(model, st, AGLConfig(backend="torch", layers=r"q_proj"))
    b.regularizer()
    assert a.last_terms["task"] != b.last_terms["task"] and a.last_terms["align"] == b.last_terms["align"]


def test_trainer_loss_weighting(trained):
    model, st = trained
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    b = tiny_batches(3, 3)[0]
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        plain = L.trainer_loss(out, b["labels"])
        ref = model(**b).loss + L.regularizer()
        n_local = int((b["labels"][:, 1:] != -100).sum())
        half = L.trainer_loss(out, b["labels"], num_items_in_batch=torch.tensor(2 * n_local))
    torch.testing.assert_close(plain, ref.to(plain.dtype), rtol=1e-6, atol=1e-9)
    # a micro-batch with half the counted tokens carries half the task loss sum and half the regulariser
    torch.testing.assert_close(half, plain / 2, rtol=1e-6, atol=1e-9)


def test_trainer_two_steps(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from agl.loss import AGLLoggingCallback

    model = tiny_llama()
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    rows = [{k: v[i] for k, v in b.items()} for b in tiny_batches(8, 4, seed=2) for i in range(4)]

    class DS(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2,
                             gradient_accumulation_steps=2, disable_tqdm=True)
    tr = Trainer(model=model, args=args, train_dataset=DS(), compute_loss_func=L.trainer_loss,
                 callbacks=[AGLLoggingCallback(L)])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    tr.train()
    assert tr.state.global_step == 2
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("agl/align" in h and "agl/geodesic" in h for h in logs)
    assert logs[-1]["agl/regularizer"] > 0  # B moved away from 0 after the first step
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _kernel_available():
    try:
        return resolve_backend("auto", torch.device("cpu")) == "kernel"
    except Exception:
        return False


@pytest.mark.skipif(not _kernel_available(), reason="agl's compiled kernel is not built")
def test_kernel_matches_torch_backend():
    model = tiny_llama(init_b=0.05)
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    vals, grads = {}, {}
    for backend in ("torch", "kernel"):
        L = AGLLoss(model, st, AGLConfig(backend=backend))
        model.zero_grad()
        r = L.regularizer()
        (3.0 * r).backward()
        vals[backend] = L.last_terms
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for k in ("align", "task", "overlap", "geodesic", "regularizer"):
        assert vals["kernel"][k] == pytest.approx(vals["torch"][k], rel=1e-4, abs=1e-9)
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads["kernel"][n], g, rtol=1e-3, atol=1e-7)
