"""DriftCaps reports: JSON (everything), Markdown (the tables) and a PNG bar chart of refusal rates by category.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted
run never leaves a half-written report.
"""
from __future__ import annotations

import math
from pathlib import Path

from agl._io import atomic_write_png, atomic_write_text
from agl.driftcaps.metrics import Comparison, _jsonable


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "n/a"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _pp(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f} pp"


def _p(p) -> str:
    return "n/a" if p is None else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


def report_markdown(report) -> str:
    """Markdown tables for one :class:`~agl.driftcaps.DriftReport`."""
    m, meta = report.metrics, report.meta
    lines = [f"# DriftCaps report: {meta.get('model', 'model')}", ""]
    if meta.get("adapter"):
        lines += [f"Adapter: `{meta['adapter']}`", ""]
    lines += [f"Prompts: {meta.get('prompts', 'n/a')} ({meta.get('n_prompts', len(report.records))}), judge: "
              f"{meta.get('judge', 'n/a')}, max_new_tokens: {meta.get('generation', {}).get('max_new_tokens', 'n/a')}",
              "", "| metric | rate | 95% CI | refused / judged | empty |", "|---|---|---|---|---|"]
    for name, key in (("RR_unsafe (refusal rate, unsafe prompts)", "rr_unsafe"),
                      ("over-refusal (refusal rate, safe prompts)", "over_refusal")):
        r = m[key]
        lines.append(f"| {name} | {_pct(r['rate'])} | {_ci(r['ci'])} | {r['n_refused']} / {r['n']} | {r['n_empty']} |")
    for kind, r in m.get("over_refusal_by_kind", {}).items():
        lines.append(f"| over-refusal, {kind} | {_pct(r['rate'])} | {_ci(r['ci'])} | {r['n_refused']} / {r['n']} | "
                     f"{r['n_empty']} |")
    lines += outcome_table(m.get("outcomes"), meta.get("incoherence"))
    lines += ["", "## By category", "", "| category | label | refusal rate | 95% CI | refused / judged | complied | "
              "incoherent |", "|---|---|---|---|---|---|---|"]
    for cat, r in m["by_category"].items():
        lines.append(f"| {cat} | {r['label']} | {_pct(r['rate'])} | {_ci(r['ci'])} | {r['n_refused']} / {r['n']} | "
                     f"{r.get('n_complied', 'n/a')} | {r.get('n_incoherent', 'n/a')} |")
    return "\n".join(lines) + "\n"


def outcome_table(outcomes, rule=None, *, titles=("",)) -> list[str]:
    """Markdown lines: refused / complied / incoherent shares (95% CI) per prompt label, for one run's
    ``metrics["outcomes"]`` (or several runs' with ``titles``); empty when ``outcomes`` is missing (old reports)."""
    runs = outcomes if isinstance(outcomes, list) else [outcomes]
    if not runs or not all(runs):
        return []
    lines = ["", "## Outcomes", "",
             f"Every response is refused, complied or incoherent (nothing usable{': ' + rule if rule else ''}; "
             "empty responses included), so the three shares add up to 100%.", "",
             "| prompts | " + ("run | " if len(runs) > 1 else "") + "refused | complied | incoherent | n |",
             "|---|" + ("---|" if len(runs) > 1 else "") + "---|---|---|---|"]
    for label in ("unsafe", "safe"):
        for title, o in zip(titles if len(runs) > 1 else ("",), runs):
            r = o.get(label)
            if not r or not r["n"]:
                continue
            cells = " | ".join(f"{_pct(r[k]['rate'])} {_ci(r[k]['ci'])}" for k in ("refused", "complied",
                                                                                      "incoherent"))
            lines.append(f"| {label} | " + (f"{title} | " if len(runs) > 1 else "") + f"{cells} | {r['n']} |")
    return lines


def _incoherent_share(summary: dict) -> float:
    """Incoherent responses over all responses (unsafe and safe prompts) of one run's ``summarise``."""
    o = summary["outcomes"]
    n = o["unsafe"]["n"] + o["safe"]["n"]
    return (o["unsafe"]["incoherent"]["k"] + o["safe"]["incoherent"]["k"]) / n if n else math.nan


def comparison_markdown(cmp: Comparison) -> str:
    """Markdown tables for a :class:`~agl.driftcaps.Comparison`."""
    b, a = cmp.before, cmp.after
    mb, ma = cmp.meta.get("before_meta", {}), cmp.meta.get("after_meta", {})
    judges = {mb.get("judge", "n/a"), ma.get("judge", "n/a")}
    judged = (f"judge: {judges.pop()}" if len(judges) == 1 else
              f"judges differ (before: {mb.get('judge', 'n/a')}, after: {ma.get('judge', 'n/a')}): the verdicts "
              "are not comparable")
    cd, ic = cmp.compliance_drift or {}, cmp.incoherence_change or {}
    ob, oa = b.get("outcomes", {}).get("unsafe"), a.get("outcomes", {}).get("unsafe")
    lines = ["# DriftCaps comparison", "",
             f"Before: {mb.get('model', 'n/a')}{' + ' + str(mb['adapter']) if mb.get('adapter') else ''}; "
             f"after: {ma.get('model', 'n/a')}{' + ' + str(ma['adapter']) if ma.get('adapter') else ''}; "
             f"{cmp.meta.get('n_shared', 'n/a')} shared prompts; {judged}.", "",
             "| metric | before | after | change | 95% CI |", "|---|---|---|---|---|",
             f"| RR_unsafe | {_pct(b['rr_unsafe']['rate'])} | {_pct(a['rr_unsafe']['rate'])} | drift "
             f"{_pp(cmp.drift['value'])} | {_ci(cmp.drift['ci'])} |",
             f"| over-refusal | {_pct(b['over_refusal']['rate'])} | {_pct(a['over_refusal']['rate'])} | "
             f"{_pp(cmp.over_refusal_change['value'])} | {_ci(cmp.over_refusal_change['ci'])} |"]
    if cd and ob and oa:
        lines += [f"| compliance, unsafe prompts | {_pct(ob['complied']['rate'])} | {_pct(oa['complied']['rate'])} | "
                  f"compliance drift {_pp(cd['value'])} | {_ci(cd['ci'])} |",
                  f"| incoherent, all prompts | {_pct(_incoherent_share(b))} | {_pct(_incoherent_share(a))} | "
                  f"{_pp(ic.get('value'))} | {_ci(ic.get('ci'))} |"]
    lines += ["", "Drift = RR_unsafe(before) - RR_unsafe(after) (positive: refusals lost). Compliance drift = "
              "compliance on unsafe prompts, after - before (positive: more unsafe prompts answered); a fine-tune "
              "that only breaks the model raises the incoherent share and the drift, not the compliance drift. "
              "Over-refusal change = after - before (positive: more safe prompts refused).", "",
              "## Flips", "", "| prompts | paired | refused -> complied | complied -> refused | McNemar exact p |",
              "|---|---|---|---|---|"]
    for name, f in (("unsafe", cmp.flips_unsafe), ("safe", cmp.flips_safe)):
        lines.append(f"| {name} | {f['n_paired']} | {f['refused_to_complied']} | {f['complied_to_refused']} | "
                     f"{_p(f['mcnemar_p'])} |")
    lines += outcome_table([b.get("outcomes"), a.get("outcomes")], mb.get("incoherence"), titles=("before", "after"))
    lines += ["", "## By category", "", "| category | label | before | after | change | flips r->c / c->r | p |",
              "|---|---|---|---|---|---|---|"]
    for cat, e in cmp.by_category.items():
        change = _pp(e.get("drift")) + " drift" if e["label"] == "unsafe" else _pp(e.get("over_refusal_change"))
        f = e["flips"]
        lines.append(f"| {cat} | {e['label']} | {_pct(e['before']['rate'])} | {_pct(e['after']['rate'])} | {change} | "
                     f"{f['refused_to_complied']} / {f['complied_to_refused']} | {_p(f['mcnemar_p'])} |")
    return "\n".join(lines) + "\n"


def plot_refusal_rates(before, after=None, path=None, *, labels=("before", "after"), title=None):
    """Bar chart of refusal rates by category (with 95% CI error bars): one report, or before/after side by side.

    ``before``/``after``: :class:`~agl.driftcaps.DriftReport` or a ``summarise`` dict; or pass a
    :class:`~agl.driftcaps.Comparison` as ``before`` alone. Writes a PNG to ``path`` (atomically) when given;
    returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(before, Comparison):
        before, after = before.before, before.after
    series = [getattr(before, "metrics", before)] + ([getattr(after, "metrics", after)] if after is not None else [])
    cats = list(series[0]["by_category"])
    cats.sort(key=lambda c: (series[0]["by_category"][c]["label"] != "unsafe", c))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(cats) + 2), 4.5), dpi=100)
    width = 0.8 / len(series)
    colors = ("#4c72b0", "#dd8452")
    for j, s in enumerate(series):
        xs, ys, err = [], [], [[], []]
        for i, c in enumerate(cats):
            r = s["by_category"].get(c)
            if r is None or r["rate"] is None or (isinstance(r["rate"], float) and math.isnan(r["rate"])):
                continue
            lo, hi = r["ci"]
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(100 * r["rate"])
            ok = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
            err[0].append(max(0.0, 100 * (r["rate"] - lo)) if ok else 0.0)
            err[1].append(max(0.0, 100 * (hi - r["rate"])) if ok else 0.0)
        ax.bar(xs, ys, width=width, yerr=err, capsize=2, color=colors[j % 2],
               label=labels[j] if len(series) > 1 else None)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([f"{c}\n({series[0]['by_category'][c]['label']})" for c in cats], rotation=45, ha="right",
                       fontsize=8)
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Refusal rate by category (unsafe: higher is safer; safe: lower is better)", fontsize=10)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        atomic_write_png(path, fig)
    plt.close(fig)
    return fig


def write_report(obj, out_dir, *, name: str | None = None) -> dict[str, Path]:
    """Write a :class:`~agl.driftcaps.DriftReport` or :class:`~agl.driftcaps.Comparison` to ``out_dir`` as
    ``<name>.json`` (everything), ``<name>.md`` (tables) and ``<name>.png`` (refusal rates by category). ``name``
    defaults to ``report`` or ``comparison``. Returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_cmp = isinstance(obj, Comparison)
    name = name or ("comparison" if is_cmp else "report")
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    atomic_write_text(paths["json"], _with_provenance(obj.to_dict()))
    atomic_write_text(paths["markdown"], comparison_markdown(obj) if is_cmp else report_markdown(obj))
    plot_refusal_rates(obj, path=paths["png"])
    return paths


def write_drift_reduction(result: dict, path) -> None:
    """Save a :func:`~agl.driftcaps.drift_reduction` result as JSON (atomically), with its provenance."""
    atomic_write_text(path, _with_provenance(result))


def _with_provenance(payload: dict) -> str:
    """``payload`` as JSON text with a ``provenance`` record (``agl._provenance.provenance()``: commit, dirty tree,
    machine, load, torch, date) unless it already carries one."""
    import json

    from agl._provenance import provenance

    payload = {**payload, "provenance": payload.get("provenance") or provenance()}
    return json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n"
