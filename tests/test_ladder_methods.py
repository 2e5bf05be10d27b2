"""The ladder's baselines as recipes of the one fine-tune loop (issue 21): plain LoRA at another learning rate
(`lora_lr`), the isotropic proximal penalty (`l2`) and safety-data mixing (`mix`): their example schedule, their
stage keys and grids, and a tiny pipeline that trains and reports every one of them."""
from __future__ import annotations

import io
import json

import pytest

from agl.experiment.train import example_schedule


def _flat(schedule):
    return [slot for step in schedule for slot in step]


def test_schedule_without_mixing_is_seeded_passes_over_the_task_data():
    sched = example_schedule(13, steps=7, batch=4, seed=3)
    assert [len(s) for s in sched] == [4] * 7
    idx = [i for src, i in _flat(sched)]
    assert {src for src, _ in _flat(sched)} == {"task"}
    assert sorted(idx[:13]) == list(range(13)) and sorted(idx[13:26]) == list(range(13))  # whole passes
    assert sched == example_schedule(13, 7, 4, seed=3)
    assert idx != [i for _, i in _flat(example_schedule(13, 7, 4, seed=4))]  # the seed orders them


@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.1, 0.5])
def test_mixing_replaces_an_even_share_of_slots_and_delays_the_task_stream(fraction):
    steps, batch = 80, 8
    plain = [i for _, i in _flat(example_schedule(2000, steps, batch, seed=0))]
    flat = _flat(example_schedule(2000, steps, batch, seed=0, n_mix=20, mix_fraction=fraction))
    where = [k for k, (src, _) in enumerate(flat) if src == "mix"]
    assert len(where) == round(fraction * steps * batch)
    gaps = [b - a for a, b in zip(where, where[1:])]
    assert max(gaps) - min(gaps) <= 1  # spread evenly over the run, not bunched at its start
    task = [i for src, i in flat if src == "task"]
    assert task == plain[: len(task)]  # the task examples arrive in LoRA's order, none skipped
    demos = [i for src, i in flat if src == "mix"]
    assert set(demos) <= set(range(20)) and len(set(demos)) == min(20, len(demos))  # every demo before a repeat


def test_mixing_without_demonstrations_is_an_error():
    with pytest.raises(ValueError, match="n_mix"):
        example_schedule(10, 2, 4, seed=0, n_mix=0, mix_fraction=0.1)


def test_recipes_keys_and_grids(tmp_path):
    """LoRA's stage key is what it was before recipes existed; each new method changes only what it should; a grid
    point with a main method's recipe is that method's run; strength orders each grid (a smaller lr is stronger)."""
    from agl.experiment.config import ExperimentConfig, Recipe, method_recipe
    from agl.experiment.plan import grid_points, run_names, stage_plan

    cfg = ExperimentConfig(out=str(tmp_path), seeds=[0], methods=["lora", "lora_lr", "l2", "mix"], lora_lr=1e-4,
                           l2_rho=2.0, mix_fraction=0.03, sweep_lr=[1e-4, 3e-5], sweep_l2=[1.0, 2.0],
                           sweep_mix=[0.01, 0.03])
    plan = stage_plan(cfg)
    assert {k: v for k, v in plan["finetune/lora-s0"].key.items() if k not in ("fields", "upstream")} == \
        {"settings": {"kind": "lora"}, "seed": 0}
    assert plan["finetune/lora_lr-s0"].key["lr"] == 1e-4 and plan["finetune/lora_lr-s0"].key["settings"] == {"kind": "lora"}
    assert plan["finetune/mix-s0"].key["mix"] == 0.03 and "lr" not in plan["finetune/mix-s0"].key
    l2 = Recipe.from_key(plan["finetune/l2-s0"].key).settings
    assert l2.curvature == "identity" and l2.lambda_align == 2.0 and not l2.subspaces
    assert Recipe.from_key(plan["finetune/mix-s0"].key) == method_recipe(cfg, "mix")

    pts = {p["label"]: p for p in grid_points(cfg)}
    assert set(pts) == {"lora_lr-0.0001", "lora_lr-3e-05", "l2-r1", "l2-r2", "mix-p0.01", "mix-p0.03"}
    assert pts["lora_lr-3e-05"]["strength"] > pts["lora_lr-0.0001"]["strength"]
    assert pts["mix-p0.03"]["strength"] > pts["mix-p0.01"]["strength"]
    names = run_names(cfg)
    assert names["lora_lr-0.0001"] == {0: "lora_lr"} and names["l2-r2"] == {0: "l2"} and names["mix-p0.03"] == {0: "mix"}
    assert names["lora_lr-3e-05"] == {0: "lora_lr-3e-05"}
    assert {"dev/lora_lr-s0", "evaluate/mix-p0.01-s0", "dev/l2-r1-s0"} <= set(plan)


@pytest.mark.parametrize("bad, match", [({"lora_lr": 0.0}, "lora_lr"), ({"sweep_lr": [-1e-4]}, "sweep_lr"),
                                        ({"mix_fraction": 1.0}, "mix_fraction"), ({"sweep_mix": [0.0]}, "sweep_mix"),
                                        ({"sweep_l2": [-1.0]}, "sweep_l2"), ({"lambda_cross": -1.0}, "lambda_cross")])
def test_bad_ladder_settings_name_the_field(bad, match):
    from agl.experiment.config import ExperimentConfig

    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**bad)


def test_run_order_goes_seed_by_seed(tmp_path):
    from agl.experiment.config import ExperimentConfig
    from agl.experiment.pipeline import _run_order
    from agl.experiment.plan import stage_plan

    cfg = ExperimentConfig(out=str(tmp_path), seeds=[0, 1], methods=["lora", "mix", "safe_lora"], sweep_mix=[0.1])
    order = _run_order(cfg, stage_plan(cfg))
    seeds = [n.rsplit("-s", 1)[1] for n in order if n.startswith(("finetune/", "evaluate/", "dev/"))
             and "safe_lora" not in n]
    assert seeds == sorted(seeds) and set(seeds) == {"0", "1"}
    assert order.index("finetune/mix-p0.1-s0") < order.index("finetune/lora-s1")
    assert order.index("safe_lora/threshold") > order.index("dev/lora-s1") and order[-1] == "report"


@pytest.mark.slow
def test_ladder_methods_train_and_report_on_the_tiny_model(tmp_path):
    """Every new method trains, is evaluated and lands in the report; mixing trains on refusal demonstrations the
    state did not use; the lower learning rate moves the adapter less; L2's log records its penalty."""
    from test_experiment import tiny_config, tiny_factory

    from agl.experiment.cli import print_summary
    from agl.experiment.pipeline import run_pipeline

    cfg = tiny_config(tmp_path / "run", methods=["lora", "lora_lr", "l2", "mix"], sweep_agl=[1e4], sweep_ewc=[],
                      lora_lr=1e-3, l2_rho=1.0, mix_fraction=0.25, sweep_mix=[0.25, 0.5], sweep_lr=[1e-3])
    res = run_pipeline(cfg, model_factory=tiny_factory, progress=False)
    rep = res["report"]
    assert set(rep["methods"]) == {"lora", "lora_lr", "l2", "mix"}
    out = tmp_path / "run"
    log = {m: json.loads((out / "finetune" / f"{m}-s0" / "train_log.json").read_text()) for m in rep["methods"]}
    n_demos = sum(1 for _ in open(out / "aligned_start" / "refusal_demos.jsonl"))
    assert log["mix"]["mix"] == {"fraction": 0.25, "slots": 10, "distinct": 10, "pool": n_demos - cfg.fisher_samples}
    assert "mix" not in log["lora"]
    assert log["l2"]["settings"]["curvature"] == "identity"
    assert log["l2"]["terms"][-1]["align"] > 0 and log["l2"]["terms"][-1]["regularizer"] == pytest.approx(
        cfg.l2_rho * log["l2"]["terms"][-1]["align"])
    # ten steps at a tenth of the learning rate: the adapter, and so the predicted rise, stays smaller
    assert log["lora_lr"]["curve"][-1]["pred_full_nats"] < log["lora"]["curve"][-1]["pred_full_nats"]
    assert (out / "evaluate" / "mix-p0.5-s0" / "drift.json").is_file() and (out / "dev" / "mix-p0.5-s0").is_dir()
    for m, e in rep["methods"].items():
        assert 0.0 <= e["task_em"] <= 1.0 and e["rr_unsafe_after"] is not None, m
    F = rep["frontier"]  # the real plan's grids reach the pairwise comparisons: an entry or the reason there is none
    assert {r["kind"] for r in F["points"]} == {"agl", "lora_lr", "mix"}
    for kind in ("lora_lr", "mix"):
        assert (F[f"agl_vs_{kind}"] is None) == (F["operating_points"][kind] is None)
        assert F[f"agl_vs_{kind}"] is not None or F.get(f"agl_vs_{kind}_error")
    buf = io.StringIO()
    print_summary(res, file=buf)  # the CLI's summary names every baseline of the ladder
    assert "AGL vs lora_lr" in buf.getvalue() and "AGL vs mix" in buf.getvalue()
