"""Term sweeps (issue 10, item 3): config and CLI, grid points and their runs, the stage plan (dev only, cache keys
of runs without sweeps unchanged), rule 7 (``choose_term_weight``) and the report section from hand-made stage
artefacts. The pipeline end to end with a sweep: tests/test_experiment.py::test_pipeline_end_to_end."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest

from agl.experiment.config import ExperimentConfig, demo_config, load_config
from agl.experiment.plan import grid_points, run_names, stage_plan
from agl.loss import AGLConfig


# every term on (weight 1 each), so each term point differs from the base
_ALL_TERMS = AGLConfig(lambda_align=1.0, lambda_task=1.0, lambda_collision=1.0)
_GRID = dict(seeds=[0, 1], methods=["lora", "agl", "ewc", "safe_lora"], sweep_agl=[1.0, 10.0],
             sweep_budget=[0.1, 0.01], sweep_ewc=[10.0], sweep_seeds=[0])
CONFIGS = {"default": (ExperimentConfig, {}), "demo": (demo_config, {}), "grid": (ExperimentConfig, _GRID)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stage_keys_without_sweeps_do_not_hold_the_sweep_field(name):
    """A run without term sweeps keys its stages as runs did before sweeps existed: no key mentions them (so the
    artefacts cached before them stay valid)."""
    make, kw = CONFIGS[name]
    for st in stage_plan(make(out="o", **kw)).values():
        assert "sweep_terms" not in json.dumps(st.key), st.name


def test_sweeps_add_stages_and_change_no_other_key():
    base = ExperimentConfig(out="o", **_GRID)
    swept = base.replace(sweep_terms={"task": [1.0], "overlap": [0.5], "geodesic": [2.0]})
    assert "sweep_terms" in swept.to_dict()  # the saved config holds it; the stage keys do not
    a, b = stage_plan(base), stage_plan(swept)
    assert set(a) < set(b)
    assert all(b[n].hash == a[n].hash for n in a if n != "report")
    assert b["report"].hash != a["report"].hash
    for n, st in b.items():
        assert ("sweep_terms" in json.dumps(st.key)) == (n == "report"), n


def test_term_points_settings_labels_and_runs():
    cfg = ExperimentConfig(out="o", seeds=[0], methods=["lora", "agl"], sweep_seeds=[0, 1], agl=_ALL_TERMS,
                           sweep_terms={"task": [10, 0.5, 0], "overlap": [2], "geodesic": [3]})
    pts = {p["label"]: p for p in grid_points(cfg) if p["kind"] == "term"}
    assert list(pts) == ["agl-base", "agl-t0", "agl-t0.5", "agl-t10", "agl-o2", "agl-g3"]
    off = dataclasses.replace(cfg.agl, lambda_task=0.0, lambda_collision=0.0)
    assert pts["agl-base"]["settings"] == off and pts["agl-base"]["axis"] is None
    assert pts["agl-t10"]["settings"] == dataclasses.replace(off, lambda_task=10.0)
    assert pts["agl-o2"]["settings"] == dataclasses.replace(off, lambda_collision=2.0, alpha=1.0)
    assert pts["agl-g3"]["settings"] == dataclasses.replace(off, lambda_collision=3.0, alpha=0.0)
    assert (pts["agl-t10"]["axis"], pts["agl-t10"]["value"], pts["agl-t10"]["strength"]) == ("task", 10.0, 10.0)
    names = run_names(cfg)
    assert names["agl-t0"] == names["agl-base"] == {0: "agl-base", 1: "agl-base"}  # same settings: one run
    assert names["agl-o2"] == {0: "agl-o2", 1: "agl-o2"}
    plan = stage_plan(cfg)
    for label in ("agl-base", "agl-t0.5", "agl-t10", "agl-o2", "agl-g3"):
        for s in (0, 1):
            assert {f"finetune/{label}-s{s}", f"dev/{label}-s{s}"} <= set(plan)
            assert f"evaluate/{label}-s{s}" not in plan  # dev data only, whatever sweep_eval says
    assert "finetune/agl-t0-s0" not in plan
    assert {"dev/lora-s0", "dev/lora-s1"} <= set(plan) and "evaluate/lora-s1" not in plan  # no frontier: no eval
    assert plan["finetune/agl-g3-s1"].key["settings"]["alpha"] == 0.0


def test_term_points_share_runs_with_main_methods_and_frontier_points():
    off = {"lambda_align": 1.0, "lambda_task": 0.0, "lambda_collision": 0.0}
    cfg = ExperimentConfig(out="o", seeds=[0], methods=["lora", "agl"], agl=off, sweep_seeds=[0, 1],
                           sweep_terms={"task": [1.0]})
    assert run_names(cfg)["agl-base"] == {0: "agl", 1: "agl-base"}  # the main AGL run of seed 0 is the base
    cfg = ExperimentConfig(out="o", seeds=[0], methods=["lora"], agl={**off, "lambda_align": 3.0}, sweep_agl=[1.0],
                           sweep_terms={"task": [1.0]})
    names = run_names(cfg)
    assert names["agl-l1"] == {0: "agl-l1"} and names["agl-base"] == {0: "agl-base"}
    cfg = cfg.replace(agl=dataclasses.replace(cfg.agl, lambda_align=1.0))
    assert run_names(cfg)["agl-base"] == {0: "agl-l1"}  # equal to a frontier point: its run
    plan = stage_plan(cfg)
    assert "evaluate/agl-l1-s0" in plan and "finetune/agl-base-s0" not in plan
    labels = [r["label"] for r in grid_points(cfg) if r["kind"] != "term"]
    assert labels == ["agl-l1"]


def test_sweep_terms_validation_and_files(tmp_path):
    for bad, match in (({"collision": [1.0]}, r"sweep_terms.*unknown term.*'collision'"),
                       ({"task": [1.0, -2.0]}, r"sweep_terms\['task'\].*>= 0"),
                       ({"task": 1.0}, r"sweep_terms\['task'\].*list"),
                       ({"task": [float("nan")]}, r"sweep_terms\['task'\]"),
                       ([1.0], r"sweep_terms.*table")):
        with pytest.raises(ValueError, match=match):
            ExperimentConfig(sweep_terms=bad)
    c = ExperimentConfig(sweep_terms={"geodesic": [3, 1, 3], "task": [0.1]})
    assert c.sweep_terms == {"task": [0.1], "geodesic": [1.0, 3.0]}  # one order, no repeats, floats
    assert load_config(None, {"sweep_terms": {"task": [1, 10]}}).sweep_terms == {"task": [1.0, 10.0]}
    p = tmp_path / "c.toml"
    p.write_text("[experiment.sweep_terms]\ntask = [1, 10]\noverlap = [0.5]\n")
    over = load_config(str(p), {"sweep_terms": {"overlap": [2.0]}})  # a flag's term replaces the file's
    assert over.sweep_terms == {"task": [1.0, 10.0], "overlap": [2.0]}
    assert load_config(None, over.to_dict()) == over  # the saved config round-trips


def _parse(argv):
    from agl.experiment.cli import add_common_options, config_from_args

    p = argparse.ArgumentParser()
    add_common_options(p)
    return config_from_args(p.parse_args(argv))


def test_cli_sweep_term():
    from agl.errors import CLIError

    cfg = _parse(["--sweep-term", "task=1,10", "--sweep-term", "geodesic=0.5", "--sweep-term", "task=100"])
    assert cfg.sweep_terms == {"task": [1.0, 10.0, 100.0], "geodesic": [0.5]}
    assert _parse(["--set", 'sweep_terms={"overlap": [3]}']).sweep_terms == {"overlap": [3.0]}
    with pytest.raises(CLIError, match="sweep_terms"):
        _parse(["--sweep-term", "nope=1"])
    with pytest.raises(CLIError, match="sweep_terms"):
        _parse(["--sweep-term", "task=-1"])
    with pytest.raises(SystemExit):
        _parse(["--sweep-term", "task"])


# ------------------------------------------------------------------------------------------------------ rule 7
def _pt(w, em, dl):
    return {"weight": w, "dev_em": em, "dev_delta_align": dl}


def test_choose_term_weight():
    from agl.experiment.frontier import choose_term_weight

    base = {"dev_delta_align": 1.0}
    pts = [_pt(1, 0.50, 0.95), _pt(10, 0.49, 0.70), _pt(100, 0.40, 0.10)]
    assert choose_term_weight(pts, base, 0.50, 0.02)["weight"] == 10  # 100 is excluded: EM too low
    assert choose_term_weight(pts, base, 0.50, 0.20)["weight"] == 100
    assert choose_term_weight(pts[:1], base, 0.50, 0.02) is None  # 5% below the base: under the 10% gain
    assert choose_term_weight([_pt(1, 0.5, 0.9)], base, 0.50, 0.02)["weight"] == 1  # exactly 10%: chosen
    assert choose_term_weight([_pt(1, 0.5, 0.9)], base, 0.50, 0.02, min_gain=0.2) is None
    assert choose_term_weight([_pt(1, 0.47, 0.1)], base, 0.50, 0.02) is None  # nothing within the EM tolerance
    assert choose_term_weight([_pt(1, 0.5, 0.3), _pt(3, 0.5, 0.3)], base, 0.5, 0.02)["weight"] == 1  # tie: smaller
    assert choose_term_weight(pts, {"dev_delta_align": -0.1}, 0.50, 0.02) is None  # the base did not forget
    assert choose_term_weight([_pt(1, None, 0.1), _pt(2, 0.5, None)], base, 0.50, 0.02) is None
    with pytest.raises(ValueError, match="LoRA's dev EM"):
        choose_term_weight(pts, base, float("nan"), 0.02)


# ----------------------------------------------------------------------------------------- report section
def _fake_run(tmp_path, cfg, numbers, legacy=()):
    """Stage directories with dev.json and train_log.json for every run the term sweeps read: ``numbers``: run ->
    (dev EM, dev ΔL_align, grad share of its term); runs in ``legacy`` have logs without grad shares."""
    paths = {}
    for label, seeds in run_names(cfg).items():
        for s, run in seeds.items():
            em, dl, share = numbers[run]
            for kind, name, body in (("dev", "dev.json", {"run": run, "seed": s, "dev_em": em, "n": 8,
                                                          "delta_align_loss": dl}),
                                     ("finetune", "train_log.json", {"curve": [{"step": 10, "delta_align_loss": dl}]})):
                d = tmp_path / f"{kind}-{run}-s{s}"
                os.makedirs(d, exist_ok=True)
                if run not in legacy and kind == "finetune":
                    key = "grad_shares_unit" if run == "lora" else "grad_shares"
                    body[key] = {f"grad_share_{t}": share for t in ("align", "task", "overlap", "geodesic")}
                (d / name).write_text(json.dumps(body))
                paths[f"{kind}/{run}-s{s}"] = str(d)
    return paths


def test_term_sweeps_section_markdown_and_plot(tmp_path):
    from agl.experiment.term_sweeps import markdown_lines, plot, term_sweeps_section

    cfg = ExperimentConfig(out="o", seeds=[0, 1], methods=["lora"], sweep_terms={"task": [1, 10], "geodesic": [5]})
    assert term_sweeps_section(ExperimentConfig(out="o"), {}) is None
    numbers = {"lora": (0.50, 0.80, 0.3), "agl-base": (0.50, 1.00, 0.0), "agl-t1": (0.50, 0.85, 0.2),
               "agl-t10": (0.49, 0.60, 0.7), "agl-g5": (0.50, 0.95, 0.1)}
    T = term_sweeps_section(cfg, _fake_run(tmp_path, cfg, numbers, legacy=("agl-g5",)))
    assert T["lora_dev_em"] == pytest.approx(0.50) and T["base"]["dev_delta_align"] == pytest.approx(1.0)
    assert T["lora_grad_shares_unit"]["grad_share_task"] == pytest.approx(0.3)
    task = T["terms"]["task"]
    assert [p["weight"] for p in task["points"]] == [1.0, 10.0]
    assert task["chosen"] == 10.0 and task["helps"] is True
    assert task["points"][1]["grad_share"] == pytest.approx(0.7) and len(task["points"][1]["per_seed"]) == 2
    geo = T["terms"]["geodesic"]
    assert geo["chosen"] == 0.0 and geo["helps"] is False  # 5% below the base
    assert geo["points"][0]["grad_share"] is None  # a log from before grad shares were recorded
    lines = "\n".join(markdown_lines({"term_sweeps": T}))
    assert "**task**: chosen weight 10" in lines and "**geodesic**: does not help" in lines
    plot({"term_sweeps": T}, str(tmp_path))
    assert (tmp_path / "term_sweeps.png").stat().st_size > 0
    # LoRA logs from before grad_shares_unit existed: no natural-scale line, nothing else changes
    old = term_sweeps_section(cfg, _fake_run(tmp_path / "old", cfg, numbers, legacy=("lora", "agl-g5")))
    assert old["lora_grad_shares_unit"] is None and old["terms"] == T["terms"]
