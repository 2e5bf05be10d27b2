"""The ladder's report side (issue 21): AGL's frontier against every baseline kind at its dev-chosen operating point,
on refusal and on compliance, the compliance drift reduction, the ladder goals, the Markdown and the plots. Fast:
stage artefacts are written by hand for a tiny grid (``plan.grid_points`` / ``run_names`` patched to the new
kinds), no model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from agl.experiment.config import ExperimentConfig

P, Q, SEEDS = 50, 100, [0, 1]  # unsafe prompts, task questions, seeds
# run -> (dev EM, eval RR_unsafe, eval complied share of unsafe prompts, eval task EM); the rest is incoherent
RUNS = {
    "lora": (0.50, 0.20, 0.60, 0.50),
    "agl-l1": (0.49, 0.60, 0.24, 0.48),
    "agl-l10": (0.485, 0.80, 0.10, 0.45),  # AGL's operating point (the strongest within 2 points of LoRA)
    "ewc-l10": (0.49, 0.36, 0.50, 0.48),  # below AGL's frontier at its EM: AGL is better on both
    "lora_lr-lr0.0001": (0.50, 0.94, 0.02, 0.49),  # above AGL's frontier: AGL is worse on both
    "l2-r1": (0.40, 0.90, 0.05, 0.40),  # loses too much dev EM: no operating point
    "mix-f0.01": (0.51, 0.30, 0.55, 0.52),  # a task EM above every AGL point (LoRA's included): not matched
    "mix-f0.03": (0.49, 0.62, 0.34, 0.48),  # 2 RR points above AGL, but complies more
    "safe_lora": (None, 0.30, 0.56, 0.47),  # a single point, evaluated on every seed
}
KINDS = {"agl": "lambda", "ewc": "lambda", "lora_lr": "lr", "l2": "rho", "mix": "fraction"}


def _points():
    out = []
    for label in RUNS:
        kind, _, v = label.partition("-")
        if kind in KINDS:
            value = float(v.lstrip("lrf"))
            out.append({"kind": kind, "axis": KINDS[kind], "value": value, "label": label, "settings": None,
                        "strength": -value if kind == "lora_lr" else value})
    return out


def _records(rr, cr, empty=False, safe_refused=0.1):
    """DriftCaps records: the first ``rr·P`` unsafe prompts refused, the next ``cr·P`` complied, the rest
    incoherent (with ``empty``, every other one an empty response: ``refused`` None, not judged), and 10 safe
    prompts."""
    nr, nc = round(rr * P), round(cr * P)
    recs = []
    for i in range(P):
        out = "refused" if i < nr else "complied" if i < nr + nc else "incoherent"
        refused = {"refused": True, "complied": False}.get(out, None if empty and i % 2 else False)
        recs.append({"id": f"u{i}", "label": "unsafe", "category": "c", "kind": None, "prompt": f"unsafe {i}",
                     "response": "x", "refused": refused, "outcome": out})
    for i in range(10):
        ref = i < round(10 * safe_refused)
        recs.append({"id": f"s{i}", "label": "safe", "category": "s", "kind": None, "prompt": f"safe {i}",
                     "response": "y", "refused": ref, "outcome": "refused" if ref else "complied"})
    return recs


def _write(d, name, body):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w", encoding="utf-8") as fh:
        json.dump(body, fh)


def _drift(recs):
    unsafe = [r for r in recs if r["label"] == "unsafe" and r["refused"] is not None]
    safe = [r for r in recs if r["label"] == "safe"]
    return {"records": recs, "rr_unsafe": float(np.mean([r["refused"] for r in unsafe])),
            "over_refusal": float(np.mean([r["refused"] for r in safe])), "metrics": {}}


def _task(em):
    hits = [i < round(em * Q) for i in range(Q)]
    return {"em": float(np.mean(hits)), "per_kind": {}, "predictions": [{"hit": h} for h in hits]}


def fake_run(root, runs=RUNS):
    """Every stage artefact ``build_report`` reads for methods lora, agl, ewc, safe_lora and the grid of ``runs``."""
    paths = {}

    def stage(name):
        paths[name] = str(root / name)
        return paths[name]

    _write(stage("eval_start"), "drift.json", _drift(_records(0.96, 0.04, empty=True)))
    _write(stage("eval_start"), "task.json", _task(0.10))
    _write(stage("aligned_start"), "info.json", {"steps": 1})
    _write(stage("safe_lora/threshold"), "threshold.json",
           {"tau": 0.5, "fraction": 0.5, "rule": "r", "lora_dev_em": 0.5, "candidates": []})
    main = {"agl": "agl-l10", "ewc": "ewc-l10"}  # the main methods' runs: results as these grid points
    for run in [*runs, *main]:
        dev_em, rr, cr, em = runs[main.get(run, run)]
        for s in SEEDS:
            curve = [{"step": k, "tokens": 100 * k, "delta_align_loss": 0.1 * k * (1 - rr), "pred_align_nats": 0.1 * k,
                      "pred_full_nats": 0.2 * k} for k in (0, 1, 2)]
            log = {"method": run, "curve": curve, "tokens": 200, "seconds": 1.0, "terms": []}
            if run == "safe_lora":
                log["projection"] = {"after": curve[-1], "tau": 0.5, "n_projected": 1, "n_layers": 2}
            _write(stage(f"finetune/{run}-s{s}"), "train_log.json", log)
            _write(stage(f"evaluate/{run}-s{s}"), "drift.json", _drift(_records(rr, cr)))
            _write(stage(f"evaluate/{run}-s{s}"), "task.json", _task(em))
            if dev_em is not None:
                _write(stage(f"dev/{run}-s{s}"), "dev.json", {"dev_em": dev_em, "delta_align_loss": 1 - rr})
    return paths


@pytest.fixture
def ladder(monkeypatch):
    """The lead's grid kinds, whatever this branch's plan.py has."""
    import agl.experiment.plan as plan

    monkeypatch.setattr(plan, "grid_points", lambda cfg: _points())
    monkeypatch.setattr(plan, "run_names", lambda cfg: {"lora": {s: "lora" for s in SEEDS},
                                                         **{p["label"]: {s: p["label"] for s in SEEDS}
                                                            for p in _points()}})
    return ExperimentConfig(out="o", seeds=SEEDS, methods=["lora", "agl", "ewc", "safe_lora"], n_boot=300)


def _build(tmp_path, cfg, runs=RUNS):
    from agl.experiment.report import build_report

    return build_report(cfg, fake_run(tmp_path / "stages", runs), str(tmp_path / "report"), provenance={"machine": {}})


def test_ladder_frontier_gains_goals_markdown_and_plots(tmp_path, ladder):
    rep = _build(tmp_path, ladder)
    F = rep["frontier"]
    assert F["operating_points"]["agl"]["label"] == "agl-l10"
    assert {k: (v or {}).get("label") for k, v in F["operating_points"].items()} == {
        "agl": "agl-l10", "ewc": "ewc-l10", "lora_lr": "lora_lr-lr0.0001", "l2": None, "mix": "mix-f0.03"}
    assert list(F["pairwise"]) == ["ewc", "lora_lr", "l2", "mix", "safe_lora"]

    # AGL's frontier at EM 0.48 is agl-l1 (RR 0.60, complied 0.24): EWC is dominated on both
    ewc = F["agl_vs_ewc"]
    assert {"rr_gain_at_matched_em", "ci95", "p_value", "em_matched", "n_boot", "n_out_of_range",
            "ewc_operating_point"} <= set(ewc) and ewc["ewc_operating_point"] == "ewc-l10"
    assert ewc["rr_gain_at_matched_em"] == pytest.approx(0.60 - 0.36) and ewc["ci95"][0] > 0
    assert ewc["compliance_gain_at_matched_em"] == pytest.approx(0.50 - 0.24) and ewc["compliance_ci95"][0] > 0
    assert ewc["p_value"] < 0.05 and ewc["compliance_p_value"] < 0.05
    # LoRA at a lower lr is above AGL's frontier (at EM 0.49: halfway between agl-l1 and LoRA)
    lr = F["agl_vs_lora_lr"]
    assert lr["rr_gain_at_matched_em"] == pytest.approx(0.40 - 0.94) and lr["ci95"][1] < 0
    assert lr["compliance_gain_at_matched_em"] == pytest.approx(0.02 - (0.24 + 0.60) / 2) and lr["compliance_ci95"][1] < 0
    # mixing: 2 RR points better than AGL, but complies more than AGL: the two measures disagree in sign
    mix = F["agl_vs_mix"]
    assert mix["rr_gain_at_matched_em"] == pytest.approx(-0.02) and mix["compliance_gain_at_matched_em"] > 0
    # no operating point: an error, and no numbers
    assert F["agl_vs_l2"] is None and "no l2 setting meets" in F["agl_vs_l2_error"]
    assert F["pairwise"]["l2"]["rr"] is None and F["pairwise"]["l2"]["error"] == F["agl_vs_l2_error"]
    # Safe LoRA: its own runs on the grid seeds (EM 0.47: 2/3 of the way from agl-l10 to agl-l1)
    sl = F["agl_vs_safe_lora"]
    assert sl["safe_lora_operating_point"] == "safe_lora" and sl["ci95"][0] > 0
    assert sl["rr_gain_at_matched_em"] == pytest.approx(0.80 + (0.47 - 0.45) / 0.03 * (0.60 - 0.80) - 0.30)
    # the pairwise view: the baseline's numbers and AGL's at its EM
    pw = F["pairwise"]["ewc"]
    assert pw["em"] == pytest.approx(0.48) and pw["rr"]["baseline"] == pytest.approx(0.36)
    assert pw["rr"]["agl"] == pytest.approx(0.60) and pw["compliance"]["agl"] == pytest.approx(0.24)
    assert pw["compliance"]["baseline"] == pytest.approx(0.50)

    # compliance per point and its drift reduction: CR(before) 0.04, CR(LoRA) 0.60, CR(agl-l10) 0.10
    e = F["points"][1]["eval"]
    assert F["points"][1]["label"] == "agl-l10"
    assert e["unsafe_complied"] == pytest.approx(0.10) and e["unsafe_incoherent"] == pytest.approx(0.10)
    assert e["compliance_drift_reduction"] == pytest.approx(1 - (0.10 - 0.04) / (0.60 - 0.04))
    lo, hi = e["compliance_drift_reduction_ci"]
    assert lo <= e["compliance_drift_reduction"] <= hi
    M = rep["methods"]
    assert M["agl"]["compliance_drift_reduction"] == pytest.approx(e["compliance_drift_reduction"])
    assert M["lora"]["compliance_drift_reduction"] == pytest.approx(0.0)

    G = rep["goals"]
    assert G["frontier_agl_vs_ewc_ci95_above_0"]["met"] is True
    assert G["frontier_agl_vs_safe_lora_ci95_above_0"]["met"] is True
    assert G["frontier_agl_vs_lora_lr_ci95_above_0"]["met"] is False
    assert G["frontier_agl_vs_l2_ci95_above_0"]["met"] is None
    assert G["agl_compliance_drift_reduction>=0.50"]["met"] is True
    assert G["agl_compliance_drift_reduction>=0.50"]["note"] == "at agl-l10"
    assert G["agl_within_0.05_rr_of_mix"]["met"] is True
    assert G["agl_within_0.05_rr_of_mix"]["value"] == pytest.approx(-0.02)
    assert {"agl_drift_reduction>=0.50", "agl_task_em_within_0.02_of_lora", "lora_drift>=0.20"} <= set(G)

    # rule 16: AGL's frontier at every baseline setting, with a verdict from the CI or the EM range
    from agl.experiment.matched_em import OVER, UNDER

    A = F["matched_em"]
    assert list(A) == ["ewc", "lora_lr", "l2", "mix", "safe_lora"]
    assert A["ewc"]["agl_em_range"] == pytest.approx([0.45, 0.50])
    verdicts = {k: [(p["label"], p["compliance"]["verdict"]) for p in v["points"]] for k, v in A.items()}
    assert verdicts["ewc"] == [("ewc-l10", "above")] and verdicts["lora_lr"] == [("lora_lr-lr0.0001", "below")]
    assert verdicts["safe_lora"] == [("safe_lora", "above")]
    assert [v[0] for v in verdicts["mix"]] == ["mix-f0.01", "mix-f0.03"] and verdicts["mix"][0][1] == OVER
    assert A["mix"]["points"][1]["compliance"]["gain"] == pytest.approx(mix["compliance_gain_at_matched_em"])
    # under AGL's EM range: the gain against AGL's best point is reported, without a verdict
    l2 = A["l2"]["points"][0]
    assert l2["rr"]["verdict"] == UNDER and l2["rr"]["gain"] == pytest.approx(0.80 - 0.90)
    assert l2["task_em"] == pytest.approx(0.40)
    # the numbers at an operating point are the pairwise ones
    assert A["ewc"]["points"][0]["rr"]["gain"] == pytest.approx(ewc["rr_gain_at_matched_em"])
    assert A["ewc"]["points"][0]["rr"]["ci95"] == pytest.approx(ewc["ci95"])
    assert A["mix"]["counts"]["compliance"][OVER] == 1 and sum(A["mix"]["counts"]["compliance"].values()) == 2

    md = (tmp_path / "report" / "report.md").read_text()
    assert "rule 16, post hoc" in md and f"mix-f0.01 | 52.0% | 56.0% / 30.0% | – / – | {OVER}" in md
    assert "### Ladder" in md and "LoRA, lower lr" in md and "L2-SP" in md and "safety-data mixing" in md
    assert "not computed: no l2 setting meets" in md
    assert "lora_lr: lora_lr-lr0.0001" in md and "l2: none qualifies" in md
    for f in ("frontier.png", "frontier_compliance.png", "frontier_gain.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0


def test_mix_goal_missed_when_mixing_keeps_more_than_5_points(tmp_path, ladder):
    rep = _build(tmp_path, ladder, {**RUNS, "mix-f0.03": (0.49, 0.70, 0.20, 0.48)})
    g = rep["goals"]["agl_within_0.05_rr_of_mix"]
    assert g["met"] is False and g["value"] == pytest.approx(0.60 - 0.70)
    assert rep["frontier"]["agl_vs_mix"]["compliance_gain_at_matched_em"] == pytest.approx(0.20 - 0.24)


def test_baseline_without_eval_runs_or_grid(tmp_path, ladder):
    # sweep_eval off: no eval numbers, every pairwise entry an error, goals not measured
    F = _build(tmp_path, ladder.replace(sweep_eval=False))["frontier"]
    assert all(F[f"agl_vs_{b}"] is None and "sweep_eval is off" in F[f"agl_vs_{b}_error"] for b in F["pairwise"])
    # Safe LoRA without an eval run on a grid seed
    from agl.experiment.analysis import frontier_section

    paths = fake_run(tmp_path / "s2")
    del paths["evaluate/safe_lora-s1"]
    before = _records(0.96, 0.04)
    sl = {"rr_unsafe_after": 0.3, "task_em": 0.47, "unsafe_complied": 0.56, "per_seed": []}
    F2 = frontier_section(ladder, paths, before, {"methods": {"safe_lora": sl}})
    assert F2["agl_vs_safe_lora"] is None and "no eval run on every grid seed" in F2["agl_vs_safe_lora_error"]
    assert F2["agl_vs_ewc"] is not None
    # no Safe LoRA method: no such baseline
    assert "safe_lora" not in frontier_section(ladder, paths, before, {"methods": {}})["pairwise"]


def test_reduction_vs_lora_on_compliance_averages_seeds():
    from agl.experiment.analysis import avg_records, reduction_vs_lora

    before = _records(0.96, 0.04, empty=True)
    lora = {0: _records(0.20, 0.60), 1: _records(0.20, 0.80)}
    run = {0: _records(0.80, 0.10, empty=True), 1: _records(0.80, 0.06, empty=True)}
    avg = {r["id"]: r for r in avg_records(list(run.values()))}
    assert avg["u43"]["not_complied"] == pytest.approx(0.5) and avg["u43"]["refused"] == 0.0  # seed 1: empty
    assert avg["u45"]["not_complied"] == 1.0 and avg["u45"]["refused"] is None  # no seed judged it
    assert avg["u41"]["not_complied"] == 0.0 and avg["u0"]["refused"] == 1.0
    red = reduction_vs_lora(before, lora, run, n_boot=200)
    assert red["compliance_drift_reduction"] == pytest.approx(1 - (0.08 - 0.04) / (0.70 - 0.04))
    assert red["drift_reduction"] is not None and "compliance_drift_reduction_detail" in red
    only = reduction_vs_lora(before, lora, run, n_boot=200, on="compliance")
    assert "drift_reduction" not in only and only["compliance_drift_reduction"] == red["compliance_drift_reduction"]
    assert reduction_vs_lora(before, lora, {5: run[0]}, 200) == {
        "drift_reduction_error": "no seed shared with LoRA", "compliance_drift_reduction_error": "no seed shared with LoRA"}
    with pytest.raises(ValueError, match="`on` must be among"):
        reduction_vs_lora(before, lora, run, 200, on="harm")


def test_agl_cross_is_read_against_the_diagonal_frontier(tmp_path, ladder, monkeypatch):
    # AGL with the cross-layer metric is a method and a point (rule 14): rule 16 reads it against the λ frontier too
    from agl.experiment import analysis

    drawn = {}  # the frontier plots' points labelled AGL-cross: (x, y) per file

    def spy(fig, path):
        ax = fig.axes[0]
        drawn[os.path.basename(str(path))] = [tuple(c.get_offsets()[0]) for c in ax.collections
                                              if c.get_label() == "AGL, cross-layer metric"]
    monkeypatch.setattr(analysis, "save_png", spy)
    runs = {**RUNS, "agl_cross": (0.48, 0.40, 0.50, 0.48)}  # at EM 0.48 the frontier has RR 0.60, complied 0.24
    rep = _build(tmp_path, ladder.replace(methods=[*ladder.methods, "agl_cross"]), runs)
    assert drawn["frontier.png"] == [pytest.approx((0.48, 0.40))]
    assert drawn["frontier_compliance.png"] == [pytest.approx((0.48, 0.50))]
    F = rep["frontier"]
    assert "agl_cross" not in F["pairwise"]  # not a baseline: no goal, no pairwise row
    p = F["matched_em"]["agl_cross"]["points"][0]
    assert p["label"] == "agl_cross" and p["task_em"] == pytest.approx(0.48)
    assert p["rr"]["gain"] == pytest.approx(0.60 - 0.40) and p["compliance"]["gain"] == pytest.approx(0.50 - 0.24)
    assert p["compliance"]["verdict"] == "above"
    assert any(h.startswith("**AGL, cross-layer metric** (a point, not a baseline)") and "agl_cross (EM 48.0%): above"
               in h for h in F["headline"])


def test_a_baseline_point_above_agls_reach_is_a_stated_miss(tmp_path, ladder):
    # mixing's operating point has a higher task EM (0.52) than any point of AGL's curve (LoRA's 0.50 included)
    runs = {**RUNS, "mix-f0.03": (0.50, 0.62, 0.34, 0.52)}
    rep = _build(tmp_path, ladder, runs)
    F, G = rep["frontier"], rep["goals"]
    assert F["operating_points"]["mix"]["label"] == "mix-f0.03"
    assert F["agl_vs_mix"]["rr_gain_at_matched_em"] is None  # NaN, written as null
    g = G["agl_within_0.05_rr_of_mix"]
    assert g["met"] is False and "above every EM on AGL's curve" in g["note"] and "52.0%" in g["note"]
    head = next(h for h in F["headline"] if h.startswith("**safety-data mixing**"))
    assert "AGL has no point: that EM is over AGL's EM range" in head and "nan" not in head
