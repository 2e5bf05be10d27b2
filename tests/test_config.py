"""AGLConfig as data (agl/config.py): JSON round trip without live objects, weights resolved lazily (so
``dataclasses.replace`` of ``units`` gives the new unit's defaults), and the unit conversions (agl/units.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from agl.config import AGLConfig
from agl.state import AlignmentState, LayerState
from agl.units import layer_align_nats, unit_terms

WEIGHTS = ("lambda_align", "lambda_task", "lambda_collision")


def _weights(c):
    return tuple(getattr(c, k) for k in WEIGHTS)


def _plain_json(v):
    """True when ``v`` holds only JSON's own types (exact float, no subclass or live object)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_json(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain_json(x) for x in v)
    return v is None or type(v) in (str, int, float, bool)


@pytest.mark.parametrize("cfg", [
    AGLConfig(),
    AGLConfig(units="paper", alpha=0.25, tau=-0.5, layers=["b.q_proj", "a.v_proj"], per_layer_terms=True),
    AGLConfig(lambda_align=3.0, align_budget=1e-4, budget_lr=0.1, budget_horizon=0.0, layers=r".*q_proj"),
    AGLConfig(curvature="cross", lambda_task=2.0, backend="torch"),
    AGLConfig.ewc(7.0, units="paper"),
], ids=["defaults", "paper-layers", "budget-regex", "cross", "ewc"])
def test_round_trip_through_json(cfg):
    d = cfg.to_dict()
    assert _plain_json(d) and _plain_json(cfg.to_dict(resolve=True))
    back = AGLConfig.from_json(cfg.to_json())
    assert back == cfg and AGLConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert back.to_dict() == d  # which weights were set survives the round trip
    resolved = cfg.to_dict(resolve=True)
    assert _weights(AGLConfig.from_dict(resolved)) == _weights(cfg)
    assert all(resolved[k] is not None for k in WEIGHTS)


def test_live_objects_are_refused_by_name():
    g = torch.ones(2, 3)
    task = AlignmentState({"m": LayerState(g, None, None)}, 1)
    with pytest.raises(ValueError, match="`task_metric`"):
        AGLConfig(task_metric=task).to_dict()
    with pytest.raises(ValueError, match="`layers`"):
        AGLConfig(layers=lambda name: "q_proj" in name).to_json()
    with pytest.raises(ValueError, match="unknown config key.*nope"):
        AGLConfig.from_dict({"lambda_align": 1.0, "nope": 2})
    with pytest.raises(ValueError, match="dict"):
        AGLConfig.from_dict([("lambda_align", 1.0)])
    with pytest.raises(ValueError, match="lambda_task"):  # from_dict validates like the constructor
        AGLConfig.from_dict({"lambda_task": -1.0})


def test_unset_weights_follow_units_under_replace():
    nats, paper = AGLConfig(), AGLConfig(units="paper")
    assert _weights(nats) != _weights(paper)
    assert _weights(dataclasses.replace(nats, units="paper")) == _weights(paper)
    assert _weights(dataclasses.replace(paper, units="nats")) == _weights(nats)
    # a weight set explicitly is kept, the others follow the units; also after a JSON round trip
    mixed = dataclasses.replace(AGLConfig(lambda_align=3.0), units="paper")
    assert (mixed.lambda_align, mixed.lambda_task) == (3.0, paper.lambda_task)
    assert _weights(dataclasses.replace(AGLConfig.from_json(nats.to_json()), units="paper")) == _weights(paper)
    # replacing a weight makes it explicit; EWC's fixed zeros stay zero in any units
    assert dataclasses.replace(dataclasses.replace(nats, lambda_task=0.5), units="paper").lambda_task == 0.5
    ewc = dataclasses.replace(AGLConfig.ewc(), units="paper")
    assert ewc.lambda_align == paper.lambda_align and ewc.lambda_task == ewc.lambda_collision == 0.0


def test_experiment_keys_see_numbers_not_how_they_were_set():
    from agl.experiment.config import agl_settings, stable_hash
    from agl.experiment.plan import settings_key

    explicit = AGLConfig(**dict(zip(WEIGHTS, _weights(AGLConfig()))))
    assert stable_hash(settings_key(AGLConfig())) == stable_hash(settings_key(explicit))
    assert stable_hash(settings_key(AGLConfig())) != stable_hash(settings_key(AGLConfig(units="paper")))
    assert "curvature" not in agl_settings(AGLConfig()) and agl_settings(AGLConfig(curvature="cross"))["curvature"]
    with pytest.raises(ValueError, match="layers"):
        agl_settings(AGLConfig(layers=lambda name: True))


def test_unit_terms_by_hand():
    """Two layers, N = (10, 20), c = 0.5: the sums of docs/MATH.md §7 written out."""
    T = torch.tensor([[1.0, 2.0, 3.0, 0.5], [4.0, 5.0, 6.0, 0.25]], dtype=torch.float64)
    N = torch.tensor([10.0, 20.0], dtype=torch.float64)
    u = unit_terms(T, N, "nats", 0.5, w0_sq=100.0)
    want = {"align_nats": 0.25 * (10 + 80), "align": 22.5, "task": (20 + 100) / 100.0, "overlap": 0.25 * (30 + 120),
            "geodesic": 0.25 * 10 * 1 * 0.5 + 0.25 * 20 * 4 * 0.25}
    assert {k: float(v) for k, v in u.items()} == pytest.approx(want, rel=1e-15)
    assert float(unit_terms(T, N, "nats", 0.5, task_nats_scale=2.0)["task"]) == pytest.approx(0.5 * 2.0 * 120)
    p = unit_terms(T, N, "paper", 0.5)
    assert {k: float(v) for k, v in p.items()} == pytest.approx(
        {"align_nats": 22.5, "align": 2.5, "task": 3.5, "overlap": 4.5, "geodesic": 0.375}, rel=1e-15)
    assert layer_align_nats(T, N, 0.5).tolist() == pytest.approx([2.5, 20.0], rel=1e-15)
