"""Rule 8's prediction goal over the runs of both outputs of this result (the diagonal defaults' run and the
cross-curvature grid): every logged point of every fine-tune, one entry per curvature (``analysis.prediction_section``),
written to ``prediction.json`` with provenance. The fine-tunes are named ``<output>/<stage>`` so the two outputs'
LoRA runs (the same stage, symlinked) count once.

    python docs/results/2026-12-05-curvature/combine.py demo=/work/runs/demo cross=/work/runs/cross
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from agl._io import atomic_write_json  # noqa: E402
from agl._provenance import provenance  # noqa: E402
from agl.experiment.analysis import prediction_section  # noqa: E402


class _Cfg:
    n_boot = 1000


def main(argv):
    prov = provenance()
    paths, seen = {}, set()
    for spec in argv:
        tag, out = spec.split("=", 1)
        ft = os.path.join(out, "finetune")
        state = os.path.realpath(os.path.join(out, "alignment_state"))
        for run in sorted(os.listdir(ft)):
            real = os.path.realpath(os.path.join(ft, run))
            log = os.path.join(real, "train_log.json")
            if run.startswith(".") or not os.path.exists(log):
                continue
            with open(log) as fh:
                L = json.load(fh)
            # one fine-tune counts once: a symlinked stage, or a run with the same state, settings and seed
            # (a main method and the grid point it equals, trained twice under two names)
            ident = (state, json.dumps(L.get("settings"), sort_keys=True), L.get("seed"), "projection" in L)
            if real in seen or ident in seen:
                continue
            seen.update({real, ident})
            paths[f"finetune/{tag}:{run}"] = real
    # a point's method is its run's label ("agl" means different settings in the two outputs)
    P = prediction_section(_Cfg, paths, method_of=lambda name, log: name.split("/", 1)[1].rsplit("-s", 1)[0])
    atomic_write_json(HERE / "prediction.json", {"provenance": prov, "runs": sorted(paths), **P})
    for k in ("diagonal", "diagonal_full", "cross"):
        q = P.get(k)
        if q:
            print(f"{k:>14}: median measured/predicted {q['median_ratio']:.3g} {q['ci95']}, "
                  f"Spearman {q['spearman']:.2f}, {q['n_points']} points")


if __name__ == "__main__":
    main(sys.argv[1:])
