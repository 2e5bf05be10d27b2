"""How well ``AGLConfig(align_budget=ε)`` holds the predicted rise of the alignment loss at ε (docs/MATH.md §8).

The tiny test Llama (hidden 64, LoRA r4 on q/k/v/o, built in code), its alignment state from 6 random-token samples,
then 80 steps of AdamW (lr 1e-2) on 16 other random-token samples: once without the alignment term (how far
``align_nats`` drifts) and once per (start λ0, look-ahead H) in budget mode, H = 0 being plain dual ascent in log
space. Writes budget_controller.json next to this script (per-step ``align_nats`` and ``lambda_align``, summaries,
provenance) and a plot of align_nats/ε and λ along training.

    python docs/results/2026-11-30-budget-controller/budget_controller.py [--budget 3e-4] [--steps 80]
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..", "..")
for _p in (REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "bench")):  # agl, _tiny, _results
    sys.path.insert(0, _p)

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=3e-4, help="ε in nats per token")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default=os.path.join(HERE, "budget_controller"))
    args = ap.parse_args()
    from tqdm.auto import tqdm

    from _tiny import train_trace

    from _results import append_rows, provenance  # bench/_results.py: the one writer of result rows
    from agl.loss import AGLConfig

    torch.set_num_threads(1)
    eps = args.budget
    runs = {"unconstrained": AGLConfig(backend="torch", lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0)}
    for horizon in (0.0, 10.0):
        for lam0 in (1e-3, 1.0, 1e3):
            runs[f"H={horizon:g} lambda0={lam0:g}"] = AGLConfig(backend="torch", lambda_align=lam0, lambda_task=0.0,
                                                               lambda_collision=0.0, align_budget=eps, budget_horizon=horizon)
    prov = provenance()  # at the start: the load the run began under
    result = {"bench": "budget_controller", "budget": eps, "steps": args.steps, "lr": args.lr, "runs": {}}
    for name, cfg in tqdm(runs.items(), desc="budget runs"):
        t = train_trace(cfg, args.steps, args.lr)
        a = [x for x, _ in t]
        result["runs"][name] = {
            "align_nats": a, "lambda_align": [lam for _, lam in t],
            "max_over_budget": max(a) / eps, "last20_mean_over_budget": sum(a[-20:]) / 20 / eps, "final_over_budget": a[-1] / eps,
        }
        print(f"{name:<22} max {max(a) / eps:5.2f}ε  last-20 mean {sum(a[-20:]) / 20 / eps:5.2f}ε  final {a[-1] / eps:5.2f}ε", flush=True)
    append_rows(args.out + ".json", [result], prov, key=("bench", "budget", "steps", "lr"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(result["runs"].items()):
        style = "-" if name.startswith("H=10") else (":" if name.startswith("H=0") else "--")
        ax1.plot([x / eps for x in r["align_nats"]], style, color=f"C{i}", label=name)
        if name != "unconstrained":
            ax2.semilogy(r["lambda_align"], style, color=f"C{i}", label=name)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set(xlabel="step", ylabel="align_nats / ε", ylim=(0, 4), title=f"predicted rise vs budget ε = {eps:g} nats/token")
    ax2.set(xlabel="step", ylabel="λ_align in force", title="the multiplier")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.json and .png")


if __name__ == "__main__":
    main()
