"""Agreement of the refusal judge with the hand labels of its validation set (``docs/JUDGE.md``).

    python bench/judge_agreement.py                  # both splits -> bench/results/judge_agreement.json
    python bench/judge_agreement.py --render-only    # only rewrite the table in docs/JUDGE.md from that JSON

For each split: agreement (share of rows where the judge's verdict equals the label) with a Wilson 95% interval,
per style and per source, the confusion counts, and the same numbers for the judge as it was before this set
existed (``agl/driftcaps/judge.py`` at commit ``BASELINE_COMMIT``) and before the lecture rules of issue 20
(``PREVIOUS_COMMIT``), both loaded from git, so no copy of them lives here. The table between the
``<!-- agl:table judge-agreement -->`` markers of ``docs/JUDGE.md`` is rendered from the JSON (a test checks it).
The test split is for the final report only; build and tune on dev.
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # _results

BASELINE_COMMIT = "1443d92"
PREVIOUS_COMMIT = "51d2026"  # the judge before issue 20 (no "lectures" rule, no handwritten-styles rows)
SPLITS = ("dev", "test")
GUIDE = REPO / "docs" / "JUDGE.md"
BLOCK = re.compile(r"(<!-- agl:table judge-agreement -->\n)(.*?)(<!-- /agl:table -->)", re.S)
SHOWN = ("all", "source:handwritten-styles", "label:refusal", "label:compliance", "style:lecture_refusal",
         "style:refusal_no_stock", "style:moralising_compliance", "style:safety_advice_compliance")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n: centre (k + z²/2)/(n + z²), half-width
    z·sqrt(k(n-k)/n + z²/4)/(n + z²)."""
    if n == 0:
        return (float("nan"), float("nan"))
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return (max(0.0, centre - half), min(1.0, centre + half))


def baseline_judge(commit: str = BASELINE_COMMIT):
    """``judge_refusal`` as of ``commit`` (read from git), or None outside a git checkout."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:agl/driftcaps/judge.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"judge_{commit}")
    exec(compile(src, f"judge.py@{commit}", "exec"), mod.__dict__)  # noqa: S102 - our own file
    return mod.judge_refusal


def render_markdown(result: dict) -> str:
    """The docs/JUDGE.md table of a recorded result: per split, the groups in ``SHOWN`` with agreement and Wilson
    95% interval for this judge and the two earlier ones, then the provenance of the run."""
    from _results import describe

    cols = [("judge", "this judge"), ("previous", f"before issue 20 ({PREVIOUS_COMMIT})"),
            ("baseline", f"as of {BASELINE_COMMIT}")]
    cols = [(k, t) for k, t in cols if all(k in e for e in result["splits"].values())]
    lines = ["| split | group | n | " + " | ".join(t for _, t in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for split, entry in result["splits"].items():
        for key in SHOWN:
            g = entry["judge"]["groups"].get(key)
            if g is None:
                continue
            cells = []
            for k, _ in cols:
                h = entry[k]["groups"][key]
                cells.append(f"{100 * h['rate']:.1f}% [{100 * h['ci95'][0]:.1f}, {100 * h['ci95'][1]:.1f}]")
            lines.append(f"| {split} | {key} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nWilson 95% intervals. Rows: `bench/results/judge_agreement.json`; " \
                              f"{describe(result['provenance'])}.\n"


def render_guide(result: dict, text: str) -> str:
    """``text`` (docs/JUDGE.md) with its judge-agreement block replaced by :func:`render_markdown`."""
    if not BLOCK.search(text):
        raise ValueError("docs/JUDGE.md has no <!-- agl:table judge-agreement --> block")
    return BLOCK.sub(lambda m: m.group(1) + render_markdown(result) + m.group(3), text)


def score(rows: list[dict], judge) -> dict:
    """Agreement of ``judge(completion) -> bool`` with ``label`` overall, per style and per source."""
    groups = defaultdict(lambda: [0, 0])
    conf = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}  # positive = refusal
    misses = []
    for r in rows:
        pred = bool(judge(r["completion"]))
        gold = r["label"] == "refusal"
        ok = pred == gold
        conf[("t" if ok else "f") + ("p" if pred else "n")] += 1
        for key in ("all", f"style:{r['style']}", f"source:{r['source']}", f"label:{r['label']}"):
            groups[key][0] += ok
            groups[key][1] += 1
        if not ok:
            misses.append(r["id"])
    out = {}
    for key, (k, n) in sorted(groups.items()):
        lo, hi = wilson(k, n)
        out[key] = {"agree": k, "n": n, "rate": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return {"groups": out, "confusion": conf, "misses": misses}


def plot(result: dict, path: str, split: str = "test") -> None:
    """Agreement per style, this judge vs the baseline, on ``split``: one horizontal bar pair per style, Wilson
    interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = result["splits"][split]
    keys = sorted(k for k in entry["judge"]["groups"] if k.startswith(("style:", "source:")) or k == "all")
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(keys) + 1.2))
    for off, name, colour in ((-0.2, "judge", "tab:blue"), (0.2, "baseline", "tab:grey")):
        if name not in entry:
            continue
        g = entry[name]["groups"]
        rates = [g[k]["rate"] for k in keys]
        err = [[g[k]["rate"] - g[k]["ci95"][0] for k in keys], [g[k]["ci95"][1] - g[k]["rate"] for k in keys]]
        ax.barh([i + off for i in range(len(keys))], rates, height=0.4, xerr=err, color=colour, label=name,
                error_kw={"elinewidth": 0.6})
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{k} (n={entry['judge']['groups'][k]['n']})" for k in keys], fontsize=7)
    ax.axvline(0.92, color="tab:red", lw=0.8, ls="--")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"agreement with hand labels ({split} split, Wilson 95% CI); dashed: 0.92")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from agl._io import read_jsonl
    from agl._provenance import provenance

    sys.path.insert(0, str(REPO / "bench"))
    from _results import append_rows  # bench/_results.py: the one writer of result rows
    from agl.driftcaps.judge import judge_refusal

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "judge_agreement.json"))
    ap.add_argument("--show-misses", action="store_true", help="print the rows the judge gets wrong")
    ap.add_argument("--render-only", action="store_true", help="only rewrite docs/JUDGE.md's table from --out")
    args = ap.parse_args(argv)
    from _results import pick, read_rows
    from agl._io import atomic_write_text

    if args.render_only:
        rec = pick(read_rows(args.out), kind="judge_agreement")
        atomic_write_text(GUIDE, render_guide(rec, GUIDE.read_text(encoding="utf-8")))
        print(f"wrote {GUIDE}")
        return
    data_dir = REPO / "agl" / "driftcaps" / "data" / "judge"
    old = baseline_judge()
    prev = baseline_judge(PREVIOUS_COMMIT)
    prov = provenance()  # at the start: the load the run began under
    result = {"kind": "judge_agreement", "baseline_commit": BASELINE_COMMIT, "previous_commit": PREVIOUS_COMMIT,
              "splits": {}}
    for split in args.splits:
        rows = read_jsonl(data_dir / f"{split}.jsonl")
        new_s = score(rows, judge_refusal)
        entry = {"n": len(rows), "judge": new_s}
        if old is not None:
            entry["baseline"] = score(rows, old)
        if prev is not None:
            entry["previous"] = score(rows, prev)
        result["splits"][split] = entry
        a = new_s["groups"]["all"]
        line = f"{split}: n={len(rows)} judge {a['rate']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        if old is not None:
            b = entry["baseline"]["groups"]["all"]
            line += f"  baseline {b['rate']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]"
        print(line)
        for key, g in new_s["groups"].items():
            if key != "all":
                bl = entry.get("baseline", {}).get("groups", {}).get(key)
                print(f"   {key:40s} {g['agree']:4d}/{g['n']:<4d} {g['rate']:.3f}"
                      + (f"   baseline {bl['rate']:.3f}" if bl else ""))
        if args.show_misses:
            by_id = {r["id"]: r for r in rows}
            for i in new_s["misses"]:
                r = by_id[i]
                print(f"  MISS {i} [{r['label']}/{r['style']}] {r['completion'][:300]!r}")
    append_rows(args.out, [result], prov, key=("kind", "baseline_commit"))
    print(f"wrote {args.out}")
    if set(result["splits"]) == set(SPLITS):
        rec = pick(read_rows(args.out), kind="judge_agreement")
        atomic_write_text(GUIDE, render_guide(rec, GUIDE.read_text(encoding="utf-8")))
        print(f"wrote {GUIDE}")
    if "test" in result["splits"]:
        png = str(Path(args.out).with_suffix(".png"))
        plot(result, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
