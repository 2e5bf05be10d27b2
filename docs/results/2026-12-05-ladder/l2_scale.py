"""The L2-SP grid of the ladder (docs/EXPERIMENT.md, rule 11): ρ(λ) = the ρ at which the isotropic penalty
½ρ·Σ_l‖ΔW_l‖²_F pulls on the LoRA factors as hard as EWC at λ does, on one fine-tuned adapter.

Gradient norms are linear in the weights, so with g_ewc = ‖∂ EWC(λ=1)/∂θ‖₂ and g_l2 = ‖∂ L2(ρ=1)/∂θ‖₂ over every
LoRA factor θ (``AGLLoss.gradient_shares()["grad_norm_align"]``), ρ(λ) = λ·g_ewc/g_l2, rounded to one significant
digit. Calibration data only: the adapter is a finished fine-tune on the task's train split, the Fisher is the
state's (refusal demonstrations of the calibration split); no eval number is read.

    python docs/results/2026-12-05-ladder/l2_scale.py RUN_DIR [--run lora] [--seed 0] [--lambdas 1000,3000,10000]

RUN_DIR: an `agl demo` / `agl experiment` output directory with config.json, the aligned start, the alignment state
and ``finetune/<run>-s<seed>``. Writes a row to l2_scale.json next to this script.
"""
import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "bench"))
from _results import append_rows, provenance  # noqa: E402  (bench/_results.py: the one row writer)


def one_digit(x: float) -> float:
    return float(f"{x:.0e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--run", default="lora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambdas", default="1000,3000,10000")
    a = ap.parse_args(argv)
    prov = provenance()
    from agl.experiment.pipeline import load_finetune
    from agl.loss import AGLConfig, AGLLoss

    model, state, cfg = load_finetune(a.run_dir, a.run, a.seed)
    g = {name: AGLLoss(model, state, c).gradient_shares()["grad_norm_align"]
         for name, c in (("ewc", AGLConfig.ewc(1.0)), ("l2", AGLConfig.l2(1.0)))}
    lams = [float(x) for x in a.lambdas.split(",")]
    rho = {f"{lam:g}": one_digit(lam * g["ewc"] / g["l2"]) for lam in lams}
    assert all(math.isfinite(v) and v > 0 for v in rho.values()), rho
    row = {"run": a.run, "seed": a.seed, "model": cfg.model, "steps": cfg.steps,
           "fisher_samples": cfg.fisher_samples, "grad_norm_per_unit_weight": g, "rho_for_ewc_lambda": rho}
    print(json.dumps(row, indent=1))
    append_rows(os.path.join(HERE, "l2_scale.json"), [row], prov,
                key=("run", "seed", "model", "steps", "fisher_samples"))


if __name__ == "__main__":
    main()
