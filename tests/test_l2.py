"""AGLConfig.l2 (curvature="identity"): the isotropic L2-SP penalty ρ·½·Σ_l ‖ΔW_l‖²_F against peft's own ΔW,
its gradients, what it logs, its validation and serialisation (docs/MATH.md §7, "L2-SP as a configuration")."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_gpt2, tiny_llama  # noqa: E402

from agl import _layers  # noqa: E402
from agl.config import AGLConfig  # noqa: E402
from agl.experiment.config import agl_settings  # noqa: E402
from agl.fisher import estimate_alignment_state  # noqa: E402
from agl.loss import AGLLoss  # noqa: E402

RHO = 0.37


@pytest.fixture(scope="module")
def models():
    """float64 models with a non-zero adapter and their states: Llama (nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out)."""
    out = {}
    for name, model, vocab in (("llama", tiny_llama(dtype=torch.float64, init_b=0.05), 128), ("gpt2", tiny_gpt2(), 64)):
        out[name] = model, estimate_alignment_state(model, tiny_batches(3, 3, vocab=vocab), progress=False,
                                                    dtype=torch.float64)
    return out


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_value_and_gradients_equal_the_materialised_penalty(models, name):
    model, st = models[name]
    params = [p for p in model.parameters() if p.requires_grad]
    reg = AGLLoss(model, st, AGLConfig.l2(RHO)).regularizer()
    want = RHO * 0.5 * sum(m.get_delta_weight("default").square().sum() for m in _lora_modules(model))  # peft's ΔW
    assert float(want.detach()) > 0
    torch.testing.assert_close(reg, want, rtol=1e-12, atol=0)
    # an incoming gradient of 3.7, not 1: the regulariser inside a larger loss
    for g, r in zip(torch.autograd.grad(3.7 * reg, params), torch.autograd.grad(3.7 * want, params)):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
    # on B in closed form: ∂/∂B ρ·½·s²‖B A‖² = ρ·s²·B A Aᵀ (either storage orientation: ‖ΔW‖ = ‖ΔWᵀ‖)
    mod = _lora_modules(model)[0]
    A, B, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
    gB, = torch.autograd.grad(AGLLoss(model, st, AGLConfig.l2(RHO)).regularizer(), B)
    torch.testing.assert_close(gB, (RHO * s * s * B @ A @ A.T).detach(), rtol=1e-10, atol=1e-14)


def test_helper_gradcheck():
    g = torch.Generator().manual_seed(0)
    shapes = [((5, 2), (2, 4)), ((3, 1), (1, 6))]
    xs = [torch.randn(sh, generator=g, dtype=torch.float64, requires_grad=True) for pair in shapes for sh in pair]
    f = lambda L0, R0, L1, R1: _layers.half_sq_norm([L0, L1], [R0, R1], [0.5, 2.0])  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(xs)) and torch.autograd.gradgradcheck(f, tuple(xs))


def test_logs_align_without_nats_and_skips_the_grouped_op(models, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the grouped op ran for curvature='identity'")

    monkeypatch.setattr("agl.loss.agl_terms_grouped", boom)
    model, st = models["llama"]
    loss = AGLLoss(model, st, AGLConfig.l2(RHO))
    loss(torch.tensor(1.5, dtype=torch.float64)).backward()
    lt = loss.last_terms
    assert "align_nats" not in lt and lt["align"] > 0 and lt["share_align"] == 1.0
    assert lt["regularizer"] == pytest.approx(RHO * lt["align"], rel=1e-12) and lt["lambda_align"] == RHO
    assert lt["total"] == pytest.approx(1.5 + lt["regularizer"], rel=1e-6)  # the log keeps the total in float32
    shares = loss.gradient_shares()
    assert shares["grad_share_align"] == 1.0 and shares["grad_norm_total"] == pytest.approx(shares["grad_norm_align"])
    means = loss.pop_running_means()
    assert means["align"] == pytest.approx(lt["align"]) and "align_nats" not in means
    with pytest.raises(ValueError, match="layer_terms.*identity"):
        loss.layer_terms()


@pytest.mark.parametrize("make, field", [
    (lambda: AGLConfig.l2(1.0, align_budget=1e-4), "align_budget"),
    (lambda: AGLConfig(curvature="identity"), "subspaces"),  # the default subspaces=True
    (lambda: AGLConfig(curvature="identity", subspaces=False, lambda_task=1.0), "lambda_task"),
    (lambda: AGLConfig(curvature="identity", subspaces=False, lambda_collision=1.0), "lambda_collision"),
    (lambda: AGLConfig.l2(1.0, units="paper"), "units"),
    (lambda: AGLConfig.l2(1.0, per_layer_terms=True), "per_layer_terms"),
    (lambda: AGLConfig.l2(-1.0), "rho"),
    (lambda: AGLConfig.l2(float("nan")), "rho"),
    (lambda: AGLConfig.l2(None), "rho"),
    (lambda: AGLConfig.l2(1.0, curvature="diagonal"), "curvature"),
    (lambda: AGLConfig.l2(1.0, lambda_align=2.0), "lambda_align"),
])
def test_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make()


def test_round_trip():
    cfg = AGLConfig.l2(0.5, backend="torch", layers=r".*q_proj")
    assert cfg.curvature == "identity" and AGLConfig(curvature="identity", subspaces=False).lambda_align > 0
    assert AGLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg == AGLConfig.from_json(cfg.to_json())
    settings = agl_settings(cfg)  # what the experiment hashes: the metric stays in it
    assert settings["curvature"] == "identity" and AGLConfig.from_dict(settings) == cfg
