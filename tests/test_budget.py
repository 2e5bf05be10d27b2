"""BudgetController: one dual-ascent step per optimiser step (gradient accumulation), none on no_grad/eval calls,
state_dict round trips that let a resumed run continue as if uninterrupted."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from _tiny import tiny_batches, tiny_llama
from agl.budget import BudgetController
from agl.fisher import estimate_alignment_state
from agl.loss import AGLConfig, AGLLoss

EPS = 3e-5
CFG = dict(backend="torch", lambda_align=1.0, lambda_task=0.0, lambda_collision=0.0, align_budget=EPS)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batches(steps: int, rows: int = 8, T: int = 12):
    """``steps`` batches of ``rows`` sequences, every position a label and no padding, so the mean loss of a batch is
    the mean of its equal-sized micro-batches' mean losses (accumulation is then exactly a larger batch)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, 128, (rows, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_llama()
    L = AGLLoss(model, estimate_alignment_state(model, tiny_batches(6, 3), progress=False), AGLConfig(**CFG))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, L, opt


def _train(model, L, opt, batches, k: int, *, tell: bool = False, sgd_data: bool = False):
    """One optimiser step per batch, each batch split into k micro-batches; returns the λ_A every micro-batch used,
    one list per step. ``tell``: call L.optimizer_step() after each step; ``sgd_data``: update through ``p.data``
    (no version bump, like an optimiser writing through raw pointers)."""
    lams = []
    for b in batches:
        used = []
        for mb in zip(*(v.chunk(k) for v in b.values())):
            loss = L(model(**dict(zip(b, mb))).loss) / k
            loss.backward()
            used.append(L.last_terms["lambda_align"])
        if sgd_data:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-0.5)
        else:
            opt.step()
        opt.zero_grad()
        if tell:
            L.optimizer_step()
        lams.append(used)
    return lams


def test_accumulation_steps_lambda_once_per_optimizer_step():
    """k = 4 micro-batches per step give the λ_A trajectory of k = 1 with the 4x batch; within a step λ_A is fixed."""
    batches = _batches(10)
    one = _train(*_setup(), batches, k=1)
    four = _train(*_setup(), batches, k=4)
    assert all(len(set(step)) == 1 for step in four), four  # λ moves only between optimiser steps
    a, b = [s[0] for s in one], [s[0] for s in four]
    assert max(a) > 10 * min(a)  # the budget binds: λ moved a lot, so stepping per micro-batch would show
    torch.testing.assert_close(torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    # told explicitly (the Trainer callback's way): the same trajectory
    told = _train(*_setup(), batches, k=4, tell=True)
    assert [s[0] for s in told] == b


def test_told_steps_work_when_the_optimizer_does_not_bump_versions():
    """An update through p.data does not change the factors' version counters: without optimizer_step() λ_A stays
    at λ0 (the warning names the fix after many calls), with it λ_A moves once per step."""
    batches = _batches(6)
    silent = _train(*_setup(), batches, k=2, sgd_data=True)
    assert {x for s in silent for x in s} == {1.0}
    told = _train(*_setup(), batches, k=2, sgd_data=True, tell=True)
    assert all(len(set(s)) == 1 for s in told) and len({s[0] for s in told}) == len(told)
    c = BudgetController(1e-3, 1.0, params=[torch.zeros(2)])
    with pytest.warns(UserWarning, match="optimizer_step"):
        for _ in range(4096):
            c.observe(torch.tensor(1e-2))


def test_no_grad_and_eval_calls_do_not_step():
    """Validation between steps (a no_grad forward, and a grad-enabled one in eval mode) leaves the controller as it
    was: the open window, λ_A and the previous window's value."""
    model, L, opt = _setup()
    batches = _batches(3)
    _train(model, L, opt, batches, k=2)
    before = L.state_dict()
    with torch.no_grad():
        L(model(**batches[0]).loss)
    model.eval()
    L(model(**batches[0]).loss).backward()  # grad-enabled in eval mode: e.g. a gradient-norm probe on dev data
    model.zero_grad()
    model.train()
    assert L.state_dict() == before and before["budget"]["window_n"] == 2


def test_resume_continues_with_the_same_lambda(tmp_path):
    """Save after step 5 (LoRA factors, optimiser and AGLLoss.state_dict() through JSON), load into a fresh model:
    the next steps use exactly the λ_A of the uninterrupted run; a run that does not restore the state does not."""
    batches = _batches(10)
    full = _train(*_setup(), batches, k=2)

    model, L, opt = _setup()
    first = _train(model, L, opt, batches[:5], k=2)
    (tmp_path / "agl.json").write_text(json.dumps(L.state_dict()))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optim = opt.state_dict()

    def resumed(load: bool):
        model2, L2, opt2 = _setup()
        with torch.no_grad():
            for n, p in model2.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
        opt2.load_state_dict(optim)
        if load:
            L2.load_state_dict(json.loads((tmp_path / "agl.json").read_text()))
        return _train(model2, L2, opt2, batches[5:], k=2)

    assert first + resumed(True) == full
    assert resumed(False)[0][0] == 1.0 != full[5][0]  # without the state λ_A restarts at λ0


def test_state_dict_round_trip_and_errors():
    model, L, opt = _setup()
    _train(model, L, opt, _batches(3), k=1)
    sd = L.state_dict()
    assert sd["budget"]["lambda"] == L.lambda_align != 1.0 and sd["budget"]["window_n"] == 1  # a window stays open
    back = json.loads(json.dumps(sd))
    _, L2, _ = _setup()
    L2.load_state_dict(back)
    assert L2.state_dict() == sd
    with pytest.raises(ValueError, match="`state` must be a dict"):
        L2.load_state_dict({"budget": None})
    with pytest.raises(ValueError, match="fixed.*budget"):
        L2.load_state_dict({"budget": None, "lambda_align": None})
    fixed = AGLLoss(model, L.state, AGLConfig(backend="torch"))
    with pytest.raises(ValueError, match="budget.*fixed"):
        fixed.load_state_dict(sd)
    fixed.lambda_align = 5.0
    fixed2 = AGLLoss(model, L.state, AGLConfig(backend="torch"))
    fixed2.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert fixed2.lambda_align == 5.0
    with pytest.raises(ValueError, match="lambda"):
        L2.budget.load_state_dict({**sd["budget"], "lambda": -1.0})
    with pytest.raises(ValueError, match="window_n"):
        L2.budget.load_state_dict({**sd["budget"], "window_n": 1.5})


@pytest.mark.parametrize("kw,name", [({"budget": 0.0}, "budget"), ({"lambda0": float("nan")}, "lambda0"),
                                     ({"lr": -1.0}, "lr"), ({"horizon": -1.0}, "horizon")])
def test_bad_controller_arguments(kw, name):
    args = {"budget": 1e-3, "lambda0": 1.0, **kw}
    with pytest.raises(ValueError, match=f"`{name}`"):
        BudgetController(**args)


def test_controller_math_matches_the_rule():
    """One closed window with mean a: λ ← λ·exp(η·clamp((a + H(a − a_prev))/ε − 1, −1, 3)) (docs/MATH.md §8)."""
    c = BudgetController(1e-3, 2.0, lr=0.3, horizon=10.0)
    for a in (1e-3, 3e-3):  # two calls of one window: mean 2e-3, no previous window (a_prev = a): e = 1
        c.observe(torch.tensor(a, dtype=torch.float64))
    c.optimizer_step()
    assert c.value == pytest.approx(2.0 * math.exp(0.3), rel=1e-12)
    c.observe(torch.tensor(1e-3, dtype=torch.float64))  # a = ε, rose by -1e-3: e = clamp(1 - 10 - 1) = -1
    c.optimizer_step()
    assert c.value == pytest.approx(2.0, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.optimizer_step()  # an empty window: nothing happens
    assert c.value == pytest.approx(2.0, rel=1e-12)
