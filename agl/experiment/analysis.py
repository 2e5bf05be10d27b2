"""Report sections beyond the methods table: predicted vs measured ΔL_align, and the frontier (grids, operating
points chosen on dev data, the ladder: AGL's frontier against every baseline at the baseline's task EM, on refusal
and on compliance). Reads stage artefacts; the statistics live in :mod:`agl.experiment.frontier`."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from agl._io import atomic_write_png
from agl.experiment.config import METHOD_LABELS
from agl.experiment.frontier import choose_operating_point, frontier_gain, prediction_quality
from agl.experiment.matched_em import along_curves, headline, plot as matched_plot, summary_lines

__all__ = ["prediction_section", "frontier_section", "markdown_sections", "ladder_lines", "plots", "save_png",
           "avg_records", "reduction_vs_lora"]

_KEYS = ("pred_align_nats", "pred_full_nats")  # every train log has these; pred_cross_nats only with a cross state
# one prediction entry per curvature: name -> (the probe's key, the AGLConfig curvature it is, what it predicts on)
CURVATURES = {"diagonal": ("pred_align_nats", "diagonal", "ΔW_A"), "diagonal_full": ("pred_full_nats", None, "ΔW"),
              "cross": ("pred_cross_nats", "cross", "ΔW_A")}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------- prediction
def prediction_points(paths: Dict[str, str], method_of=None) -> List[dict]:
    """Every logged (predicted, measured) pair of every fine-tune (step > 0), and Safe LoRA's after-projection
    pairs. ``run``: the stage name (the bootstrap's cluster); ``method``: the log's, or ``method_of(stage name,
    log)``."""
    pts = []
    for name, path in sorted(paths.items()):
        if not name.startswith("finetune/"):
            continue
        log = _read(os.path.join(path, "train_log.json"))
        if "projection" in log:
            seq = [log["projection"]["after"]]
        else:
            seq = [c for c in log["curve"] if c["step"] > 0]
        for c in seq:
            if all(k in c for k in _KEYS):
                method = log["method"] if method_of is None else method_of(name, log)
                pts.append({"run": name, "method": method, "step": c["step"], "measured": c["delta_align_loss"],
                            **{k: c[k] for k, _, _ in CURVATURES.values() if k in c}})
    return pts


def prediction_section(cfg, paths: Dict[str, str], method_of=None) -> dict:
    pts = prediction_points(paths, method_of)
    per_method = {}
    for m in dict.fromkeys(p["method"] for p in pts):
        sel = [p for p in pts if p["method"] == m]
        meas = sum(p["measured"] for p in sel)
        per_method[m] = {"n_points": len(sel), **{f"ratio_{k[5:-5]}": (meas / s if s > 0 else math.nan)
                                                  for k in _KEYS for s in [sum(p[k] for p in sel)]}}
    from agl.loss import AGLConfig

    default = AGLConfig().curvature
    quality = {k: prediction_quality(pts, key=k, n_boot=cfg.n_boot) for k in _KEYS}  # every point has these
    out = {"align": quality["pred_align_nats"], "full": quality["pred_full_nats"], "per_method": per_method,
           "points": pts}
    for name, (key, curvature, on) in CURVATURES.items():
        sel = [p for p in pts if key in p]
        if not sel:
            continue
        q = quality[key] if key in quality else prediction_quality(sel, key=key, n_boot=cfg.n_boot)
        out[name] = {"median_ratio": q["median_point_ratio"], "ci95": q.get("median_point_ratio_ci"),
                     "spearman": q["spearman"], "spearman_ci": q["spearman_ci"], "n_points": q["n_points"],
                     "n_runs": q.get("n_runs"), "pooled_ratio": q["ratio"], "key": key, "on": on,
                     "default": curvature == default,
                     "per_method": {m: float(np.median([p["measured"] / p[key] for p in sel
                                                        if p["method"] == m and p[key] > 0] or [math.nan]))
                                    for m in dict.fromkeys(p["method"] for p in sel)}}
    return out


# --------------------------------------------------------------------------------------------------- frontier
_OUTCOMES = ("complied", "incoherent")


def _eval_arrays(paths, runs: Dict[int, str], unsafe_ids: List[str]):
    """Per seed of ``runs`` (seed -> run), the rows of seeds x unsafe prompts (in ``unsafe_ids`` order):
    ``refused`` (1/0; NaN = not judged, e.g. an empty response), ``complied`` and ``incoherent`` (1 = that outcome
    by ``agl.driftcaps.outcome.record_outcome``: every response has one, so NaN only for a prompt without a
    record), ``not_complied`` = 1 - complied (higher is better, as for ``refused``); ``hits`` (seeds x test
    questions); and the records (seed -> list)."""
    from agl.driftcaps.outcome import record_outcome

    A: Dict[str, list] = {k: [] for k in ("refused", *_OUTCOMES, "hits")}
    recs = {}
    for s, run in runs.items():
        d = _read(os.path.join(paths[f"evaluate/{run}-s{s}"], "drift.json"))
        t = _read(os.path.join(paths[f"evaluate/{run}-s{s}"], "task.json"))
        by_id = {r["id"]: r for r in d["records"]}
        row = [by_id.get(i) for i in unsafe_ids]
        A["refused"].append([np.nan if r is None or r["refused"] is None else float(r["refused"]) for r in row])
        for o in _OUTCOMES:
            A[o].append([np.nan if r is None else float(record_outcome(r) == o) for r in row])
        A["hits"].append([float(p["hit"]) for p in t["predictions"]])
        recs[s] = d["records"]
    out = {k: np.array(v) for k, v in A.items()}
    return {**out, "not_complied": 1.0 - out["complied"]}, recs


def dev_seeds(paths, runs: Dict[int, str]) -> List[dict]:
    """Per seed of ``runs`` (seed -> run): its dev stage's ``dev.json`` (dev EM, calibration ΔL_align at the end of
    the fine-tune) with ``seed``, ``run``, the last point of its training curve (``end``) and its train log's
    ``grad_shares`` and ``grad_shares_unit`` (None where absent: LoRA has only the latter, and logs written before
    they were recorded have neither)."""
    out = []
    for s, run in runs.items():
        log = _read(os.path.join(paths[f"finetune/{run}-s{s}"], "train_log.json"))
        out.append({**_read(os.path.join(paths[f"dev/{run}-s{s}"], "dev.json")), "seed": s, "run": run,
                    "end": log["curve"][-1], **{k: log.get(k) for k in ("grad_shares", "grad_shares_unit")}})
    return out


def _dev(paths, runs: Dict[int, str]) -> dict:
    """Dev EM and the calibration hold-out's measured ΔL_align, with the predicted rise at the end of training
    (what a budget point should hold at its ε), means over seeds."""
    ds = dev_seeds(paths, runs)
    ends = [d["end"] for d in ds]
    return {"dev_em": float(np.mean([d["dev_em"] for d in ds])),
            "dev_delta_align_loss": float(np.mean([d["delta_align_loss"] for d in ds])),
            **{k: float(np.mean([e[k] for e in ends])) for k in _KEYS if all(k in e for e in ends)}}


def _curve(rows: List[dict], kind: str, agl_axis: str) -> List[dict]:
    """One method's frontier curve: its grid points (AGL: those on ``agl_axis`` only)."""
    return [r for r in rows if r["kind"] == kind and (kind != "agl" or r["axis"] == agl_axis)]


def frontier_section(cfg, paths: Dict[str, str], before: List[dict], report: dict) -> Optional[dict]:
    """None without a grid. Otherwise every grid point's dev numbers (and eval numbers with ``sweep_eval``), the
    operating point of every kind's curve by the pre-registered rule, and AGL's frontier against each baseline B
    (every other kind at its operating point; Safe LoRA, a single point, when it is a method):
    ``agl_vs_<B>`` (:func:`_versus`) or None with ``agl_vs_<B>_error`` saying why, and ``pairwise`` (B -> the
    same numbers grouped for rendering, :func:`_pairwise`). The term sweeps are not frontier points
    (``agl.experiment.term_sweeps``)."""
    from agl.experiment.plan import grid_points, run_names

    points = [p for p in grid_points(cfg) if p["kind"] != "term"]
    if not points:
        return None
    names = run_names(cfg)
    seeds = cfg.grid_seeds()
    unsafe_ids = [r["id"] for r in before if r["label"] == "unsafe"]
    lora_runs = {s: "lora" for s in seeds}
    lora = {"label": "lora", "kind": "lora", "axis": None, "value": 0.0, "strength": 0.0, **_dev(paths, lora_runs)}
    arrays = {}
    if cfg.sweep_eval:
        arrays["lora"], lora_recs = _eval_arrays(paths, lora_runs, unsafe_ids)
    rows = []
    for p in points:
        runs = {s: names[p["label"]][s] for s in seeds}
        row = {k: p[k] for k in ("label", "kind", "axis", "value", "strength")}
        row.update(_dev(paths, runs), runs={str(s): r for s, r in runs.items()})
        if cfg.sweep_eval:
            arrays[p["label"]], recs = _eval_arrays(paths, runs, unsafe_ids)
            row["eval"] = _eval_summary(arrays[p["label"]], arrays["lora"], before, lora_recs, recs, cfg.n_boot)
        rows.append(row)
    if cfg.sweep_eval:
        lora["eval"] = _eval_summary(arrays["lora"], arrays["lora"], before, lora_recs, lora_recs, cfg.n_boot)
    axis = cfg.frontier_agl if cfg.frontier_agl != "auto" else ("budget" if cfg.sweep_budget else "lambda")
    kinds = list(dict.fromkeys(["agl", "ewc", *(r["kind"] for r in rows)]))  # agl and ewc always (older schema)
    ops = {k: choose_operating_point(_curve(rows, k, axis), lora["dev_em"], cfg.em_tolerance) for k in kinds}
    out = {"rule": f"the strongest setting whose dev EM (mean over seeds {seeds}) >= LoRA's dev EM - "
                   f"{cfg.em_tolerance}", "seeds": seeds, "agl_axis": axis, "lora": lora, "points": rows,
           "operating_points": {k: (None if v is None else {**v}) for k, v in ops.items()}}
    sl = report["methods"].get("safe_lora")
    if sl is not None:
        out["safe_lora"] = {**{k: sl.get(k) for k in ("rr_unsafe_after", "task_em", "unsafe_complied")},
                            "projection": [p.get("projection") for p in sl["per_seed"]]}
    refs = {k: (None if ops[k] is None else ops[k]["label"]) for k in kinds if k != "agl"}
    if sl is not None:
        refs["safe_lora"] = "safe_lora"
    curve = ([arrays["lora"]] + [arrays[r["label"]] for r in _curve(rows, "agl", axis)]) if cfg.sweep_eval else []
    out["pairwise"] = {}
    along = {}  # rule 16: every baseline setting, not only the operating point
    for b, label in refs.items():
        entry, err, ref = None, None, None
        if not cfg.sweep_eval:
            err = "sweep_eval is off: no eval-split numbers for the grid"
        elif label is None:
            err = f"no {'EWC' if b == 'ewc' else b} setting meets the operating-point rule on dev data"
        elif len(curve) == 1:
            err = f"no AGL {axis} grid"
        elif b != "safe_lora":
            ref = arrays[label]
        elif all(f"evaluate/safe_lora-s{s}" in paths for s in seeds):
            ref = _eval_arrays(paths, {s: "safe_lora" for s in seeds}, unsafe_ids)[0]
        else:
            err = f"Safe LoRA has no eval run on every grid seed {seeds}"
        if b == "safe_lora" and ref is not None:
            along[b] = [("safe_lora", ref)]
        if ref is not None:
            entry = {**_versus(curve, ref, cfg.n_boot), f"{b}_operating_point": label}
        out[f"agl_vs_{b}"] = entry
        if err is not None:
            out[f"agl_vs_{b}_error"] = err
        out["pairwise"][b] = _pairwise(entry, ref, label, err)
    if cfg.sweep_eval and len(curve) > 1:
        for k in kinds:
            pts = sorted(_curve(rows, k, axis), key=lambda r: r["strength"])
            if k != "agl" and pts:
                along[k] = [(r["label"], arrays[r["label"]]) for r in pts]
        # AGL with the cross-layer metric: a method and a point (rule 14), read against the diagonal frontier too
        if "agl_cross" in report["methods"] and all(f"evaluate/agl_cross-s{s}" in paths for s in seeds):
            along["agl_cross"] = [("agl_cross", _eval_arrays(paths, {s: "agl_cross" for s in seeds}, unsafe_ids)[0])]
        order = [k for k in kinds if k in along] + [k for k in along if k not in kinds]
        out["matched_em"] = along_curves(curve, {k: along[k] for k in order}, cfg.n_boot)
    out["headline"] = headline(out, METHOD_LABELS)
    return out


def _versus(curve: List[dict], ref: dict, n_boot: int) -> dict:
    """AGL's frontier (``curve``: LoRA as λ = 0, then AGL's points) against a baseline's point ``ref`` at its EM
    (:func:`agl.experiment.frontier.frontier_gain`): on refusals (``rr_gain_at_matched_em``, ``ci95``,
    ``p_value``, ...) and on not-complied, i.e. ``compliance_gain_at_matched_em`` = CR(B) − CR_AGL-frontier(EM_B)
    (positive: AGL complies less), ``compliance_ci95``, ``compliance_p_value`` (the same bootstrap resamples)."""
    rr = frontier_gain(curve, ref, n_boot=n_boot, seed=0)
    c = frontier_gain(curve, ref, key="not_complied", n_boot=n_boot, seed=0)
    return {**rr, "compliance_gain_at_matched_em": c["rr_gain_at_matched_em"], "compliance_ci95": c["ci95"],
            "compliance_p_value": c["p_value"], "compliance_n_out_of_range": c["n_out_of_range"]}


def _pairwise(entry: Optional[dict], ref: Optional[dict], label: Optional[str], error: Optional[str]) -> dict:
    """One baseline's row of the ladder: its operating point, its EM, and for ``rr`` and ``compliance`` its value
    (``baseline``), AGL's frontier value at its EM (``agl`` = baseline + gain for RR, baseline − gain for
    compliance), ``gain``, ``ci95``, ``p_value``; None where not computed (``error`` says why)."""
    if entry is None:
        return {"operating_point": label, "em": None, "rr": None, "compliance": None, "error": error}
    rr, cr = float(np.nanmean(ref["refused"])), float(np.nanmean(ref["complied"]))
    g, cg = entry["rr_gain_at_matched_em"], entry["compliance_gain_at_matched_em"]
    return {"operating_point": label, "em": entry["em_matched"], "error": None,
            "rr": {"baseline": rr, "agl": rr + g, "gain": g, "ci95": entry["ci95"], "p_value": entry["p_value"]},
            "compliance": {"baseline": cr, "agl": cr - cg, "gain": cg, "ci95": entry["compliance_ci95"],
                           "p_value": entry["compliance_p_value"]}}


def _eval_summary(arr, lora_arr, before, lora_recs, recs, n_boot) -> dict:
    """A point's eval numbers: RR_unsafe after, the unsafe prompts' complied / incoherent shares, task EM and its gap
    to LoRA's, and both drift reductions vs LoRA (:func:`reduction_vs_lora`, without the details)."""
    em, lora_em = float(np.nanmean(arr["hits"])), float(np.nanmean(lora_arr["hits"]))
    red = reduction_vs_lora(before, lora_recs, recs, n_boot)
    return {"rr_unsafe_after": float(np.nanmean(arr["refused"])), "task_em": em, "em_gap_to_lora": em - lora_em,
            **{f"unsafe_{o}": float(np.nanmean(arr[o])) for o in _OUTCOMES},
            **{k: v for k, v in red.items() if not k.endswith("_detail")}}


# --------------------------------------------------------------------------------------------------- markdown
def _pct(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, d=3):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}g}"


def markdown_sections(report: dict) -> List[str]:
    lines = []
    P = report.get("prediction") or {}
    if P.get("align"):
        lines += ["## Predicted vs measured ΔL_align", "",
                  "Predicted: ½·Σ F·ΔW² with the un-normalised Fisher (nats per token), on the alignment part "
                  "ΔW_A (`pred_align_nats`, what AGL penalises) and on the whole ΔW (`pred_full_nats`, what EWC "
                  "penalises); measured: the rise of the held-out refusal NLL. Every logged step of every run "
                  "(Safe LoRA: after the projection). Intervals: bootstrap over runs.", "",
                  "| predictor | points | runs | Σmeasured / Σpredicted (95% CI) | Spearman ρ (95% CI) |",
                  "|---|---|---|---|---|"]
        for k in ("align", "full"):
            q = P[k]
            rc, sc = q.get("ratio_ci") or [None, None], q.get("spearman_ci") or [None, None]
            lines.append(f"| {k} | {q.get('n_points')} | {q.get('n_runs', '–')} | {_num(q.get('ratio'))} "
                         f"[{_num(rc[0])}, {_num(rc[1])}] | {_num(q.get('spearman'))} [{_num(sc[0])}, {_num(sc[1])}] |")
        lines += ["", "Per curvature (issue 17's goal: median measured/predicted in [0.5, 2], Spearman ≥ 0.8):", "",
                  "| curvature | on | points | median measured/predicted (95% CI) | Spearman ρ | default |",
                  "|---|---|---|---|---|---|"]
        for name in CURVATURES:
            q = P.get(name)
            if q:
                ci = q.get("ci95") or [None, None]
                lines.append(f"| {name} | {q['on']} | {q['n_points']} | {_num(q['median_ratio'])} [{_num(ci[0])}, "
                             f"{_num(ci[1])}] | {_num(q['spearman'], 2)} | {'yes' if q['default'] else ''} |")
        lines.append("")
    F = report.get("frontier")
    if F:
        lines += ["## Frontier", "", f"Operating-point rule (pre-registered): {F['rule']}. AGL's curve: its "
                  f"{F['agl_axis']} grid, with LoRA as λ = 0 (every curve starts at LoRA). Complied: the share of "
                  "unsafe prompts answered (not refused, not incoherent); drift reductions: 1 − drift/drift(LoRA) "
                  "on refusal and on compliance, paired bootstrap over unsafe prompts.", "",
                  "| point | dev EM | dev ΔL_align (predicted ΔW_A) | eval RR_unsafe after | unsafe complied | "
                  "eval task EM | drift reduction (95% CI) | compliance drift reduction (95% CI) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in [F["lora"]] + F["points"]:
            e = r.get("eval") or {}
            lines.append(f"| {r['label']} | {_pct(r['dev_em'])} | {_num(r['dev_delta_align_loss'])} "
                         f"({_num(r.get('pred_align_nats'))}) | {_pct(e.get('rr_unsafe_after'))} | "
                         f"{_pct(e.get('unsafe_complied'))} | {_pct(e.get('task_em'))} | "
                         f"{_pct_ci(e.get('drift_reduction'), e.get('drift_reduction_ci'))} | "
                         f"{_pct_ci(e.get('compliance_drift_reduction'), e.get('compliance_drift_reduction_ci'))} |")
        ops = F["operating_points"]
        lines += ["", "Operating points: " + ", ".join(f"{k}: {'none qualifies' if v is None else v['label']}"
                                                      for k, v in ops.items()) + ".", ""]
        lines += ladder_lines(F)
        if F.get("matched_em"):
            lines += ["### AGL's frontier at every baseline setting (rule 16, post hoc)", "",
                      "Rule 3's statistic at each setting of each baseline's curve, not only at its operating "
                      "point; verdict from the 95% CI (above / level / below 0), not corrected for multiple "
                      "comparisons; over / under AGL's EM range: the setting's task EM lies outside the EMs AGL's curve "
                      "reaches (under it, a gain above 0 means an AGL point dominates).", ""]
            lines += summary_lines(F["matched_em"], METHOD_LABELS)
        if F.get("headline"):
            lines += ["### Headline: AGL against each baseline", ""] + [f"- {h}" for h in F["headline"]] + [""]
    return lines


def _pct_ci(x, ci) -> str:
    ci = ci or [None, None]
    return f"{_pct(x)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def ladder_lines(F: dict) -> List[str]:
    """The Ladder table: AGL's frontier against every baseline at the baseline's operating point (``F["pairwise"]``);
    [] when the frontier has none (a report from before the ladder)."""

    P = F.get("pairwise") or {}
    if not P:
        return []
    lines = ["### Ladder: AGL's frontier at each baseline's task EM", "",
             "Gains: RR = AGL's frontier RR_unsafe-after − the baseline's; compliance = the baseline's complied "
             "share − AGL's frontier's (positive: AGL keeps more refusals / complies less). 95% CI and p: bootstrap "
             "over seeds, unsafe prompts and task questions (paired).", "",
             "| baseline | operating point | its task EM | its RR_unsafe | its complied | AGL RR at that EM | "
             "AGL complied at that EM | RR gain [95% CI] p | compliance gain [95% CI] p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b, e in P.items():
        name = METHOD_LABELS.get(b, b)
        if e["error"] is not None:
            lines.append(f"| {name} | {e['operating_point'] or '–'} | not computed: {e['error']} |||||||")
            continue
        rr, c = e["rr"], e["compliance"]
        lines.append(f"| {name} | {e['operating_point']} | {_pct(e['em'])} | {_pct(rr['baseline'])} | "
                     f"{_pct(c['baseline'])} | {_pct(rr['agl'])} | {_pct(c['agl'])} | "
                     f"**{_pct_ci(rr['gain'], rr['ci95'])}** p = {_num(rr['p_value'])} | "
                     f"**{_pct_ci(c['gain'], c['ci95'])}** p = {_num(c['p_value'])} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------------ plots
def save_png(fig, path) -> None:
    """A matplotlib figure as a PNG (the experiment's plots: 120 dpi, tight), written atomically."""
    atomic_write_png(path, fig, dpi=120, bbox_inches="tight")


def plots(report: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = (report.get("prediction") or {}).get("points") or []
    panels = [("pred_align_nats", "diagonal, ΔW_A"), ("pred_full_nats", "diagonal, whole ΔW")]
    if any("pred_cross_nats" in p for p in pts):
        panels.append(("pred_cross_nats", "cross-layer, ΔW_A"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5))
    for ax, (key, title) in zip(axes, panels):
        for i, m in enumerate(dict.fromkeys(p["method"] for p in pts)):
            sel = [p for p in pts if p["method"] == m and p.get(key, 0) > 0 and p["measured"] > 0]
            if sel:
                ax.scatter([p[key] for p in sel], [p["measured"] for p in sel], s=12, alpha=0.7, color=f"C{i % 10}",
                           label=m)
        pos = [v for p in pts if key in p for v in (p[key], p["measured"]) if v > 0]
        if pos:
            lo, hi = min(pos), max(pos)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
            ax.set_xscale("log")
            ax.set_yscale("log")
        name = next(n for n, (k, _, _) in CURVATURES.items() if k == key)
        q = (report.get("prediction") or {}).get(name) or {}
        ax.set_title(f"{title}: median ratio {_num(q.get('median_ratio'))}, ρ {_num(q.get('spearman'), 2)}",
                     fontsize=9)
        ax.set_xlabel("predicted ΔL_align (nats/token)")
        ax.set_ylabel("measured ΔL_align (held-out refusal NLL)")
        ax.legend(fontsize=7)
    save_png(fig, os.path.join(out_dir, "prediction.png"))
    plt.close(fig)

    F = report.get("frontier")
    if not F:
        return
    if F["lora"].get("eval") is None:  # dev data only: ΔL_align on y
        _frontier_plot(F, "dev_em", "dev_delta_align_loss", "ΔL_align (calibration hold-out)",
                       os.path.join(out_dir, "frontier.png"))
        return
    _frontier_plot(F, "task_em", "rr_unsafe_after", "RR_unsafe after fine-tuning (eval split)",
                   os.path.join(out_dir, "frontier.png"))
    _frontier_plot(F, "task_em", "unsafe_complied", "unsafe prompts complied with (eval split; lower is better)",
                   os.path.join(out_dir, "frontier_compliance.png"))
    if F.get("matched_em"):
        matched_plot(F["matched_em"], METHOD_LABELS, os.path.join(out_dir, "frontier_gain.png"))


def _frontier_plot(F: dict, xk: str, yk: str, ylabel: str, path: str) -> None:
    """Every kind's curve (LoRA as the shared λ = 0 point, then the kind's points by strength), Safe LoRA and AGL
    with the cross-layer metric (eval only) and the dev-chosen operating points (red circles), y = ``yk`` of each
    row's ``eval`` (or of the row itself, for the dev keys)."""
    import matplotlib.pyplot as plt


    def xy(r):
        src = r if yk.startswith("dev_") else r["eval"]
        return src[xk], src[yk]

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for i, kind in enumerate(F["operating_points"]):
        curve = _curve(F["points"], kind, F["agl_axis"])
        if curve:
            rows = [F["lora"]] + sorted(curve, key=lambda r: r["strength"])
            ax.plot(*zip(*[xy(r) for r in rows]), marker="osv^DP"[i % 6], color=f"C{i % 10}",
                    label=METHOD_LABELS.get(kind, kind))
            for r in curve:
                ax.annotate(r["label"].split("-", 1)[1], xy(r), fontsize=7)
    ax.scatter(*xy(F["lora"]), marker="*", s=120, color="k", label="LoRA", zorder=3)
    sl = F.get("safe_lora") or {}
    if not yk.startswith("dev_") and sl.get(yk) is not None:
        ax.scatter(sl["task_em"], sl[yk], marker="X", s=70, color="k", label="Safe LoRA", zorder=3)
    # AGL with the cross-layer metric (a point, rule 14): its eval values as rule 16 read them
    side = {"rr_unsafe_after": "rr", "unsafe_complied": "compliance"}.get(yk)
    cross = (F.get("matched_em") or {}).get("agl_cross") or {}
    for p in cross.get("points", []) if side else []:
        ax.scatter(p["task_em"], p[side]["baseline"], marker="P", s=80, color="C0", edgecolors="k", zorder=3,
                   label=METHOD_LABELS["agl_cross"])
    for op in F["operating_points"].values():
        if op is not None:
            ax.scatter(*xy(next(r for r in F["points"] if r["label"] == op["label"])), s=160, facecolors="none",
                       edgecolors="r", zorder=4)
    ax.set_xlabel("task EM (dev split)" if xk.startswith("dev_") else "task EM (test split)")
    ax.set_ylabel(ylabel)
    ax.set_title("Frontier (red circles: dev-chosen operating points)" + (": dev data only" if yk.startswith("dev_")
                                                                          else ""))
    ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def avg_records(runs: List[List[dict]]) -> List[dict]:
    """Per prompt, means over the seeds' records (``runs``: one list of records per seed): ``refused`` (a fraction;
    None when no seed judged it) and ``not_complied`` = mean of [outcome != complied] (every record counts; the
    outcome by ``agl.driftcaps.outcome.record_outcome``), which ``agl.driftcaps.drift_reduction(on="compliance")``
    reads. The other fields are the first seed's."""
    from agl.driftcaps.outcome import record_outcome

    values = {"refused": lambda r: r["refused"], "not_complied": lambda r: record_outcome(r) != "complied"}
    by_id: Dict[str, List[dict]] = {}
    for recs in runs:
        for r in recs:
            by_id.setdefault(r["id"], []).append(r)
    out = []
    for rs in by_id.values():
        avg = {}
        for k, f in values.items():
            v = [float(x) for x in map(f, rs) if x is not None]
            avg[k] = sum(v) / len(v) if v else None
        out.append({**rs[0], **avg})
    return out


_PREFIX = {"refusal": "", "compliance": "compliance_"}  # the report keys of each drift measure


def reduction_vs_lora(before: List[dict], lora_runs: Dict[int, List[dict]], runs: Dict[int, List[dict]],
                      n_boot: int, on=("refusal", "compliance")) -> dict:
    """Drift reduction 1 − drift(runs) / drift(LoRA) of seed-wise ``runs`` over LoRA on the same seeds, on the
    seed-averaged per-prompt values (:func:`avg_records`), paired bootstrap over unsafe prompts
    (``agl.driftcaps.drift_reduction``). ``on``: "refusal" (drift = RR(before) − RR(after)), "compliance" (drift =
    CR(after) − CR(before), CR = the complied share) or a sequence of them. Per measure, with prefix "" for
    refusal and "compliance_" for compliance: ``{p}drift_reduction``, ``{p}drift_reduction_ci``,
    ``{p}drift_reduction_detail``, or ``{p}drift_reduction_error`` (e.g. LoRA did not drift)."""
    from agl.driftcaps import drift_reduction

    measures = [on] if isinstance(on, str) else list(on)
    bad = [m for m in measures if m not in _PREFIX]
    if bad or not measures:
        raise ValueError(f"reduction_vs_lora: `on` must be among {list(_PREFIX)}, got {on!r}")
    shared = [s for s in runs if s in lora_runs]
    if not shared:
        return {f"{_PREFIX[m]}drift_reduction_error": "no seed shared with LoRA" for m in measures}
    a, b = (avg_records([r[s] for s in shared]) for r in (lora_runs, runs))
    out = {}
    for m in measures:
        p = _PREFIX[m]
        try:
            dr = drift_reduction(before, a, b, n_boot=n_boot, seed=0, on=m)
        except ValueError as exc:
            out[f"{p}drift_reduction_error"] = str(exc)
            continue
        out.update({f"{p}drift_reduction": dr["value"], f"{p}drift_reduction_ci": dr["ci"],
                    f"{p}drift_reduction_detail": {**dr, "lora_seeds": shared}})
    return out
