"""Scale of the nats-unit terms on the real SmolLM2-135M-Instruct (the base model, NOT the aligned start): alignment
state from 12 calibration refusal demos, then 20 steps of plain LoRA (r16 q/k/v/o, AdamW lr 3e-4, batch 8) on the
arithmetic task, logging align_nats and the other terms in nats units against the measured change of the refusal NLL
(held-out demos and the state's own demos). Writes bench/results/units_probe_smollm2_base.json.

    python bench/units_probe.py [lr]          # ~10 min on a busy 2-core CPU, most of it the state

The base model is not at an optimum of the refusal loss, so its first-order term dominates and the measured change is
not what the quadratic form predicts; run it from the aligned start for that comparison (the experiment does).
"""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, provenance  # bench/_results.py: the one writer of result rows
from agl.models import load_causal_lm
from agl.experiment.config import ExperimentConfig
from agl.experiment.align_start import build_alignment_data
from agl.experiment.tasks import make_task_splits
from agl.experiment._common import chat_batches, lora_config, mean_nll
from agl.fisher import estimate_alignment_state
from agl.loss import AGLConfig, AGLLoss
from peft import get_peft_model
PROV = provenance()  # at the start: the load the run began under
torch.manual_seed(0)
t0 = time.time()
model, tok = load_causal_lm("smollm2-135m-instruct", dtype=torch.float32)
cfg = ExperimentConfig()
data = build_alignment_data(cfg)
model = get_peft_model(model, lora_config(16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"]))
fisher_b = chat_batches(tok, data["sft_unsafe"][:12], 192, 8)
state = estimate_alignment_state(model, fisher_b, progress=False)
print("state", state.fisher_scale, state.num_samples, state.num_tokens, state.nats_scale, f"{time.time()-t0:.0f}s", flush=True)
hold = chat_batches(tok, data["holdout"], 192, 16)
fis_nll = chat_batches(tok, data["sft_unsafe"][:12], 192, 16)
task = [{"prompt": r["prompt"], "response": r["answer"]} for r in make_task_splits(400, 10, 10, seed=7)["train"]]
L = AGLLoss(model, state, AGLConfig(lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(sys.argv[1]) if len(sys.argv) > 1 else 3e-4, weight_decay=0.0)
H0, F0 = mean_nll(model, hold, "cpu"), mean_nll(model, fis_nll, "cpu")
rows = []
model.train()
for step in range(1, 21):
    b = chat_batches(tok, task[(step - 1) * 8: step * 8], 192, 8)[0]
    out = model(**b)
    loss = L(out.loss); loss.backward(); opt.step(); opt.zero_grad()
    if step % 5 == 0:
        t = L.last_terms
        r = {"step": step, "task_loss": t["task_loss"], "align_nats": t["align_nats"], "task_rel": t["task"], "overlap_nats": t["overlap"],
             "geodesic_nats": t["geodesic"], "dL_holdout": mean_nll(model, hold, "cpu") - H0, "dL_fisher_data": mean_nll(model, fis_nll, "cpu") - F0}
        rows.append(r); print(json.dumps(r), f"{time.time()-t0:.0f}s", flush=True)
ewc = AGLLoss(model, state, AGLConfig.ewc())
ewc.regularizer(); print("whole-ΔW nats", ewc.last_terms["align_nats"])
append_rows(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "units_probe_smollm2_base.json"),
                  [{"bench": "units_probe", "model": "smollm2-135m-instruct (base)", "state": {"fisher_scale": state.fisher_scale, "num_samples": state.num_samples, "num_tokens": state.num_tokens,
                             "nats_scale": state.nats_scale},
                   "rows": rows, "whole_dW_nats": ewc.last_terms["align_nats"]}], PROV, key=("bench", "model"))
