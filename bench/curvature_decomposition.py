"""Why the diagonal Fisher under-predicts the alignment-loss rise: the decomposition of issue 17, from our own code.

For every fine-tune of an `agl experiment` / `agl demo` run (``--out``) and every adapter checkpoint it saved
(``finetune/<run>-s<seed>/checkpoints/step-<k>/``, else only the final adapter), with ΔW_l = s_l·B_l·A_l and the
aligned start as the origin, on two sets of alignment demos (``fisher``: the samples the state was estimated on;
``heldout``: the held-out refusal demos the state never saw), everything in nats per labelled token:

- ``measured``: L(ΔW) − L(0), the rise of the token-averaged NLL; ``eps_curve``: the same at ε·ΔW, ε = 1/8 (and
  1/4, 1/2 at a run's last checkpoint);
- ``first_order``: (1/ΣT)·Σ_n Σ_l ⟨G_{n,l}, ΔW_l⟩ (G_{n,l}: gradient of sample n's summed token loss at the start);
- ``diag_full`` / ``diag_A``: ½(1/ΣT)·Σ_n Σ_l Σ_ij G² ΔW² on ΔW / on ΔW_A = U Uᵀ ΔW V Vᵀ (the state's diagonal
  Fisher; on the Fisher samples this is exactly the logged ``pred_full_nats`` / ``pred_align_nats``);
- ``kfac``: ½(1/ΣT)·Σ_l tr(ΔW_lᵀ S_l ΔW_l X̄_l), S_l = Σ_{n,t} δδᵀ, X̄_l = mean_t x xᵀ (per layer, tokens independent);
- ``block``: ½(1/ΣT)·Σ_n Σ_l ⟨G_{n,l}, ΔW_l⟩² (the exact empirical Fisher, block-diagonal by layer);
- ``cross``: ½(1/ΣT)·Σ_n (Σ_l ⟨G_{n,l}, ΔW_l⟩)² (the exact empirical Fisher across all layers);
- ``cross_A``: the same with G projected on the state's subspaces (what ``AGLConfig(curvature="cross")`` penalises;
  on the Fisher samples exactly the logged ``pred_cross_nats``);
- ``hess``: ½·d²L/dε² at 0 (central difference, h = 1/8: the exact curvature along ΔW, Hessian included);
- ``gauss_newton``: ½(1/ΣT)·Σ_tokens (Jv)ᵀ(diag p − p pᵀ)(Jv), Jv = d logits/dε (central difference, h = 1/8).

Per-sample inner products come from hooks, ⟨G_{n,l}, ΔW_l⟩ = s_l·Σ_t (δ_tᵀ B_l)(A_l x_t): no G is stored. Writes
``<dest>/decomposition.json`` (rows with provenance), ``decomposition.png`` and prints a table. Resumable: rows
already in the JSON (same run, step) are kept.

    python bench/curvature_decomposition.py --out runs/demo --dest docs/results/2026-12-05-curvature
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PREDICTORS = ("first_order", "diag_A", "diag_full", "kfac", "block", "cross", "cross_A", "hess", "gauss_newton")


class _LayerProbe:
    """Hook state of one layer: ΔW's factors, the state's U, V, and the running sums of the decomposition."""

    def __init__(self, L, R, s, U, V, fifo):
        self.L, self.R, self.s, self.fifo = L, R, s, fifo
        D = s * (L @ R)
        self.D2 = D * D
        DA = D if U is None or V is None else U @ (U.T @ D @ V) @ V.T
        self.DA2 = DA * DA
        self.UV = None if U is None or V is None else (U, V, U.T @ D @ V)
        self.D = D
        m, n = D.shape
        self.S = torch.zeros(m, m, dtype=torch.float64)
        self.X = torch.zeros(n, n, dtype=torch.float64)
        self.positions = 0
        self.u: List[torch.Tensor] = []  # per-sample ⟨G, ΔW⟩
        self.uA: List[torch.Tensor] = []  # per-sample ⟨UᵀGV, UᵀΔWV⟩
        self.diag = 0.0
        self.diagA = 0.0

    def add(self, delta, X):
        R_, K_ = (X, delta) if self.fifo else (delta, X)  # G_i = R_iᵀ K_i in the weight's orientation
        R_, K_ = R_.double(), K_.double()
        self.u.append(self.s * ((R_ @ self.L) * (K_ @ self.R.T)).sum(dim=(1, 2)))
        if self.UV is not None:
            U, V, M = self.UV
            self.uA.append(torch.einsum("btk,kj,btj->b", R_ @ U, M, K_ @ V))
        else:
            self.uA.append(self.u[-1])
        G = torch.bmm(R_.transpose(1, 2).float(), K_.float())  # float32: the costliest product here
        G2 = (G * G).double()
        self.diag += float((G2 * self.D2).sum())
        self.diagA += float((G2 * self.DA2).sum())
        live = R_.abs().sum(-1) > 0  # positions the loss reaches (δ ≠ 0)
        r, k = R_[live], K_[live]
        self.S += r.T @ r
        self.X += k.T @ k
        self.positions += int(live.sum())


def _factors(model, state):
    from agl.peft_binding import find_lora_layers

    out = {}
    for b in find_lora_layers(model):
        a = b.adapters[0]
        L, R = (a.A.t(), a.B.t()) if b.fan_in_fan_out else (a.B, a.A)
        ls = state.layers[b.name]
        out[b.name] = (L.detach().double(), R.detach().double(), float(a.scaling),
                       None if ls.U is None else ls.U.double(), None if ls.V is None else ls.V.double(), b)
    return out


def gradient_terms(model, state, batches) -> Dict[str, float]:
    """The hook-based predictors at the aligned start (adapter disabled) for the adapter's ΔW, over ``batches``."""
    from agl.per_sample import _labelled_tokens, hook_layer_gradients, hooked_passes
    from agl.peft_binding import resolve_targets

    fac = _factors(model, state)
    probes = {n: _LayerProbe(L, R, s, U, V, b.fan_in_fan_out) for n, (L, R, s, U, V, b) in fac.items()}
    targets = resolve_targets(model, list(probes))

    handles = hook_layer_gradients([(targets[n][0], p.add) for n, p in probes.items()])
    tokens = 0
    with model.disable_adapter():
        for ids, labels, _ in hooked_passes(model, batches, handles, None, max_samples=None, rank=0, world=1,
                                            pad_empty=False, device=torch.device("cpu"), fisher="empirical", seed=0):
            tokens += _labelled_tokens(labels)
    u = torch.stack([torch.cat(p.u) for p in probes.values()])  # (L, N)
    uA = torch.stack([torch.cat(p.uA) for p in probes.values()])
    kfac = sum(float(torch.trace(p.D.T @ p.S @ p.D @ (p.X / max(p.positions, 1)))) for p in probes.values())
    T = float(tokens)
    return {"tokens": tokens, "samples": int(u.shape[1]), "first_order": float(u.sum()) / T,
            "diag_full": 0.5 * sum(p.diag for p in probes.values()) / T,
            "diag_A": 0.5 * sum(p.diagA for p in probes.values()) / T, "kfac": 0.5 * kfac / T,
            "block": 0.5 * float((u * u).sum()) / T, "cross": 0.5 * float((u.sum(0) ** 2).sum()) / T,
            "cross_A": 0.5 * float((uA.sum(0) ** 2).sum()) / T,
            # how concentrated the cross sum is: the share of Σ_n z_n² carried by the top 5 samples
            "top5_share": float((u.sum(0) ** 2).sort(descending=True).values[:5].sum() / (u.sum(0) ** 2).sum())}


class _Scaled:
    """Context: every LoRA B scaled by ε (the update ε·ΔW), restored on exit."""

    def __init__(self, model, eps):
        from agl.peft_binding import find_lora_layers

        self.Bs = [a.B for b in find_lora_layers(model) for a in b.adapters]
        self.eps = eps

    def __enter__(self):
        self.saved = [B.detach().clone() for B in self.Bs]
        with torch.no_grad():
            for B in self.Bs:
                B.mul_(self.eps)

    def __exit__(self, *exc):
        with torch.no_grad():
            for B, s in zip(self.Bs, self.saved):
                B.copy_(s)
        return False


@torch.no_grad()
def along_ray(model, batches, final: bool) -> Dict[str, float]:
    """From logits at ε ∈ {0, ±h, 1} (h = 1/8; with ``final`` also 1/4, 1/2) on every batch: the measured rise
    L(1) − L(0), the ε-curve, ½·d²L/dε² = ½(L(h) − 2L(0) + L(−h))/h² and the Gauss–Newton form
    ½(1/ΣT)·Σ_tokens (Jv)ᵀ(diag p − p pᵀ)(Jv) with Jv = (z(h) − z(−h))/2h (one set of forwards for all)."""
    h = 0.125
    eps = (0.0, h, -h, 1.0) + ((0.25, 0.5) if final else ())
    nll = {e: 0.0 for e in eps}
    gn, tokens = 0.0, 0
    for b in batches:
        kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        pos = b["labels"][:, 1:] != -100
        tgt = b["labels"][:, 1:][pos]
        z = {}
        for e in eps:
            with _Scaled(model, e):
                z[e] = model(**kw).logits[:, :-1][pos].double()
            nll[e] += float(torch.nn.functional.cross_entropy(z[e], tgt, reduction="sum"))
            if e not in (0.0, h, -h):
                del z[e]
        Jv = (z[h] - z[-h]) / (2 * h)
        p = torch.softmax(z[0.0], -1)
        gn += float(((p * Jv * Jv).sum(-1) - (p * Jv).sum(-1) ** 2).sum())
        tokens += int(pos.sum())
    L = {e: v / tokens for e, v in nll.items()}
    return {"measured": L[1.0] - L[0.0], "L0": L[0.0],
            "eps_curve": {str(e): L[e] - L[0.0] for e in (0.125, 0.25, 0.5) if e in L},
            "hess": 0.5 * (L[h] - 2 * L[0.0] + L[-h]) / h ** 2, "gauss_newton": 0.5 * gn / tokens}


def checkpoints(run_dir: str) -> List[tuple]:
    ck = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(ck)) if os.path.isdir(ck) else []
    return [(s, os.path.join(ck, f"step-{s}")) for s in steps] or [(None, os.path.join(run_dir, "adapter"))]


def main(argv=None):
    import json

    from tqdm.auto import tqdm

    from agl._io import atomic_write_json, read_jsonl
    from agl._provenance import provenance
    from agl.experiment import demo_config
    from agl.experiment._common import chat_batches
    from agl.experiment.pipeline import Context
    from agl.experiment.plan import stage_plan
    from agl.state import AlignmentState

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the experiment's --out (its stages must be built)")
    ap.add_argument("--dest", required=True, help="folder for decomposition.json / .png")
    ap.add_argument("--runs", default="lora-s0,agl-s0,ewc-s0,agl_cross-s0", help="fine-tunes (<run>-s<seed>)")
    ap.add_argument("--steps", default="", help="checkpoint steps to use, e.g. 6,18,30 (default: all)")
    ap.add_argument("--tag", default="", help="prefix of the run names in the rows (to tell two --out apart)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides the run was made with (as for agl demo)")
    args = ap.parse_args(argv)
    prov = provenance()
    over = dict(kv.split("=", 1) for kv in args.set)
    cfg = demo_config(out=args.out, **{k: json.loads(v) if v[:1] in "[{0123456789-tf" else v for k, v in over.items()})
    ctx = Context(cfg, progress=False)
    ctx.stages = stage_plan(cfg)
    aligned, tok = ctx.aligned()
    astart = ctx.stages["aligned_start"].path
    state = AlignmentState.load(ctx.stages["alignment_state"].path)
    data = {"fisher": chat_batches(tok, read_jsonl(os.path.join(astart, "refusal_demos.jsonl"))[: cfg.fisher_samples],
                                   cfg.max_length, 8),
            "heldout": chat_batches(tok, read_jsonl(os.path.join(astart, "holdout.jsonl")), cfg.max_length, 8)}
    dest = Path(args.dest)
    path = dest / "decomposition.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["run"], r["step"]) for r in rows}
    want = {int(s) for s in args.steps.split(",") if s}
    jobs = []
    for run in args.runs.split(","):
        rdir = os.path.join(args.out, "finetune", run)
        if not os.path.isdir(rdir):
            print(f"skip {run}: {rdir} not built", file=sys.stderr)
            continue
        cks = checkpoints(rdir)
        last = cks[-1][0]  # the run's last checkpoint gets the whole ε-curve
        jobs += [(args.tag + run, s, p, s == last) for s, p in cks
                 if (not want or s in want) and (args.tag + run, s) not in done]
    from peft import PeftModel

    for run, step, p, final in tqdm(jobs, desc="checkpoints"):
        model = PeftModel.from_pretrained(copy.deepcopy(aligned), p)
        model.eval()
        row = {"run": run, "step": step, "provenance": prov}
        for name, batches in data.items():
            row[name] = {**along_ray(model, batches, final), **gradient_terms(model, state, batches)}
        rows = [r for r in rows if (r["run"], r["step"]) != (run, step)] + [row]
        atomic_write_json(path, rows)
        del model
    summarize(rows, dest)


def summarize(rows, dest: Path) -> None:
    """Prints the table (held-out measured / each predictor) and writes the plot."""
    import numpy as np

    from agl._io import atomic_write_json

    table = {}
    for split in ("heldout", "fisher"):
        for k in PREDICTORS:
            ratios = [r[split]["measured"] / r[split][k] for r in rows if r[split][k] > 0]
            ho = [r["heldout"]["measured"] / r[split][k] for r in rows if r[split][k] > 0]
            table[f"{split}:{k}"] = {"median_measured_over_pred_same_split": float(np.median(ratios)) if ratios else None,
                                     "median_heldout_measured_over_pred": float(np.median(ho)) if ho else None}
    atomic_write_json(dest / "summary.json", table)
    print(f"{'predictor':>22} | held-out measured / predictor (median over {len(rows)} checkpoints)")
    for k, v in table.items():
        print(f"{k:>22} | {v['median_heldout_measured_over_pred']}")
    _plot(rows, dest)


def _plot(rows, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl.experiment.analysis import save_png

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    keys = ("diag_A", "diag_full", "kfac", "block", "cross_A", "cross", "gauss_newton", "hess")
    for i, k in enumerate(keys):
        xs = [r["fisher"][k] for r in rows if r["fisher"][k] > 0 and r["heldout"]["measured"] > 0]
        ys = [r["heldout"]["measured"] for r in rows if r["fisher"][k] > 0 and r["heldout"]["measured"] > 0]
        ax.scatter(xs, ys, s=14, color=f"C{i}", label=k, alpha=0.8)
    lo = min([r["fisher"]["diag_A"] for r in rows if r["fisher"]["diag_A"] > 0] + [1e-6])
    ax.plot([lo, 1], [lo, 1], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted on the Fisher samples (nats/token)")
    ax.set_ylabel("measured ΔL_align, held-out demos")
    ax.set_title("every checkpoint of every run", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, r in enumerate(rows):
        if r["step"] != max(x["step"] or 0 for x in rows if x["run"] == r["run"]):
            continue
        e = sorted((float(k), v) for k, v in r["heldout"]["eps_curve"].items()) + [(1.0, r["heldout"]["measured"])]
        ax.plot([0] + [x for x, _ in e], [0] + [y for _, y in e], "o-", label=f"{r['run']} (step {r['step']})")
    ax.set_xlabel("ε (fraction of the final update)")
    ax.set_ylabel("held-out ΔL_align (nats/token)")
    ax.legend(fontsize=7)
    save_png(fig, dest / "decomposition.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
