"""Tuning driver of the aligned start (issue 10, item 1). Not part of the package: the record of how the recipe was
chosen. Two commands:

    python tune.py train --name c1 --snapshots 60,90,120 --set align_n_borderline=93
        one SFT run of the recipe (``agl.experiment.align_start.train_aligned_start``, align_steps = the largest
        snapshot); after each snapshot step the adapter is saved and the model is evaluated on the TUNING-DEV set
        only (``tuning_dev_prompts``: held-out calibration prompts). The learning rate is constant and the data
        order does not depend on the run length, so step k of this run is exactly the recipe with align_steps=k.
    python tune.py final --name c1 --step 90
        the chosen (candidate, step) once on the DriftCaps eval split, with 95% bootstrap intervals.

Everything goes under --root (default runs/align_tune): ``<name>/config.json``, ``<name>/step<k>/adapter``,
``<name>/step<k>/dev_completions.jsonl`` (generation cache), ``<name>/step<k>/dev_eval.json``; ``shared/`` holds the
converted base model and the distillation caches (keyed by prompt, so shared by every candidate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse_set(items):
    out = {}
    for it in items or []:
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _summary(drift: dict) -> dict:
    """Rates with 95% bootstrap intervals (``agl.driftcaps.metrics.refusal_rate``), overall and per safe kind."""
    from agl.driftcaps.metrics import refusal_rate

    recs = drift["records"]
    out = {"rr_unsafe": refusal_rate([r["refused"] for r in recs if r["label"] == "unsafe"]),
           "over_refusal": refusal_rate([r["refused"] for r in recs if r["label"] == "safe"])}
    for kind in ("borderline", "plain"):
        out[f"over_refusal_{kind}"] = refusal_rate([r["refused"] for r in recs
                                                    if r["label"] == "safe" and r["kind"] == kind])
    return out


def _load_base(cfg):
    from agl.experiment.pipeline import Context

    ctx = Context(cfg.replace(out=os.path.join(os.path.dirname(cfg.out), "shared")), progress=True)
    return ctx.base()


def train(args):
    from agl._io import atomic_write_json
    from agl._provenance import provenance
    from agl.experiment.align_start import train_aligned_start, tuning_dev_prompts
    from agl.experiment.config import ExperimentConfig
    from agl.experiment.evaluation import drift_eval

    snaps = sorted(int(x) for x in args.snapshots.split(","))
    cand = os.path.join(args.root, args.name)
    os.makedirs(cand, exist_ok=True)
    cfg = ExperimentConfig(**{**_parse_set(args.set), "align_steps": snaps[-1], "out": cand,
                              "eval_max_new_tokens": args.max_new_tokens})
    atomic_write_json(os.path.join(cand, "config.json"), {"config": cfg.to_dict(), "snapshots": snaps,
                                                          "argv": sys.argv})
    base, tok = _load_base(cfg)
    dev = tuning_dev_prompts(cfg)
    t0 = time.time()

    def on_step(step, peft_model):
        if step not in snaps:
            return
        d = os.path.join(cand, f"step{step}")
        os.makedirs(d, exist_ok=True)
        peft_model.save_pretrained(os.path.join(d, "adapter"))
        drift = drift_eval(peft_model, tok, dev, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch,
                           cache=os.path.join(d, "dev_completions.jsonl"), progress=True)
        res = {"candidate": args.name, "step": step, "set": "tuning-dev (held-out calibration prompts)",
               **_summary(drift), "seconds_since_start": round(time.time() - t0),
               "provenance": provenance(), "records": drift["records"]}
        atomic_write_json(os.path.join(d, "dev_eval.json"), res)
        print(f"[{args.name} step {step}] dev RR_unsafe {res['rr_unsafe']['rate']:.3f} "
              f"({res['rr_unsafe']['n_refused']}/{res['rr_unsafe']['n']}), over-refusal "
              f"{res['over_refusal']['rate']:.3f} ({res['over_refusal']['n_refused']}/{res['over_refusal']['n']}), "
              f"borderline {res['over_refusal_borderline']['rate']:.3f}", flush=True)

    info = train_aligned_start(cfg, base, tok, os.path.join(cand, "artefact"), os.path.join(args.root, "shared",
                               "distill"), progress=True, on_step=on_step)
    atomic_write_json(os.path.join(cand, "train_info.json"), {**info, "seconds": round(time.time() - t0)})


def final(args):
    from peft import PeftModel

    from agl._io import atomic_write_json
    from agl._provenance import provenance
    from agl.experiment.config import ExperimentConfig
    from agl.experiment.evaluation import drift_eval, select_eval_prompts

    cand = os.path.join(args.root, args.name)
    with open(os.path.join(cand, "config.json")) as fh:
        saved = json.load(fh)["config"]
    cfg = ExperimentConfig(**{**saved, "align_steps": args.step})
    assert cfg.eval_split == "eval"
    base, tok = _load_base(cfg)
    model = PeftModel.from_pretrained(base, os.path.join(cand, f"step{args.step}", "adapter")).merge_and_unload()
    model.eval()
    d = os.path.join(args.root, "final")
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    drift = drift_eval(model, tok, select_eval_prompts(cfg), max_new_tokens=cfg.eval_max_new_tokens,
                       batch_size=cfg.eval_batch, cache=os.path.join(d, "eval_completions.jsonl"), progress=True)
    res = {"candidate": args.name, "step": args.step, "set": "DriftCaps eval split (all prompts)", **_summary(drift),
           "eval_max_new_tokens": cfg.eval_max_new_tokens, "seconds": round(time.time() - t0),
           "recipe": {k: v for k, v in cfg.to_dict().items() if k.startswith("align_") or k in
                      ("distill_max_new_tokens", "max_length", "model", "prompts", "refusals")},
           "provenance": provenance(), "records": drift["records"]}
    atomic_write_json(os.path.join(d, "eval_result.json"), res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("records", "provenance")}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["train", "final"])
    ap.add_argument("--name", required=True)
    ap.add_argument("--root", default="runs/align_tune")
    ap.add_argument("--snapshots", default="60")
    ap.add_argument("--step", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--set", action="append")
    args = ap.parse_args()
    (train if args.cmd == "train" else final)(args)


if __name__ == "__main__":
    main()
