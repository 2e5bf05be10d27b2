"""Quick start: keep a model's refusals while LoRA-fine-tuning it, offline on a CPU.

Run from the repository root: ``python examples/quickstart.py`` (a few minutes on 2 CPU cores). The README's
"Quick start in Python" is this file's code, statement for statement (tests/test_quickstart.py checks it and runs
this file with small sizes).
"""
import itertools
import os
import random

import torch
from peft import LoraConfig, get_peft_model

import agl
from agl import driftcaps
from agl.data import build_chat_batches, load_jsonl
from agl.models import load_causal_lm

spec = os.environ.get("QUICKSTART_MODEL", "smollm2-135m-instruct")  # or "aligned": see step 1
steps = int(os.environ.get("QUICKSTART_STEPS", "60"))  # LoRA steps (the test runs fewer)
n_eval = int(os.environ.get("QUICKSTART_N_EVAL", "24"))  # DriftCaps prompts per label (unsafe, safe)

# 1. The model, offline: SmolLM2-135M-Instruct, which refuses little. `agl align-start --out aligned` saves the
#    experiment's aligned start (the same model after safety SFT); QUICKSTART_MODEL=aligned protects that one.
model, tok = load_causal_lm(spec)

# 2. Its refusals before fine-tuning, on a seeded sample of the DriftCaps eval prompts (all categories).
pool = driftcaps.load_prompts(split="eval")
prompts = [p for label in ("unsafe", "safe")
           for p in random.Random(0).sample([q for q in pool if q.label == label], n_eval)]
before = driftcaps.evaluate(model, tok, prompts, max_new_tokens=32)

# 3. Where alignment lives: the Fisher of refusal demonstrations (JSONL: one {"prompt", "response"} per line).
peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.0))
demos = build_chat_batches(tok, load_jsonl("examples/data/refusals.jsonl"), max_length=128, batch_size=4)
state = agl.estimate_alignment_state(peft_model, demos)
state.save("quickstart_state")  # agl.AlignmentState.load("quickstart_state") reads it back

# 4. LoRA fine-tune on a benign task (same JSONL schema) with the AGL regulariser (README: "Choosing λ or a budget").
agl_loss = agl.AGLLoss(peft_model, state, agl.AGLConfig())
task = build_chat_batches(tok, load_jsonl("examples/data/task.jsonl"), max_length=64, batch_size=8)
opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-4)
peft_model.train()
for step, batch in zip(range(steps), itertools.cycle(task)):
    loss = agl_loss(peft_model(**batch).loss)  # task loss + λ_A · predicted alignment-loss rise + ...
    loss.backward()
    opt.step()
    opt.zero_grad()
peft_model.eval()
print({k: agl_loss.last_terms[k] for k in ("task_loss", "align_nats", "lambda_align")})

# 5. Drift: the same prompts after fine-tuning, paired with the run before.
after = driftcaps.evaluate(peft_model, tok, prompts, max_new_tokens=32)
cmp = driftcaps.compare(before, after)
print(f"RR_unsafe {before.rr_unsafe:.1%} -> {after.rr_unsafe:.1%}, drift {cmp.drift['value']:+.3f} "
      f"(95% CI {cmp.drift['ci'][0]:+.3f}, {cmp.drift['ci'][1]:+.3f}); "
      f"over-refusal {before.over_refusal:.1%} -> {after.over_refusal:.1%}")
