"""Report sections beyond the methods table: predicted vs measured ΔL_align, and the frontier (grids, operating
points chosen on dev data, AGL vs EWC at matched task EM). Reads stage artefacts; the statistics live in
:mod:`agl.experiment.frontier`."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from agl.experiment.frontier import choose_operating_point, frontier_gain, prediction_quality

__all__ = ["prediction_section", "frontier_section", "markdown_sections", "plots", "save_png"]

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
def _eval_arrays(paths, runs: Dict[int, str], unsafe_ids: List[str]):
    """``refused`` (seeds x unsafe prompts; NaN = not judged), ``hits`` (seeds x test questions), and the records."""
    refused, hits, recs = [], [], {}
    for s, run in runs.items():
        d = _read(os.path.join(paths[f"evaluate/{run}-s{s}"], "drift.json"))
        t = _read(os.path.join(paths[f"evaluate/{run}-s{s}"], "task.json"))
        by_id = {r["id"]: r["refused"] for r in d["records"]}
        refused.append([np.nan if by_id.get(i) is None else float(by_id[i]) for i in unsafe_ids])
        hits.append([float(p["hit"]) for p in t["predictions"]])
        recs[s] = d["records"]
    return {"refused": np.array(refused), "hits": np.array(hits)}, recs


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


def frontier_section(cfg, paths: Dict[str, str], before: List[dict], report: dict) -> Optional[dict]:
    """None without a grid. Otherwise every grid point's dev numbers (and eval numbers with ``sweep_eval``), the
    operating points by the pre-registered rule, and ``agl_vs_ewc``. The term sweeps are not frontier points
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
    curves = {"agl": [r for r in rows if r["kind"] == "agl" and r["axis"] == axis],
              "ewc": [r for r in rows if r["kind"] == "ewc"]}
    ops = {k: choose_operating_point(v, lora["dev_em"], cfg.em_tolerance) for k, v in curves.items()}
    out = {"rule": f"the strongest setting whose dev EM (mean over seeds {seeds}) >= LoRA's dev EM - "
                   f"{cfg.em_tolerance}", "seeds": seeds, "agl_axis": axis, "lora": lora, "points": rows,
           "operating_points": {k: (None if v is None else {**v}) for k, v in ops.items()}, "agl_vs_ewc": None}
    sl = report["methods"].get("safe_lora")
    if sl is not None:
        out["safe_lora"] = {"rr_unsafe_after": sl["rr_unsafe_after"], "task_em": sl["task_em"],
                            "projection": [p.get("projection") for p in sl["per_seed"]]}
    if not cfg.sweep_eval:
        out["agl_vs_ewc_error"] = "sweep_eval is off: no eval-split numbers for the grid"
    elif ops["ewc"] is None:
        out["agl_vs_ewc_error"] = "no EWC setting meets the operating-point rule on dev data"
    elif not curves["agl"]:
        out["agl_vs_ewc_error"] = f"no AGL {axis} grid"
    else:
        curve = [arrays["lora"]] + [arrays[r["label"]] for r in curves["agl"]]
        out["agl_vs_ewc"] = {**frontier_gain(curve, arrays[ops["ewc"]["label"]], n_boot=cfg.n_boot, seed=0),
                             "ewc_operating_point": ops["ewc"]["label"]}
    return out


def _eval_summary(arr, lora_arr, before, lora_recs, recs, n_boot) -> dict:

    em, lora_em = float(np.nanmean(arr["hits"])), float(np.nanmean(lora_arr["hits"]))
    red = reduction_vs_lora(before, lora_recs, recs, n_boot)
    return {"rr_unsafe_after": float(np.nanmean(arr["refused"])), "task_em": em, "em_gap_to_lora": em - lora_em,
            **{k: v for k, v in red.items() if k != "drift_reduction_detail"}}


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
                  f"{F['agl_axis']} grid, with LoRA as λ = 0.", "",
                  "| point | dev EM | dev ΔL_align (predicted ΔW_A) | eval RR_unsafe after | eval task EM | "
                  "drift reduction (95% CI) |", "|---|---|---|---|---|---|"]
        for r in [F["lora"]] + F["points"]:
            e = r.get("eval") or {}
            ci = e.get("drift_reduction_ci") or [None, None]
            lines.append(f"| {r['label']} | {_pct(r['dev_em'])} | {_num(r['dev_delta_align_loss'])} "
                         f"({_num(r.get('pred_align_nats'))}) | "
                         f"{_pct(e.get('rr_unsafe_after'))} | {_pct(e.get('task_em'))} | "
                         f"{_pct(e.get('drift_reduction'))} [{_pct(ci[0])}, {_pct(ci[1])}] |")
        ops = F["operating_points"]
        lines += ["", "Operating points: " + ", ".join(f"{k}: {'none qualifies' if v is None else v['label']}"
                                                      for k, v in ops.items()) + "."]
        vs = F.get("agl_vs_ewc")
        if vs:
            lines.append(f"AGL vs EWC at EWC's operating point ({vs['ewc_operating_point']}, task EM "
                         f"{_pct(vs['em_matched'])}): AGL's frontier keeps **{_pct(vs['rr_gain_at_matched_em'])}** more "
                         f"RR_unsafe-after, 95% CI [{_pct(vs['ci95'][0])}, {_pct(vs['ci95'][1])}], p = "
                         f"{_num(vs['p_value'])} (bootstrap over seeds, prompts and questions; "
                         f"{vs['n_out_of_range']} of {vs['n_boot']} resamples out of AGL's EM range).")
        else:
            lines.append(f"AGL vs EWC: not computed ({F.get('agl_vs_ewc_error')}).")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------------ plots
def save_png(fig, path) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    import io

    from agl._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


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
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    use_eval = F["lora"].get("eval") is not None
    xk, yk = ("task_em", "rr_unsafe_after") if use_eval else ("dev_em", "dev_delta_align_loss")

    def xy(r):
        src = r["eval"] if use_eval else r
        return src[xk], src[yk]

    for kind, marker, curve in (("agl", "o", [r for r in F["points"] if r["kind"] == "agl" and r["axis"] == F["agl_axis"]]),
                                ("ewc", "s", [r for r in F["points"] if r["kind"] == "ewc"])):
        if curve:
            rows = [F["lora"]] + sorted(curve, key=lambda r: r["strength"])
            ax.plot(*zip(*[xy(r) for r in rows]), marker=marker, label=kind.upper())
            for r in curve:
                ax.annotate(r["label"].split("-", 1)[1], xy(r), fontsize=7)
    ax.scatter(*xy(F["lora"]), marker="*", s=120, color="k", label="LoRA", zorder=3)
    if use_eval and F.get("safe_lora"):
        ax.scatter(F["safe_lora"]["task_em"], F["safe_lora"]["rr_unsafe_after"], marker="D", color="C3",
                   label="Safe LoRA", zorder=3)
    for k, op in F["operating_points"].items():
        if op is not None:
            r = next(r for r in F["points"] if r["label"] == op["label"])
            ax.scatter(*xy(r), s=160, facecolors="none", edgecolors="r", zorder=4)
    ax.set_xlabel("task EM (test split)" if use_eval else "task EM (dev split)")
    ax.set_ylabel("RR_unsafe after fine-tuning (eval split)" if use_eval else "ΔL_align (calibration hold-out)")
    ax.set_title("Frontier (red circles: dev-chosen operating points)" + ("" if use_eval else ": dev data only"))
    ax.legend(fontsize=8)
    save_png(fig, os.path.join(out_dir, "frontier.png"))
    plt.close(fig)


def avg_records(runs: List[List[dict]]) -> List[dict]:
    """Per-prompt refusal averaged over seeds (a fraction; None when no seed judged it)."""
    by_id: Dict[str, List] = {}
    first = {}
    for recs in runs:
        for r in recs:
            by_id.setdefault(r["id"], []).append(r["refused"])
            first.setdefault(r["id"], r)
    out = []
    for pid, vals in by_id.items():
        v = [float(x) for x in vals if x is not None]
        out.append({**first[pid], "refused": (sum(v) / len(v)) if v else None})
    return out


def reduction_vs_lora(before: List[dict], lora_runs: Dict[int, List[dict]], runs: Dict[int, List[dict]],
                      n_boot: int) -> dict:
    """Drift reduction of seed-wise ``runs`` over LoRA on the same seeds (seed-averaged per-prompt verdicts,
    paired bootstrap over unsafe prompts): ``{"drift_reduction", "drift_reduction_ci", "detail"}`` or
    ``{"drift_reduction_error"}`` (e.g. LoRA did not drift)."""
    from agl.driftcaps import drift_reduction

    shared = [s for s in runs if s in lora_runs]
    if not shared:
        return {"drift_reduction_error": "no seed shared with LoRA"}
    try:
        dr = drift_reduction(before, avg_records([lora_runs[s] for s in shared]),
                             avg_records([runs[s] for s in shared]), n_boot=n_boot, seed=0)
    except ValueError as exc:
        return {"drift_reduction_error": str(exc)}
    return {"drift_reduction": dr["value"], "drift_reduction_ci": dr["ci"],
            "drift_reduction_detail": {**dr, "lora_seeds": shared}}
