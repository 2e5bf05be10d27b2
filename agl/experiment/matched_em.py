"""AGL's frontier at *every* point of every baseline's curve (rule 16 in docs/EXPERIMENT.md: post hoc, it chooses
nothing). The pre-registered ladder (rule 13) reads AGL's frontier only at each baseline's dev-chosen operating
point; when rule 1 finds none (every setting costs more than 2 points of dev EM), the question a user asks is still
open: *at the task quality a baseline setting reaches, does AGL keep more refusals or fewer?* This module answers it
for each baseline setting with the same statistic and bootstrap as rule 3 (:func:`agl.experiment.frontier.frontier_gain`)
and a verdict per point:

- ``above``: the gain's 95% interval lies above 0 (AGL's frontier keeps more refusals / complies less there),
- ``below``: it lies below 0, ``level``: it contains 0,
- ``over AGL's EM range``: the setting's test EM is above every EM on AGL's curve (LoRA's included), so AGL has no
  point there (the gain is NaN);
- ``under AGL's EM range``: the setting's test EM is below every EM on AGL's curve. Rule 3 then reads AGL's best
  RR (a method can always give up task quality). A gain whose interval lies above 0 then means an AGL point
  *dominates* the setting (more task EM and more refusals), so it is ``above``; any other gain compares the
  baseline with AGL's *grid*, not with AGL at a matched strength (a stronger λ might keep more): no verdict.

The verdicts are per point, not corrected for multiple comparisons: read them as a map, not as tests.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

from agl._io import atomic_write_png
from agl.experiment.frontier import frontier_gain

__all__ = ["VERDICTS", "OVER", "UNDER", "verdict", "along_curves", "headline", "summary_lines", "plot"]

OVER, UNDER = "over AGL's EM range", "under AGL's EM range"
VERDICTS = ("above", "level", "below", UNDER, OVER)


def verdict(gain: float, ci95: Sequence[float], em: float = math.nan, em_range=(-math.inf, math.inf)) -> str:
    """One of :data:`VERDICTS` for a gain and its 95% interval at task EM ``em``; ``em_range`` = (smallest, largest)
    EM on AGL's curve. NaN gain or interval, or ``em`` above the range: ``OVER``; below it: ``above`` when the
    interval lies above 0 (an AGL point dominates), else ``UNDER``."""
    lo, hi = (math.nan, math.nan) if ci95 is None else ci95
    if gain is None or not all(map(math.isfinite, (gain, lo, hi))) or em > em_range[1] + 1e-12:
        return OVER
    if em < em_range[0] - 1e-12:  # AGL's best point has the larger EM: only a gain above 0 is a comparison
        return "above" if lo > 0 else UNDER
    return "above" if lo > 0 else ("below" if hi < 0 else "level")


def _point(curve: List[dict], label: str, ref: dict, n_boot: int, em_range) -> dict:
    em = float(np.nanmean(ref["hits"]))
    out = {"label": label, "task_em": em}
    for name, key, base in (("rr", "refused", "refused"), ("compliance", "not_complied", "complied")):
        g = frontier_gain(curve, ref, key=key, n_boot=n_boot, seed=0)
        value = float(np.nanmean(ref[base]))
        gain = g["rr_gain_at_matched_em"]
        # compliance is lower-is-better: AGL's complied share there = the baseline's − the gain
        agl = value + gain if name == "rr" else value - gain
        out[name] = {"baseline": value, "agl": agl, "gain": gain, "ci95": g["ci95"], "p_value": g["p_value"],
                     "n_out_of_range": g["n_out_of_range"],
                     "verdict": verdict(gain, g["ci95"], em, em_range)}
    return out


def along_curves(curve: List[dict], baselines: Dict[str, List[tuple]], n_boot: int) -> Dict[str, dict]:
    """``curve``: AGL's frontier points (LoRA as λ = 0 first), each a dict of ``refused``, ``complied``,
    ``not_complied`` (seeds x unsafe prompts) and ``hits`` (seeds x test questions), on the same seeds, prompts and
    questions as every baseline point. ``baselines``: kind -> [(label, arrays), ...] (its curve's points, weakest
    first, or Safe LoRA's single point). Returns kind -> ``{"points": [...], "counts": {"rr": {verdict: n},
    "compliance": {verdict: n}}, "agl_em_range": [min, max] EM on AGL's curve}``; each point has ``label``, ``task_em`` and, for ``rr`` and ``compliance``,
    ``baseline``, ``agl`` (AGL's frontier value at the point's EM), ``gain`` (positive: AGL better), ``ci95``,
    ``p_value``, ``n_out_of_range`` and ``verdict``."""
    ems = [float(np.nanmean(c["hits"])) for c in curve]
    em_range = [min(ems), max(ems)]
    out = {}
    for kind, refs in baselines.items():
        pts = [_point(curve, label, ref, n_boot, em_range) for label, ref in refs]
        counts = {m: {v: sum(p[m]["verdict"] == v for p in pts) for v in VERDICTS} for m in ("rr", "compliance")}
        out[kind] = {"points": pts, "counts": counts, "agl_em_range": em_range}
    return out


def _pct(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _band(e: dict) -> str:
    lo, hi = e["ci95"]
    return f"{100 * e['gain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _gain(e: dict) -> str:
    return OVER if e["verdict"] == OVER else f"{_band(e)} {e['verdict']}"


def _along(p: dict) -> str:
    c, r = p["compliance"], p["rr"]
    if c["verdict"] == OVER:
        return f"{p['label']} (EM {_pct(p['task_em'])}): {OVER}"
    return f"{p['label']} (EM {_pct(p['task_em'])}): {c['verdict']}, {_band(c)} (refusal {_band(r)})"


def headline(F: dict, labels: Dict[str, str]) -> List[str]:
    """One sentence per baseline of ``F["pairwise"]`` (a report's ``frontier``), on compliance (rule 14) with the
    refusal gain beside it, in points: AGL's frontier at the baseline's dev-chosen operating point (rule 13) or why
    there is none, then at each of its settings (rule 16: the verdict, the setting's task EM and the gain with its
    95% CI; settings under or over AGL's EM range named as such); then one sentence per other point of
    ``F["matched_em"]`` (AGL with the cross-layer metric)."""
    out = []
    A = F.get("matched_em") or {}
    for b, pw in (F.get("pairwise") or {}).items():
        name = labels.get(b, b)
        if pw["error"] is not None:
            op = f"no operating point ({pw['error']})"
        else:
            c, r = pw["compliance"], pw["rr"]
            v = verdict(c["gain"], c["ci95"])
            op = (f"at its operating point {pw['operating_point']} (task EM {_pct(pw['em'])}) " +
                  (f"AGL has no point: that EM is {OVER}, where AGL cannot match it" if v == OVER else
                   f"AGL's frontier is {v} on compliance, {_band(c)} points (refusal {_band(r)})"))
        parts = [_along(p) for p in (A.get(b) or {}).get("points", [])]
        only_op = [p["label"] for p in (A.get(b) or {}).get("points", [])] == [pw["operating_point"]]
        along = f" Along its settings, on compliance: {'; '.join(parts)}." if parts and not only_op else ""
        out.append(f"**{name}**: {op}.{along}")
    for b in (b for b in A if b not in (F.get("pairwise") or {})):  # points that are not baselines (AGL-cross)
        parts = [_along(p) for p in A[b]["points"]]
        out.append(f"**{labels.get(b, b)}** (a point, not a baseline), on compliance: {'; '.join(parts)}.")
    if A:
        lo, hi = next(iter(A.values()))["agl_em_range"]
        out.append(f"AGL's curve (LoRA and its λ grid) spans task EM {_pct(lo)} to {_pct(hi)}; gains are AGL's "
                   "frontier minus the baseline, in points of the unsafe prompts (positive: AGL complies less / "
                   "refuses more), 95% bootstrap CI over seeds, prompts and questions.")
    return out


def summary_lines(matched: Dict[str, dict], labels: Dict[str, str]) -> List[str]:
    """Markdown: one row per baseline point (its EM, its complied share and RR, AGL's there, both gains with CI and
    verdict), then one line per baseline counting the compliance verdicts."""
    if not matched:
        return []
    lines = ["| baseline | setting | its task EM | its complied / RR | AGL's frontier there | compliance gain "
             "[95% CI] | RR gain [95% CI] |", "|---|---|---|---|---|---|---|"]
    for kind, m in matched.items():
        for p in m["points"]:
            c, r = p["compliance"], p["rr"]
            lines.append(f"| {labels.get(kind, kind)} | {p['label']} | {_pct(p['task_em'])} | {_pct(c['baseline'])}"
                         f" / {_pct(r['baseline'])} | {_pct(c['agl'])} / {_pct(r['agl'])} | {_gain(c)} | "
                         f"{_gain(r)} |")
    lines.append("")
    for kind, m in matched.items():
        n = m["counts"]["compliance"]
        matched_ = [f"{v} at {n[v]}" for v in VERDICTS[:3] if n[v]]
        unmatched = [f"{n[v]} {v}" for v in (UNDER, OVER) if n[v]]
        lines.append(f"- {labels.get(kind, kind)}, {len(m['points'])} setting(s), on compliance: "
                     + (f"AGL's frontier {', '.join(matched_)}" if matched_ else "none matched")
                     + (f"; {', '.join(unmatched)} (not matched)" if unmatched else "") + ".")
    return lines + [""]


def plot(matched: Dict[str, dict], labels: Dict[str, str], path: str) -> None:
    """``frontier_gain.png``: per baseline setting, AGL's compliance gain (left) and RR gain (right) against the
    setting's task EM, with 95% CIs; settings over AGL's EM range are left out (the table lists them), those under
    it are drawn hollow (AGL's grid, not a matched AGL)."""
    import matplotlib.pyplot as plt

    min_em = next(iter(matched.values()))["agl_em_range"][0] if matched else 0.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, m, title in ((axes[0], "compliance", "compliance gain (baseline's complied − AGL's), points"),
                         (axes[1], "rr", "RR gain (AGL's RR_unsafe − baseline's), points")):
        for i, (kind, entry) in enumerate(matched.items()):
            pts = [p for p in entry["points"] if p[m]["verdict"] != OVER]
            if not pts:
                continue
            x = np.array([p["task_em"] for p in pts]) * 100
            y = np.array([p[m]["gain"] for p in pts]) * 100
            err = np.array([[p[m]["gain"] - p[m]["ci95"][0], p[m]["ci95"][1] - p[m]["gain"]] for p in pts]).T * 100
            under = np.array([p[m]["verdict"] == UNDER for p in pts])
            lab = labels.get(kind, kind)
            for sel, face in ((~under, None), (under, "none")):
                if sel.any():
                    ax.errorbar(x[sel], y[sel], yerr=err[:, sel], fmt="osv^DPX"[i % 7], color=f"C{(i + 1) % 10}",
                                mfc=face, capsize=3, label=lab)
                    lab = None  # one legend entry per baseline
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(p["label"].split("-", 1)[-1], (xi, yi), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(0, color="k", lw=1)
        ax.axvspan(0, 100 * min_em, color="0.9", zorder=0, label="under AGL's EM range (hollow: not matched)")
        ax.set_xlabel("the baseline setting's task EM (test split, %)")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("AGL's frontier minus the baseline (positive: AGL better)")
    axes[0].legend(fontsize=8)
    atomic_write_png(path, fig, dpi=120, bbox_inches="tight")
    plt.close(fig)
