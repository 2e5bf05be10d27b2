"""How hard each AGL term pulls at a fine-tuned adapter, per unit weight: the input of the term sweeps' grids
(docs/EXPERIMENT.md, rule 6).

For one fine-tune of an experiment directory (default: LoRA, seed 0), builds ``AGLLoss`` on its final adapter with
one term at weight 1 and the others at 0 and reads ``gradient_shares()["grad_norm_<term>"]`` =
‖∂ term/∂(B, A)‖₂ over every LoRA factor (g_term). Gradient norms are linear in the weights, so with λ_A on and one
other term at weight w, that term's share of the regulariser's gradient norm is

    share(w) = w·g_term / (w·g_term + λ_A·g_align)   ⇔   w = λ_A·(g_align / g_term)·share / (1 − share),

which gives the weights for the shares 1%, 10%, 50% and 90% printed (and stored) for the λ_A given.

    python docs/results/2026-11-30-cpu-calibrated/term_scale_probe.py RUN_DIR [--lambda-align 300] [--run lora] [--seed 0]

RUN_DIR: an `agl demo` / `agl experiment` output directory whose config.json, aligned start, alignment state and
``finetune/<run>-s<seed>`` exist. Writes a row to term_scale_probe.json next to this script.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "bench"))
from _results import append_rows, provenance  # noqa: E402  (bench/_results.py: the one row writer)

SHARES = (0.01, 0.1, 0.5, 0.9)


def unit_norms(model, state, cfg) -> dict:
    """g_term for align and each term of ``config.SWEEP_TERMS``: the gradient norm of the term at weight 1 (its
    sweep point ``config.term_settings(cfg, term, 1)``, with λ_A = 1 and no budget)."""
    import dataclasses

    from agl.experiment.config import SWEEP_TERMS, term_settings
    from agl.loss import AGLLoss

    out = {}
    for term in SWEEP_TERMS:
        settings = dataclasses.replace(term_settings(cfg, term, 1.0), lambda_align=1.0, align_budget=None)
        g = AGLLoss(model, state, settings).gradient_shares()
        out.setdefault("align", g["grad_norm_align"])
        out[term] = g[f"grad_norm_{term}"]
    return out


def weights_for(norms: dict, lambda_align: float) -> dict:
    """term -> {share: weight} from the linear share formula in the module docstring."""
    return {t: {f"{s:g}": lambda_align * norms["align"] / norms[t] * s / (1 - s) for s in SHARES}
            for t in norms if t != "align" and norms[t] > 0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--run", default="lora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambda-align", type=float, default=1.0)
    a = ap.parse_args(argv)
    prov = provenance()
    from agl.experiment.pipeline import load_finetune

    model, state, cfg = load_finetune(a.run_dir, a.run, a.seed)
    norms = unit_norms(model, state, cfg)
    row = {"run": a.run, "seed": a.seed, "model": cfg.model, "steps": cfg.steps, "grad_norm_per_unit_weight": norms,
           "lambda_align": a.lambda_align, "weights_for_share": weights_for(norms, a.lambda_align)}
    print(json.dumps(row, indent=1))
    append_rows(os.path.join(HERE, "term_scale_probe.json"), [row], prov,
                key=("run", "seed", "model", "steps", "lambda_align"))


if __name__ == "__main__":
    main()
