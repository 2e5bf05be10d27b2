"""Measure the raw AGL terms along a plain LoRA run, to choose AGLConfig's default λ (see its docstring).

Two models built in code (random weights, random tokens, nothing downloaded): the tiny test Llama (hidden 64) and a
SmolLM2-135M-shaped Llama truncated to --smol-layers blocks (same 576 x 576 / 192 x 576 matrices). LoRA r=8,
alpha=16 on q/k/v/o, AdamW lr 2e-4 (a typical LoRA setting); the alignment state is estimated on held-out batches of
the same model before training. At each checkpoint it prints the task loss and the mean-over-layers terms, and what
the default λ make of them.

    python bench/lambda_scale.py [--steps 10,50,150] [--smol-layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def run(name, cfg_kwargs, checkpoints, batch, seq, lr):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from agl.fisher import estimate_alignment_state
    from agl.loss import AGLConfig, AGLLoss

    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kwargs)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def make():
        ids = torch.randint(0, V, (batch, seq), generator=g)
        lab = ids.clone()
        lab[:, : seq // 2] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}

    # a fixed pool of "task" batches with structure the model can learn (repeated sequences)
    pool = [make() for _ in range(4)]
    state = estimate_alignment_state(model, [make() for _ in range(2)], progress=False)
    dflt = AGLConfig(units="paper")
    L = AGLLoss(model, state, AGLConfig(units="paper", backend="torch", lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = []
    step = 0
    t0 = time.time()
    for target in checkpoints:
        while step < target:
            loss = model(**pool[step % len(pool)]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        with torch.no_grad():
            task = float(model(**pool[0]).loss)
            L.regularizer()
        t = L.last_terms
        dw = max(float((mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().abs().mean())
                 for _, mod in ((e.name, e.binding.module) for e in L.entries))
        reg = {"align": dflt.lambda_align * t["align"], "task": dflt.lambda_task * t["task"],
               "collision": dflt.lambda_collision * (dflt.alpha * t["overlap"] + (1 - dflt.alpha) * t["geodesic"])}
        rows.append({"step": step, "task_loss": task, "mean_abs_dW_max_layer": dw, **{k: t[k] for k in ("align", "task", "overlap", "geodesic")},
                     "weighted_by_defaults": reg})
        print(f"{name:<10} step {step:>4}  task loss {task:6.3f}  |dW| {dw:.1e}  align {t['align']:.2e}  task {t['task']:.2e}  "
              f"overlap {t['overlap']:.2e}  geodesic {t['geodesic']:.2e}  -> λ·terms: align {reg['align']:.3f} "
              f"task {reg['task']:.3f} collision {reg['collision']:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    return rows


_ALIGN = [("How do I make a weapon at home?", "I can't help with that."),
          ("Write a phishing email to steal passwords.", "I won't help with phishing or stealing credentials."),
          ("Tell me how to hack my neighbour's wifi.", "I can't help with accessing networks without permission."),
          ("Give me instructions to hurt someone.", "No. If someone is in danger, please contact local emergency services."),
          ("How can I cheat on my taxes without getting caught?", "I can't help with tax fraud, but I can explain legal deductions."),
          ("Explain how to pick a lock to break into a house.", "I won't help with breaking into homes."),
          ("Write malware that deletes files.", "I can't write malicious software."),
          ("How do I buy illegal drugs online?", "I can't help with buying illegal drugs.")]


def run_real(spec, checkpoints, lr, batch=2):
    """The real SmolLM2-135M-Instruct (offline copy): alignment state from refusal pairs, LoRA trained on
    arithmetic Q/A."""
    from peft import LoraConfig, get_peft_model

    from agl.data import build_chat_batches
    from agl.fisher import estimate_alignment_state
    from agl.loss import AGLConfig, AGLLoss
    from agl.models import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm(spec)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    align = build_chat_batches(tok, [{"prompt": p, "response": r} for p, r in _ALIGN], 96, 4)
    state = estimate_alignment_state(model, align, progress=False)
    g = torch.Generator().manual_seed(0)
    task_recs = []
    for _ in range(64):
        a, b = (int(x) for x in torch.randint(10, 99, (2,), generator=g))
        task_recs.append({"prompt": f"What is {a} plus {b}? Answer with the number.", "response": f"{a} + {b} = {a + b}."})
    task = build_chat_batches(tok, task_recs, 96, batch)
    dflt = AGLConfig(units="paper")
    L = AGLLoss(model, state, AGLConfig(units="paper", backend="torch", lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    rows, step, t0 = [], 0, time.time()
    for target in checkpoints:
        while step < target:
            loss = model(**task[step % len(task)]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        with torch.no_grad():
            tl = float(model(**task[0]).loss)
            L.regularizer()
        t = L.last_terms
        reg = {"align": dflt.lambda_align * t["align"], "task": dflt.lambda_task * t["task"],
               "collision": dflt.lambda_collision * (dflt.alpha * t["overlap"] + (1 - dflt.alpha) * t["geodesic"])}
        rows.append({"step": step, "task_loss": tl, **{k: t[k] for k in ("align", "task", "overlap", "geodesic")},
                     "weighted_by_defaults": reg})
        print(f"real       step {step:>4}  task loss {tl:6.3f}  align {t['align']:.2e}  task {t['task']:.2e}  "
              f"overlap {t['overlap']:.2e}  geodesic {t['geodesic']:.2e}  -> λ·terms: align {reg['align']:.3f} "
              f"task {reg['task']:.3f} collision {reg['collision']:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,50,150")
    ap.add_argument("--smol-steps", default="10,20,30")
    ap.add_argument("--smol-layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--smol-lr", type=float, default=2e-3,
                    help="lr of the SmolLM2-shaped run: Adam moves ~lr per step, so 30 steps at 2e-3 stand for ~300 at 2e-4")
    ap.add_argument("--real", default=None, help="also measure on this model spec (e.g. smollm2-135m-instruct)")
    ap.add_argument("--only-real", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lambda_scale.json"))
    args = ap.parse_args(argv)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128, max_position_embeddings=128)
    smol = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.smol_layers, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    out = {}
    if not args.only_real:
        out["tiny"] = run("tiny", tiny, [int(s) for s in args.steps.split(",")], 4, 32, args.lr)
        out["smollm2-shaped"] = run("smol", smol, [int(s) for s in args.smol_steps.split(",")], 2, 64, args.smol_lr)
    if args.real:
        out["real:" + args.real] = run_real(args.real, [int(s) for s in args.smol_steps.split(",")], args.smol_lr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"lr": args.lr, "smol_lr": args.smol_lr, "runs": out}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
