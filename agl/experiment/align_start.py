"""Stage 1: the aligned start.

The offline default model complies with harmful requests, so the experiment first gives it safety alignment: LoRA
SFT on DriftCaps ``calibration`` prompts (unsafe prompts -> refusal texts written by the project, with varied
wording; safe and borderline prompts -> the model's own original greedy answers, i.e. self-distillation, to keep
its helpfulness), then the adapter is merged into the weights. A slice of the calibration unsafe prompts is held
out of the SFT: with refusal texts they are the held-out refusal demonstrations on which the fine-tunes log the
alignment loss.
"""
from __future__ import annotations

import copy
import json
import os
import random
from importlib import resources
from typing import Dict, List, Optional

import torch

from agl._io import read_jsonl, write_jsonl
from agl.experiment._common import chat_batches, generate, lora_config, set_seed, to_device

__all__ = ["load_refusals", "build_alignment_data", "train_aligned_start", "load_aligned_model"]


def load_refusals(source: str = "builtin") -> List[dict]:
    """Refusal texts: ``agl/experiment/data/refusals.jsonl`` (``{"id", "text", "style"[, "category"]}`` per line,
    ``category`` a DriftCaps harm category or ``any``) or a path in that format."""
    if source == "builtin":
        path = str(resources.files("agl.experiment") / "data" / "refusals.jsonl")
    else:
        path = source
    if not os.path.exists(path):
        raise FileNotFoundError(f"refusal texts not found: {path}")
    recs = [dict(r, text=r["text"].strip()) for r in read_jsonl(path) if str(r.get("text", "")).strip()]
    if len([r for r in recs if r.get("category", "any") == "any"]) < 2:
        raise ValueError(f"{path}: need at least 2 refusal texts for category 'any'")
    return recs


def _prompt_dicts(prompts) -> List[dict]:
    return [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in prompts]


def build_alignment_data(cfg) -> Dict[str, List[dict]]:
    """Deterministic selection (by ``cfg.align_seed``) of the calibration prompts: ``sft_unsafe``, ``holdout``
    (unsafe, kept out of the SFT) and ``sft_safe``; each unsafe record gets a refusal text as ``response``."""
    from agl.driftcaps import load_prompts

    cal = _prompt_dicts(load_prompts(cfg.prompts, split="calibration"))
    refusals = load_refusals(cfg.refusals)
    rng = random.Random(cfg.align_seed)
    unsafe = sorted([p for p in cal if p["label"] == "unsafe"], key=lambda p: p["id"])
    safe = sorted([p for p in cal if p["label"] == "safe"], key=lambda p: p["id"])
    rng.shuffle(unsafe)
    rng.shuffle(safe)
    n_hold = min(cfg.align_holdout, max(len(unsafe) // 4, 1))
    holdout, rest = unsafe[:n_hold], unsafe[n_hold:]
    sft_unsafe = rest[: cfg.align_n_unsafe]
    sft_safe = safe[: cfg.align_n_safe]

    generic = [r["text"] for r in refusals if r.get("category", "any") == "any"]

    def with_refusal(p):  # a category-specific refusal when one exists (half the time), else a generic one
        own = [r["text"] for r in refusals if r.get("category") == p["category"]]
        text = rng.choice(own) if own and rng.random() < 0.5 else rng.choice(generic)
        return {"id": p["id"], "prompt": p["prompt"], "category": p["category"], "response": text}

    return {
        "sft_unsafe": [with_refusal(p) for p in sft_unsafe],
        "holdout": [with_refusal(p) for p in holdout],
        "sft_safe": [{"id": p["id"], "prompt": p["prompt"], "category": p["category"], "kind": p.get("kind")}
                     for p in sft_safe],
    }


def _trim(text: str, finished: bool) -> str:
    """A truncated self-distilled answer is cut back to its last complete sentence (so the SFT does not teach the
    model to stop mid-sentence)."""
    if finished:
        return text
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return text[: cut + 1].strip() if cut >= 20 else text


def train_aligned_start(cfg, model, tokenizer, out_dir: str, work_dir: str, *, progress: bool = True) -> dict:
    """Builds the aligned start's artefact in ``out_dir``: ``adapter/`` (peft), ``sft_data.jsonl``,
    ``holdout.jsonl``, ``refusal_demos.jsonl``, ``info.json``. ``model`` is the base model (left unchanged).
    Self-distilled answers are cached in ``work_dir`` (resumable)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    device = cfg.device
    data = build_alignment_data(cfg)
    os.makedirs(work_dir, exist_ok=True)
    # 1. self-distillation: the base model's own greedy answers to the safe prompts
    gens = generate(model, tokenizer, [r["prompt"] for r in data["sft_safe"]], max_new_tokens=cfg.distill_max_new_tokens,
                    batch_size=cfg.eval_batch, device=device, progress=progress, desc="self-distil",
                    cache=os.path.join(work_dir, "distill.jsonl"))
    safe_recs = []
    for r, g in zip(data["sft_safe"], gens):
        resp = _trim(g["response"], g["finished"])
        if resp:
            safe_recs.append({**r, "response": resp})
    sft = [dict(r, label="unsafe") for r in data["sft_unsafe"]] + [dict(r, label="safe") for r in safe_recs]
    # 2. LoRA SFT
    set_seed(cfg.align_seed)
    targets = "all-linear" if cfg.align_targets == "all-linear" else [t.strip() for t in cfg.align_targets.split(",")]
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(cfg.align_rank, 2 * cfg.align_rank, targets))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.align_lr,
                            weight_decay=0.0)
    rng = random.Random(cfg.align_seed)
    order: List[int] = []
    losses = []
    bar = tqdm(range(cfg.align_steps), desc="align SFT", disable=not progress, leave=False, unit="step")
    for step in bar:
        if len(order) < cfg.align_batch:
            perm = list(range(len(sft)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.align_batch], order[cfg.align_batch:]
        batch = chat_batches(tokenizer, [sft[i] for i in idx], cfg.max_length, cfg.align_batch)[0]
        batch = to_device(batch, device)
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    peft_model.save_pretrained(os.path.join(out_dir, "adapter"))
    write_jsonl(os.path.join(out_dir, "sft_data.jsonl"), sft)
    write_jsonl(os.path.join(out_dir, "holdout.jsonl"), data["holdout"])
    write_jsonl(os.path.join(out_dir, "refusal_demos.jsonl"), data["sft_unsafe"])
    info = {"n_sft_unsafe": len(data["sft_unsafe"]), "n_sft_safe": len(safe_recs), "n_holdout": len(data["holdout"]),
            "steps": cfg.align_steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "losses": losses}
    with open(os.path.join(out_dir, "info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    del peft_model
    return info


def load_aligned_model(base_model, artefact_dir: str, device) -> torch.nn.Module:
    """A copy of ``base_model`` with the aligned start's adapter merged in (a plain model, no peft wrappers)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), os.path.join(artefact_dir, "adapter"))
    model = model.merge_and_unload()
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
