"""The term sweeps' report section (issue 10, item 3): for each extra AGL term (task, overlap, geodesic), its
points' dev numbers, gradient shares and the weight rule 7 picks (``frontier.choose_term_weight``). Dev data only:
term points are never evaluated on the eval split, and they are not frontier points.

``report.json["term_sweeps"]`` (null without ``sweep_terms``)::

    {"rule", "seeds", "min_gain", "lora_dev_em", "lora_grad_shares_unit": {grad_share_<term>: mean} | null,
     "base": {"label": "agl-base", "dev_em", "dev_delta_align", "per_seed": [...]},
     "terms": {term: {"points": [{"label", "weight", "dev_em", "dev_delta_align", "grad_share", "per_seed"}],
                      "chosen": weight (0: none), "helps": bool}}}

``dev_delta_align``: the mean over seeds of the dev stage's ``delta_align_loss`` (calibration hold-out refusal NLL
rise at the end of the fine-tune). ``grad_share``: the mean over seeds of ``grad_share_<term>`` of the run's
``train_log.json["grad_shares"]`` (``AGLLoss.gradient_shares`` on the final adapter); None for runs logged before
it was recorded.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from agl.experiment.analysis import dev_seeds, save_png
from agl.experiment.frontier import choose_term_weight

__all__ = ["term_sweeps_section", "markdown_lines", "plot", "MIN_GAIN"]

MIN_GAIN = 0.10  # rule 7: a term's best point must cut the base's dev ΔL_align by at least this fraction


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _summary(paths, runs: Dict[int, str], term: Optional[str] = None) -> dict:
    """Means over seeds and the per-seed numbers of one point (with ``term``: its ``grad_share``)."""
    per = []
    for d in dev_seeds(paths, runs):
        per.append({"seed": d["seed"], "run": d["run"], "dev_em": d["dev_em"], "dev_delta_align": d["delta_align_loss"]})
        if term is not None:
            per[-1]["grad_share"] = (d["grad_shares"] or {}).get(f"grad_share_{term}")
    out = {"dev_em": _mean(p["dev_em"] for p in per), "dev_delta_align": _mean(p["dev_delta_align"] for p in per)}
    if term is not None:
        out["grad_share"] = _mean(p["grad_share"] for p in per)
    return {**out, "per_seed": per}


def term_sweeps_section(cfg, paths: Dict[str, str]) -> Optional[dict]:
    """None without ``sweep_terms``; else the object described in the module docstring (reads the dev stages and
    train logs of the sweeps' runs and of LoRA on the sweep seeds)."""
    from agl.experiment.plan import grid_points, run_names

    points = [p for p in grid_points(cfg) if p["kind"] == "term"]
    if not points:
        return None
    names, seeds = run_names(cfg), cfg.grid_seeds()
    lora = dev_seeds(paths, {s: "lora" for s in seeds})
    lora_dev_em = float(np.mean([d["dev_em"] for d in lora]))
    unit = [d["grad_shares_unit"] for d in lora]
    base = {"label": "agl-base", **_summary(paths, {s: names["agl-base"][s] for s in seeds})}
    terms = {}
    for t in cfg.sweep_terms:
        rows = []
        for p in (p for p in points if p["axis"] == t):
            rows.append({"label": p["label"], "weight": p["value"],
                         **_summary(paths, {s: names[p["label"]][s] for s in seeds}, t)})
        pick = choose_term_weight(rows, base, lora_dev_em, cfg.em_tolerance, MIN_GAIN)
        terms[t] = {"points": rows, "chosen": 0.0 if pick is None else pick["weight"], "helps": pick is not None}
    return {"rule": (f"among a term's weights whose mean dev EM (seeds {seeds}) >= LoRA's dev EM - {cfg.em_tolerance}, "
                     f"the one with the smallest mean dev ΔL_align; chosen only if that is at least "
                     f"{MIN_GAIN:.0%} below the base point's (the same config with the term at 0), else 0"),
            "seeds": seeds, "min_gain": MIN_GAIN, "lora_dev_em": lora_dev_em,
            "lora_grad_shares_unit": None if None in unit else {k: _mean(u.get(k) for u in unit) for k in unit[0]
                                                                if k.startswith("grad_share_")},
            "base": base, "terms": terms}


def _f(x, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def markdown_lines(report: dict) -> List[str]:
    T = report.get("term_sweeps")
    if not T:
        return []
    b = T["base"]
    lines = ["## Term sweeps (dev data only; rule 7)", "",
             f"Rule: {T['rule']}. LoRA dev EM {_f(T['lora_dev_em'], True)}; base (`agl-base`, task and collision "
             f"terms off) dev EM {_f(b['dev_em'], True)}, dev ΔL_align {_f(b['dev_delta_align'])}. Grad share: the "
             "term's share of the regulariser's gradient norm on the final adapter.", ""]
    unit = T.get("lora_grad_shares_unit")
    if unit:
        lines += ["LoRA's final adapter, every weight 1 (the terms' natural scale): "
                  + ", ".join(f"{k[len('grad_share_'):]} {_f(v)}" for k, v in unit.items()) + ".", ""]
    for t, e in T["terms"].items():
        lines += [f"**{t}**: " + (f"chosen weight {_f(e['chosen'])}" if e["helps"] else "does not help (weight 0)"),
                  "", "| weight | grad share | dev EM | dev ΔL_align | chosen |", "|---|---|---|---|---|",
                  f"| 0 (base) | – | {_f(b['dev_em'], True)} | {_f(b['dev_delta_align'])} | {'' if e['helps'] else '✓'} |"]
        for p in e["points"]:
            mark = "✓" if e["helps"] and p["weight"] == e["chosen"] else ""
            lines.append(f"| {_f(p['weight'])} | {_f(p['grad_share'])} | {_f(p['dev_em'], True)} | "
                         f"{_f(p['dev_delta_align'])} | {mark} |")
        lines.append("")
    return lines


def plot(report: dict, out_dir: str) -> None:
    """``term_sweeps.png``: one panel per term, dev ΔL_align against the weight (log axis; the base as a dashed
    line) and dev EM on a twin axis (LoRA's dev EM dotted)."""
    T = report.get("term_sweeps")
    if not T:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(T["terms"]), figsize=(4.8 * len(T["terms"]), 4), squeeze=False)
    for ax, (t, e) in zip(axes[0], T["terms"].items()):
        pts = sorted((p for p in e["points"] if p["weight"] > 0), key=lambda p: p["weight"])
        w = [p["weight"] for p in pts]
        ax.plot(w, [np.nan if p["dev_delta_align"] is None else p["dev_delta_align"] for p in pts], "o-", color="C0",
                label="dev ΔL_align")
        if T["base"]["dev_delta_align"] is not None:
            ax.axhline(T["base"]["dev_delta_align"], color="C0", ls="--", lw=1, label="base (term off)")
        if e["helps"]:
            ax.axvline(e["chosen"], color="r", lw=1, alpha=0.6, label="chosen")
        if w:
            ax.set_xscale("log")
        ax.set_xlabel(f"{t} weight")
        ax.set_ylabel("dev ΔL_align (calibration hold-out)", color="C0")
        ax2 = ax.twinx()
        ax2.plot(w, [np.nan if p["dev_em"] is None else p["dev_em"] for p in pts], "s-", color="C1")
        ax2.axhline(T["lora_dev_em"], color="C1", ls=":", lw=1)
        ax2.set_ylabel("dev EM (dotted: LoRA)", color="C1")
        ax.set_zorder(ax2.get_zorder() + 1)  # ΔL_align, the rule's quantity, drawn over the EM curve
        ax.patch.set_visible(False)
        ax.set_title(f"{t}: " + (f"chosen {_f(e['chosen'])}" if e["helps"] else "does not help"), fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, os.path.join(out_dir, "term_sweeps.png"))
    plt.close(fig)
