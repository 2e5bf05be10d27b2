"""Render the README's result tables from the raw results: ``bench/results/*.json`` (rows written by
``bench/_results.py``) and ``docs/results/*/report.json`` (``agl experiment`` / ``agl demo`` reports).

    python tools/render_readme.py            # rewrite the generated blocks of README.md in place
    python tools/render_readme.py --check    # exit 1 naming the blocks that differ (tests/test_readme.py checks this)

A generated block is everything between ``<!-- agl:table NAME -->`` and ``<!-- /agl:table -->``; ``TABLES[NAME]``
renders it. Text outside the markers is prose and left alone. Each block ends with the provenance of its rows
(commit, tree state, machine, torch, date), so a number in the README names the code that produced it.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _results import describe, matching, pick, read_rows  # noqa: E402  (bench/_results.py)

README = ROOT / "README.md"
BENCH = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "results"
BLOCK = re.compile(r"<!-- agl:table (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /agl:table -->", re.S)


# ------------------------------------------------------------------------------------------------ formatting
def ms(x: float) -> str:
    """Milliseconds at a precision that fits the magnitude: 0.862, 3.62, 84, 3 472."""
    if x >= 100:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.0f}" if x >= 10 else (f"{x:.2f}" if x >= 1 else f"{x:.3f}")


def times(r: Optional[float]) -> str:
    return "–" if r is None else (f"{r:.0f}×" if r >= 100 else f"{r:.1f}×")


def mb(b: Optional[float]) -> str:
    if b is None:
        return "–"
    b /= 1e6
    return "< 0.1 MB" if b < 0.1 else (f"{b:.1f} MB" if b < 100 else f"{b:,.0f} MB".replace(",", " "))


def pct(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def ci(pair) -> str:
    return "–" if not pair else f"[{pct(pair[0])}, {pct(pair[1])}]"


def shape(s: str) -> str:
    """'4096x11008r16' -> '4096×11008 r16'."""
    m, rest = s.split("x", 1)
    n, r = rest.split("r")
    return f"{m}×{n} r{r}"


def table(header: List[str], rows: Iterable[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def sources(rows: Iterable[dict], path: Path) -> str:
    """The provenance lines of ``rows`` (one per distinct code/machine), naming their file in bench/results/."""
    seen = list(dict.fromkeys(describe(r["provenance"]) for r in rows))
    return f"\nRows: `bench/results/{path.name}`; " + "; ".join(f"{s}" if len(seen) == 1 else f"({i + 1}) {s}"
                                             for i, s in enumerate(seen)) + ".\n"


# ------------------------------------------------------------------------------------------------ op benchmarks
def _op_group(rows, **ident):
    """The agl / eager / compiled rows of one (shape, dtype, mode), all from the run ``pick`` chooses for agl."""
    agl = pick(rows, provider="agl", **ident)
    same_run = {r["provider"]: r for r in matching(rows, **ident) if r["provenance"] == agl["provenance"]}
    missing = [p for p in ("eager", "compiled") if p not in same_run]
    if missing:
        raise LookupError(f"no {missing} row(s) from the same run as the agl row {ident} "
                          f"({describe(agl['provenance'])}): rerun bench_ops.py with all providers")
    return agl, same_run


def h200_ops() -> str:
    path = BENCH / "nvidia-h200.json"
    rows = read_rows(path)
    out, used = [], []
    for s in ("4096x4096r16", "4096x11008r16"):
        for dt in ("float32", "bfloat16"):
            agl, g = _op_group(rows, shape=s, dtype=dt, mode="fwd+bwd")
            used += g.values()
            out.append([f"{shape(s)}, {dt}", f"{ms(agl['median_ms'])} ms", f"{ms(g['eager']['median_ms'])} ms",
                        f"{ms(g['compiled']['median_ms'])} ms", times(agl["speedup_vs_eager"]),
                        times(agl["speedup_vs_compiled"]),
                        f"{mb(agl['peak_mem_bytes'])} / {mb(g['eager']['peak_mem_bytes'])}"])
    text = table(["shape, dtype (fwd+bwd)", "fused", "eager", "compiled", "× eager", "× compiled",
                  "peak extra memory, fused / eager"], out)
    return text + "\n" + h200_roofline(rows) + sources(used, path)


def h200_roofline(rows) -> str:
    """Fraction of the copy bandwidth and float32 matmul rate the fused fwd+bwd reaches at 4096×4096 r16 float32.
    The run measured copy bandwidth once per dtype; the best of those is the machine's (a lower reading is noise)."""
    agl, _ = _op_group(rows, shape="4096x4096r16", dtype="float32", mode="fwd+bwd")
    run = [r for r in rows if r["provenance"] == agl["provenance"] and r.get("frac_copy_bw")]

    def achieved(r, what):  # bytes/s or flop/s of a row
        return r[what] / (r["median_ms"] / 1e3)

    best_bw = max(achieved(r, "bytes_per_call") / r["frac_copy_bw"] for r in run)
    bw = achieved(agl, "bytes_per_call")
    fl = achieved(agl, "flops_per_call")
    peak_fl = fl / agl["frac_matmul"]
    return (f"Roofline of the fused fwd+bwd at 4096×4096 r16, float32: {agl['bytes_per_call'] / 1e6:.0f} MB and "
            f"{agl['flops_per_call'] / 1e9:.1f} GFLOP per call in {ms(agl['median_ms'])} ms = {bw / 1e9:.0f} GB/s, "
            f"**{pct(bw / best_bw)} of the copy bandwidth measured in the same run** ({best_bw / 1e12:.1f} TB/s), "
            f"and {fl / 1e12:.2f} TFLOP/s = {pct(fl / peak_fl)} of its float32 matmul rate "
            f"({peak_fl / 1e12:.0f} TFLOP/s).\n")


def cpu_ops() -> str:
    path = BENCH / "intel-r-xeon-r-processor-2-50ghz.json"
    rows = read_rows(path)
    out, used = [], []
    for s, dt, mode in (("4096x4096r16", "float32", "fwd+bwd"), ("4096x4096r16", "float32", "forward"),
                        ("4096x4096r16", "float32", "backward"), ("576x576r8", "float32", "fwd+bwd"),
                        ("4096x4096r16", "bfloat16", "fwd+bwd")):
        agl, g = _op_group(rows, shape=s, dtype=dt, mode=mode)
        used += g.values()
        mem = " / ".join(mb(g[p]["peak_mem_bytes"]) for p in ("agl", "eager", "compiled"))
        out.append([f"{shape(s)}, {dt}, {mode}", f"{ms(agl['median_ms'])} ms", f"{ms(g['eager']['median_ms'])} ms",
                    f"{ms(g['compiled']['median_ms'])} ms", times(agl["speedup_vs_eager"]),
                    times(agl["speedup_vs_compiled"]), mem if mode != "backward" else "–",
                    (agl["provenance"]["git_commit"] or "?")[:7]])
    return table(["shape, dtype, mode", "fused", "eager reference", "`torch.compile`d reference", "× eager",
                  "× compiled", "peak extra memory: fused / eager / compiled", "commit"], out) + sources(used, path)


# ------------------------------------------------------------------------------------------------ other benches
def agl_loss() -> str:
    path = BENCH / "bench_loss.json"
    rows = read_rows(path)
    row = pick(rows, bench="agl_loss_overhead", threads=2, batch=2, seq=128, layers=30, rank=16)
    out = []
    for name, r in row["results"].items():
        reg = r.get("regularizer_fwd_bwd_s")
        out.append([name, f"{r['median_step_s']:.2f} s", f"{r['overhead_pct']:+.1f}%", f"{r['overhead_cpu_pct']:+.1f}%",
                    "–" if reg is None else f"{reg:.2f} s"])
    text = table(["configuration", "step (median)", "overhead, wall", "overhead, CPU time",
                  "regulariser fwd+bwd alone"], out)
    note = ""
    wide = matching(rows, bench="agl_loss_overhead", threads=2, batch=2, seq=128, layers=30, rank=64)
    if wide:
        w = pick(wide)
        note = (" With subspaces of rank 64 (the real states' cap): " + ", ".join(
            f"{n} {r['overhead_pct']:+.1f}%" for n, r in w["results"].items() if n != "plain LoRA") + ".")
    return (text + f"\n{row['layers']} layers, LoRA r8 on q/k/v/o, subspaces of rank {row.get('rank', 16)}, batch "
            f"{row['batch']} × {row['seq']} tokens, {row['threads']} threads, median of {row['steps']} steps." + note
            + sources([row] + ([w] if wide else []), path))


def fisher() -> str:
    path = BENCH / "bench_fisher.json"
    rows = read_rows(path)
    shown = [pick(rows, hidden=128, threads=1), pick(rows, hidden=256, threads=2)]
    out = []
    for r in shown:
        h, lp = r["results"]["hooks"], r["results"]["per-sample loop"]
        out.append([f"hidden {r['hidden']}, {r['layers']} layers", str(r["threads"]),
                    f"{r['samples']} × {r['seq']}, batch {r['batch']}", f"{h['samples_per_s']:.1f}",
                    f"{lp['samples_per_s']:.1f}", times(r["speedup"]), times(r["speedup_cpu_time"]),
                    f"{r['max_rel_diff_F']:.0e}"])
    text = table(["Llama model", "threads", "samples × tokens", "hooks, samples/s", "per-sample loop, samples/s",
                  "speed-up, wall", "speed-up, CPU time", "max rel. diff of F (float32)"], out)
    notes = []
    for r in (r for r in rows if r.get("caveat")):
        fair = pick(rows, hidden=r["hidden"], layers=r["layers"], threads=1)["results"]["per-sample loop"]
        hooks = r["results"]["hooks"]["samples_per_s"]
        notes.append(f"\nNot shown: hidden {r['hidden']} with {r['threads']} threads ({r['speedup']:.1f}×): "
                     f"{r['caveat']}. Against the 1-thread loop, its hooks ({hooks:.1f} samples/s) are "
                     f"{hooks / fair['samples_per_s']:.1f}× faster.")
    cross = [r for r in rows if r.get("cross_cost") is not None]
    if cross:
        c = pick(cross)
        notes.append(f"\nWith the cross-layer curvature (`cross_curvature=True`: a second pass storing C = Uᵀ G V per "
                     f"sample), hidden {c['hidden']}, {c['layers']} layers, {c['samples']} × {c['seq']}, "
                     f"{c['threads']} thread(s): {c['cross_cost']:.2f}× the time of the Fisher alone (goal ≤ 2×; "
                     f"{describe(c['provenance'])}).")
        shown = shown + [c]
    return text + "".join(notes) + ("\n" if notes else "") + sources(shown, path)


def driftcaps() -> str:
    path = BENCH / "driftcaps_cpu.json"
    row = pick(read_rows(path), bench="driftcaps_evaluate", device="cpu")
    out = [[str(r["batch_size"]), str(r["n_prompts"]), f"{r['seconds']:.1f} s", f"{r['prompts_per_s']:.3f}",
            f"{r['new_tokens_per_s']:.1f}"] for r in row["rows"]]
    text = table(["batch size", "prompts", "time", "prompts/s", "generated tokens/s"], out)
    load = row["provenance"].get("load_avg")
    return (text + f"\n{row['model']}, {row['max_new_tokens']} new tokens, {row['threads']} threads: batched "
            f"{row['batched_speedup']:.1f}× faster" + (f"; load average {load[0]:.1f} at the start" if load else "")
            + "." + sources([row], path))


# ------------------------------------------------------------------------------------------------ experiment reports
def _report_table(folder: str, methods: List[str], seeds: bool) -> str:
    path = DOCS / folder / "report.json"
    rep = json.loads(path.read_text())
    if not isinstance(rep.get("provenance"), dict):
        raise ValueError(f"{path}: no `provenance` object (a report must record agl._provenance.provenance())")
    a = rep["aligned_start"]
    head = ["method"] + (["seeds"] if seeds else []) + ["RR_unsafe", "drift reduction vs LoRA (95% CI)",
                                                       "over-refusal", "task EM", "ΔL_align", "β (95% CI)"]
    out = [["aligned start"] + (["–"] if seeds else []) + [pct(a["rr_unsafe"]), "–", pct(a["over_refusal"]),
                                                           pct(a["task_em"]), "–", "–"]]
    for key in methods:
        m = rep["methods"][key]
        b, bci = m.get("law_beta"), m.get("law_beta_ci") or [None, None]
        beta = "–" if b is None or b != b else f"{b:.2f} [{bci[0]:.2f}, {bci[1]:.2f}]"  # no curve: Safe LoRA
        out.append([m["label"]] + ([str(len(m["seeds"]))] if seeds else [])
                   + [pct(m["rr_unsafe_after"]),
                      "(the reference)" if key == "lora" else f"{pct(m['drift_reduction'])} {ci(m['drift_reduction_ci'])}",
                      pct(m["over_refusal"]), pct(m["task_em"]), f"{m['delta_align_loss']:.3f}", beta])
    n = f"{a['n_eval_unsafe']} unsafe + {a['n_eval_safe']} safe eval prompts"
    rel = path.relative_to(ROOT).as_posix()
    return table(head, out) + f"\n{n}; rows: `{rel}`; {describe(rep['provenance'])}.\n"


CALIBRATED = "2026-11-30-cpu-calibrated"  # the run that chose and measured the nats defaults (issue 10)


def calibrated() -> str:
    """The defaults' run: methods (with Safe LoRA), the AGL-vs-EWC frontier at EWC's operating point, the goals."""
    rep = json.loads((DOCS / CALIBRATED / "report.json").read_text())
    keys = [k for k in ("lora", "agl", "ewc", "safe_lora") if k in rep["methods"]]
    text = _report_table(CALIBRATED, keys, seeds=True)
    F = rep.get("frontier") or {}
    ops = F.get("operating_points") or {}
    vs = F.get("agl_vs_ewc")
    lines = []
    if ops:
        lines.append("Operating points (pre-registered rule 1, dev EM over seeds " + ", ".join(map(str, F["seeds"]))
                     + "): " + ", ".join(f"{k} {'none qualifies' if v is None else v['label']}" for k, v in ops.items())
                     + ".")
    if vs:
        lines.append(f"AGL vs EWC at EWC's operating point ({vs['ewc_operating_point']}, task EM {pct(vs['em_matched'])}):"
                     f" AGL's frontier keeps {100 * vs['rr_gain_at_matched_em']:+.1f} points of RR_unsafe-after over EWC, "
                     f"95% CI [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}], p = {vs['p_value']:.2g}.")
    elif F:
        lines.append(f"AGL vs EWC: not computed ({F.get('agl_vs_ewc_error')}).")
    for name, g in (rep.get("goals") or {}).items():
        lines.append(f"Goal `{name}`: {'met' if g['met'] else '**not met**'} (value {g['value']:.3f}, target "
                     f"{g['target']}{'; ' + g['note'] if g.get('note') else ''}).")
    return text + "\n" + "\n".join(f"- {l}" for l in lines) + "\n"


def prediction() -> str:
    """Predicted vs measured ΔL_align in the defaults' run: Σmeasured/Σpredicted and Spearman ρ over every logged point
    (both predictors), then the ratio per method on ΔW_A (what the regulariser meters)."""
    path = DOCS / CALIBRATED / "report.json"
    rep = json.loads(path.read_text())
    P = rep["prediction"]

    def ratio(x, lo=None, hi=None) -> str:
        fmt = lambda v: f"{v:,.0f}".replace(",", " ")  # noqa: E731
        return f"{fmt(x)}×" + ("" if lo is None else f" [{fmt(lo)}, {fmt(hi)}]")

    what = {"align": "ΔW_A (`align_nats`, the AGL term)", "full": "whole ΔW (the EWC penalty)"}
    out = [[what[k], str(P[k]["n_points"]), str(P[k]["n_runs"]), ratio(P[k]["ratio"], *P[k]["ratio_ci"]),
            f"{P[k]['spearman']:.2f} [{P[k]['spearman_ci'][0]:.2f}, {P[k]['spearman_ci'][1]:.2f}]"]
           for k in ("align", "full") if k in P]
    per = ", ".join(f"{rep['methods'][m]['label'] if m in rep['methods'] else m} {ratio(v['ratio_align'])}"
                    for m, v in P.get("per_method", {}).items())
    rel = path.relative_to(ROOT).as_posix()
    return (table(["prediction on", "points", "runs", "Σmeasured / Σpredicted (95% CI)", "Spearman ρ (95% CI)"], out)
            + f"\nPer method, on ΔW_A: {per}. Rows: `{rel}`; {describe(rep['provenance'])}.\n")


def term_sweeps() -> str:
    """Rule 7's choosing run: each extra term's weights with their gradient share, dev EM and dev ΔL_align."""
    path = DOCS / CALIBRATED / "choosing" / "term-sweeps" / "report.json"
    rep = json.loads(path.read_text())
    T = rep["term_sweeps"]
    base = T["base"]
    out = [["none (λ_A only)", "0", "–", pct(base["dev_em"]), f"{base['dev_delta_align']:.3f}", "–"]]
    for term, t in T["terms"].items():
        for q in t["points"]:
            out.append([term, f"{q['weight']:g}", "–" if q["grad_share"] is None else pct(q["grad_share"]),
                        pct(q["dev_em"]), f"{q['dev_delta_align']:.3f}",
                        "helps, chosen" if t["helps"] and q["weight"] == t["chosen"] else ""])
    chosen = ", ".join(f"{k} {'%g' % t['chosen'] if t['helps'] else '0 (helps at no weight)'}"
                       for k, t in T["terms"].items())
    rel = path.relative_to(ROOT).as_posix()
    return (table(["term", "weight", "share of the regulariser's gradient", "dev EM", "dev ΔL_align", "rule 7"], out)
            + f"\nLoRA's dev EM {pct(T['lora_dev_em'])}; λ_A = {rep['config']['agl']['lambda_align']:g}; rule 7 "
            f"chose: {chosen}. Rows: `{rel}`; {describe(rep['provenance'])}.\n")


def demo() -> str:
    return _report_table("2026-11-28-cpu-demo", ["lora", "agl"], seeds=False)


def experiment() -> str:
    return _report_table("2026-11-28-cpu-3seed", ["lora", "agl", "ewc"], seeds=True)


def fsdp_memory() -> str:
    """Per-rank memory of the state and the regulariser: the newest measured run (1 process, then 2 FSDP2 ranks of
    the same commit) and the 70B-shaped arithmetic."""
    path = BENCH / "bench_fsdp_memory.json"
    rows = read_rows(path)
    one = pick(rows, kind="measured", world=1)
    same = {k: one[k] for k in ("model", "samples", "seq", "max_rank")}
    shown = [one] + [r for r in matching(rows, kind="measured", world=2, **same)
                     if r["provenance"].get("git_commit") == one["provenance"].get("git_commit")
                     and r["provenance"].get("date", "")[:10] == one["provenance"].get("date", "")[:10]][-2:]

    def mib(x: float) -> str:
        return f"{x:.1f} MiB" if x < 1024 else f"{x / 1024:.1f} GiB"

    out = [[f"{r['model']} (measured)", str(r["world"]), str(r["rank"]), mib(r["state_fisher_bytes"] / 2**20),
            mib(r["state_subspace_bytes"] / 2**20), mib(r["estimate_peak_mib"]), mib(r["load_peak_mib"]),
            mib(r["agl_loss_init_peak_mib"]), mib(r["regularizer_peak_mib"])]
           for r in shown]
    for world in (1, 8):
        a = pick(rows, kind="arithmetic", world=world, rank=0)
        out.append([f"70B-shaped q/k/v/o, {a['fisher_elements_total'] / 1e9:.1f} G elements, bf16 (arithmetic)",
                    str(world), "each", mib(a["state_fisher_gib"] * 1024), mib(a["state_subspace_gib"] * 1024),
                    f"{mib(a['estimate_accumulator_gib'] * 1024)} F rows (float64, + one layer in flight) + "
                    f"up to {mib(a['estimate_moments_gib_max'] * 1024)} S_out/S_in owned", "–", "–", "–"])
    text = table(["model", "ranks", "rank", "Fisher held", "U, V (whole on every rank)", "estimation: peak rise",
                  "load: peak rise", "AGLLoss(): peak rise", "regulariser step: peak rise"], out)
    return text + ("\nPeak rises are of resident memory (VmHWM) over the step, so they include activations, "
                   "per-sample gradients, collective buffers and, for the load, the file pages mapped while reading; "
                   "the regulariser step is the second call. The state columns are the bytes of its tensors.\n"
                   + sources(shown + [pick(rows, kind="arithmetic", world=8, rank=0)], path))


CURVATURE = "2026-12-05-curvature"


def curvature_prediction() -> str:
    """Rule 8: median measured/predicted ΔL_align per curvature over every logged point of the curvature run's
    fine-tunes (LoRA, diagonal AGL, EWC, the cross-curvature grid and budgets), with the goal."""
    path = DOCS / CURVATURE / "prediction.json"
    P = json.loads(path.read_text())
    what = {"diagonal": "diagonal Fisher on ΔW_A (`align_nats` before)", "diagonal_full": "diagonal Fisher on ΔW (EWC)",
            "cross": "cross-layer empirical Fisher on ΔW_A (`curvature=\"cross\"`)"}
    rows = []
    for k, label in what.items():
        q = P.get(k)
        if not q:
            continue
        lo, hi = q["ci95"]
        med = q["median_ratio"]
        met = 0.5 <= med <= 2 and q["spearman"] >= 0.8
        per = ", ".join(f"{m} {v:.3g}" for m, v in q["per_method"].items())
        rows.append([label, str(q["n_points"]), f"{med:.3g} [{lo:.3g}, {hi:.3g}]", f"{q['spearman']:.2f}",
                     "**met**" if met else "missed", per])
    rel = path.relative_to(ROOT).as_posix()
    return (table(["predictor", "points", "median measured / predicted (95% CI)", "Spearman ρ",
                   "goal [0.5, 2], ρ ≥ 0.8", "per run (median)"], rows)
            + f"\nRows: `{rel}`; {describe(P['provenance'])}.\n")


def curvature_decomposition() -> str:
    """Issue 17 item 1: held-out measured ΔL_align over each predictor (computed on the Fisher samples), median over
    the checkpoints of each kind of run."""
    path = DOCS / CURVATURE / "decomposition.json"
    rows_in = json.loads(path.read_text())
    kinds = list(dict.fromkeys(r["run"].rsplit("-s", 1)[0] for r in rows_in))
    keys = [("diag_A", "diagonal, ΔW_A"), ("diag_full", "diagonal, ΔW"), ("kfac", "K-FAC per layer"),
            ("block", "exact per-layer blocks"), ("cross_A", "cross-layer, projected on U/V"),
            ("cross", "cross-layer, full G"), ("gauss_newton", "Gauss–Newton along ΔW"),
            ("hess", "½ d²L/dε² (exact)")]

    def med(vals):
        return statistics.median(vals) if vals else None

    out = []
    for key, label in keys:
        cells = []
        for kind in kinds:
            sel = [r for r in rows_in if r["run"].rsplit("-s", 1)[0] == kind and r["fisher"][key] > 0]
            v = med([r["heldout"]["measured"] / r["fisher"][key] for r in sel])
            cells.append("–" if v is None else f"{v:.3g}")
        out.append([label] + cells)
    first = []
    for kind in kinds:
        sel = [r for r in rows_in if r["run"].rsplit("-s", 1)[0] == kind]
        f = med([r["heldout"]["first_order"] / r["heldout"]["measured"] for r in sel if r["heldout"]["measured"] > 0])
        first.append("–" if f is None else f"{100 * f:.0f}%")
    out.append(["first-order ∇L·ΔW on held-out, share of measured"] + first)
    rel = path.relative_to(ROOT).as_posix()
    return (table(["held-out measured ΔL_align / predictor"] + kinds, out)
            + f"\n{len(rows_in)} checkpoints; rows: `{rel}`; {describe(rows_in[0]['provenance'])}.\n")


LADDER = "2026-12-05-ladder"  # issue 21: AGL against the baselines users pick instead (docs/EXPERIMENT.md rules 11-15)


def _pct_ci(x, pair) -> str:
    return pct(x) if not pair or None in pair else f"{pct(x)} {ci(pair)}"


def _gain(g: Optional[dict]) -> str:
    """'+3.1 [-1.0, +7.2] p 0.14' (points) from a pairwise ``rr`` / ``compliance`` block."""
    if not g or g.get("gain") is None:
        return "–"
    lo, hi = g.get("ci95") or [None, None]
    band = "" if lo is None or hi is None else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    p = g.get("p_value")
    return f"{100 * g['gain']:+.1f}{band}" + ("" if p is None else f", p {p:.2g}")


def ladder() -> str:
    """The ladder run: every method (refusal, compliance, over-refusal, task EM, both drift reductions), then AGL's
    frontier at each baseline's dev-chosen operating point (``frontier.pairwise``), then the pre-registered goals.
    A report on fewer seeds than the run's config.toml is marked interim, from the numbers themselves."""
    import tomllib

    folder = DOCS / LADDER
    rep = json.loads((folder / "report.json").read_text())
    planned = tomllib.loads((folder / "config.toml").read_text())["experiment"]["seeds"]
    a, M = rep["aligned_start"], rep["methods"]
    rows = [["aligned start", "–", _pct_ci(a["rr_unsafe"], a.get("rr_unsafe_ci")), "–", "–",
             _pct_ci(a["over_refusal"], a.get("over_refusal_ci")), pct(a["task_em"]), "–", "–", "–"]]
    for key, m in M.items():
        ref = key == "lora"
        rows.append([m["label"], str(len(m["seeds"])), _pct_ci(m["rr_unsafe_after"], m.get("rr_unsafe_after_ci")),
                     pct(m.get("unsafe_complied")), pct(m.get("unsafe_incoherent")), pct(m["over_refusal"]),
                     _pct_ci(m["task_em"], m.get("task_em_ci")),
                     "(reference)" if ref else _pct_ci(m.get("compliance_drift_reduction"),
                                                       m.get("compliance_drift_reduction_ci")),
                     "(reference)" if ref else _pct_ci(m.get("drift_reduction"), m.get("drift_reduction_ci")),
                     f"{m['delta_align_loss']:.3f}"])
    text = table(["method", "seeds", "RR_unsafe after", "unsafe complied", "incoherent", "over-refusal", "task EM",
                  "drift reduction, compliance", "drift reduction, refusal", "ΔL_align"], rows)
    F = rep.get("frontier") or {}
    pw = []
    for b, e in (F.get("pairwise") or {}).items():
        if e["error"] is not None:
            pw.append([M.get(b, {}).get("label", b), e["operating_point"] or "–", "–", "–", "–",
                       f"not computed: {e['error']}", "–"])
            continue
        rr, c = e["rr"], e["compliance"]
        pw.append([M.get(b, {}).get("label", b), e["operating_point"], pct(e["em"]),
                   f"{pct(rr['baseline'])} / {pct(c['baseline'])}", f"{pct(rr['agl'])} / {pct(c['agl'])}",
                   _gain(rr), _gain(c)])
    if pw:
        text += ("\nAGL's frontier (its λ grid, LoRA as λ = 0) at each baseline's dev-chosen operating point; gains in "
                 "points, positive = AGL keeps more refusals / complies less, 95% bootstrap CI over seeds, prompts and "
                 "questions:\n\n" + table(["baseline", "operating point", "task EM", "its RR / complied",
                                           "AGL's RR / complied there", "RR gain", "compliance gain"], pw))
    along = []
    for b, entry in (F.get("matched_em") or {}).items():
        for p in entry["points"]:
            c, r = p["compliance"], p["rr"]
            along.append([M.get(b, {}).get("label", b), p["label"], pct(p["task_em"]),
                          f"{pct(c['baseline'])} / {pct(r['baseline'])}", f"{pct(c['agl'])} / {pct(r['agl'])}",
                          f"{_gain(c)}, {c['verdict']}", f"{_gain(r)}, {r['verdict']}"])
    if along:
        text += ("\nAGL's frontier at every setting of every baseline (rule 16, post hoc: it chooses nothing; verdict "
                 "from the 95% CI, not corrected for multiple comparisons; *under / over AGL's EM range*: the setting's "
                 "task EM lies outside the EMs AGL's curve reaches, so it is not matched):\n\n"
                 + table(["baseline", "setting", "its task EM", "its complied / RR", "AGL's frontier there",
                          "compliance gain", "RR gain"], along))
    ops = F.get("operating_points") or {}
    notes = ["Operating points (rule 1 on dev EM): " + ", ".join(
        f"{k} {'none qualifies' if v is None else v['label']}" for k, v in ops.items()) + "."] if ops else []
    for name, g in (rep.get("goals") or {}).items():
        state = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
        val = "–" if g["value"] is None else f"{g['value']:.3f}"
        notes.append(f"Goal `{name}`: {state} (value {val}, target {g['target']}"
                     f"{'; ' + g['note'] if g.get('note') else ''}).")
    head = F.get("headline") or []
    if head:
        text = ("Headline (generated from the report; compliance first, rule 14; gains in points, AGL's frontier "
                "minus the baseline):\n\n" + "".join(f"- {h}\n" for h in head) + "\n" + text)
    seeds = rep["config"]["seeds"]
    status = ("" if sorted(seeds) == sorted(planned) else
              f"**Interim: seeds {seeds} of the planned {planned}; operating points and CIs are not the "
              f"pre-registered three-seed numbers.** ")
    n = f"{a['n_eval_unsafe']} unsafe + {a['n_eval_safe']} safe eval prompts"
    rel = (folder / "report.json").relative_to(ROOT).as_posix()
    return (text + "\n" + "\n".join(f"- {l}" for l in notes) + "\n\n" + status
            + f"{n}; rows: `{rel}`; {describe(rep['provenance'])}.\n")


TABLES: Dict[str, Callable[[], str]] = {
    "h200-ops": h200_ops, "cpu-ops": cpu_ops, "agl-loss": agl_loss, "fisher": fisher, "driftcaps": driftcaps,
    "demo": demo, "experiment": experiment, "fsdp-memory": fsdp_memory, "calibrated": calibrated,
    "term-sweeps": term_sweeps, "prediction": prediction, "curvature-prediction": curvature_prediction,
    "curvature-decomposition": curvature_decomposition, "ladder": ladder,
}


# ------------------------------------------------------------------------------------------------ README blocks
def blocks(text: str) -> Dict[str, str]:
    """The generated blocks of ``text`` by name. Raises a ValueError for a block opened twice or never closed."""
    found: Dict[str, str] = {}
    for m in BLOCK.finditer(text):
        if m.group("name") in found:
            raise ValueError(f"README: block {m.group('name')!r} appears twice")
        found[m.group("name")] = m.group("body")
    opened = re.findall(r"<!-- agl:table ([\w-]+) -->", text)
    unclosed = [n for n in opened if n not in found]
    if unclosed:
        raise ValueError(f"README: block(s) {unclosed} opened but not closed with <!-- /agl:table -->")
    return found


def render(text: str) -> str:
    """``text`` with every generated block re-rendered. Raises a ValueError naming blocks the README lacks or that
    no renderer knows."""
    have = blocks(text)
    missing = [n for n in TABLES if n not in have]
    unknown = [n for n in have if n not in TABLES]
    if missing or unknown:
        raise ValueError(f"README: missing block(s) {missing}, unknown block(s) {unknown} "
                         f"(known: {sorted(TABLES)})")
    return BLOCK.sub(lambda m: f"<!-- agl:table {m.group('name')} -->\n{TABLES[m.group('name')]()}"
                               f"<!-- /agl:table -->", text)


def stale(text: str) -> List[str]:
    """Names of the blocks whose text differs from a fresh render (the README is up to date when empty)."""
    fresh = blocks(render(text))
    return [n for n, body in blocks(text).items() if fresh[n] != body]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is stale")
    ap.add_argument("--readme", default=str(README))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    if args.check:
        bad = stale(text)
        if bad:
            print(f"{path}: stale block(s) {bad}: run `python tools/render_readme.py`", file=sys.stderr)
            return 1
        print(f"{path}: {len(TABLES)} generated blocks up to date")
        return 0
    new = render(text)
    if new != text:
        from agl._io import atomic_write_text

        atomic_write_text(path, new)
    print(f"{path}: {len(TABLES)} blocks rendered" + ("" if new != text else " (no change)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
