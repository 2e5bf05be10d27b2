"""The LoRA fine-tune loop shared by every method (same seeds, data order, steps and learning rate).

Methods (see ``agl.experiment.config.method_settings``):

- ``lora``: plain LoRA, task loss only.
- ``agl`` and its ablations: task loss + ``agl.AGLLoss`` with the method's λ_A, λ_T, λ_NC, α.
- ``ewc``: task loss + λ · mean_layers mean(F ⊙ ΔW²): the Fisher penalty on the whole update, no subspace, no
  collision terms. Computed with the fused op as ``agl_terms(B, A, B, A, fisher=F).align`` (B_align = B and
  A_align = A make D_A = ΔW), so ΔW is never materialised with the kernel backend.

Every ``log_every`` steps (and before the first) the loop measures the alignment loss: the mean per-token NLL of
held-out refusal demonstrations, with the number of training tokens seen so far (non-pad tokens of the fine-tune
batches). ``ΔL_align(D) = L(D) - L(0)`` is what the forgetting law is fitted to.
"""
from __future__ import annotations

import copy
import random
import time
from typing import Dict, List, Optional, Sequence

import torch

from agl.experiment._common import chat_batches, lora_config, mean_nll, to_device

__all__ = ["EWCPenalty", "finetune", "make_regulariser"]


class EWCPenalty:
    """``λ · mean_layers mean(F ⊙ ΔW²)`` over the model's LoRA layers (F from the alignment state)."""

    def __init__(self, model, state, lam: float, backend: str = "auto"):
        from agl.peft_binding import find_lora_layers

        self.lam = float(lam)
        self.backend = backend
        self.entries = []
        state.check(model)
        for b in find_lora_layers(model):
            for a in b.adapters:
                self.entries.append((b, a, state.layers[b.name].fisher))
        self._fisher_cache: Dict[str, torch.Tensor] = {}
        self.last_terms: Dict[str, float] = {}

    def __call__(self, task_loss: torch.Tensor) -> torch.Tensor:
        from agl.functional import agl_terms
        from agl.loss import resolve_backend

        total = None
        for b, a, F in self.entries:
            A, B = a.A, a.B
            L, R = (A.t(), B.t()) if b.fan_in_fan_out else (B, A)
            key = b.name
            Fd = self._fisher_cache.get(key)
            if Fd is None or Fd.device != L.device or Fd.dtype != L.dtype:
                Fd = F.to(device=L.device, dtype=L.dtype)
                self._fisher_cache[key] = Fd
            backend = resolve_backend(self.backend, L.device)
            t = agl_terms(L, R, L, R, fisher=Fd, scale=a.scaling, backend=backend).align.float()
            total = t if total is None else total + t
        mean = total / len(self.entries)
        reg = self.lam * mean
        self.last_terms = {"ewc": float(mean.detach()), "regularizer": float(reg.detach()),
                           "task_loss": float(task_loss.detach())}
        return task_loss + reg.to(task_loss.dtype)


def make_regulariser(model, state, settings: dict, backend: str = "auto"):
    """None for plain LoRA, else a callable ``task_loss -> total`` with ``last_terms``."""
    kind = settings["kind"]
    if kind == "lora":
        return None
    if state is None:
        raise ValueError(f"method kind {kind!r} needs an alignment state")
    if kind == "ewc":
        return EWCPenalty(model, state, settings["lambda_ewc"], backend=backend)
    from agl.loss import AGLConfig, AGLLoss

    cfg = AGLConfig(lambda_align=settings["lambda_align"], lambda_task=settings["lambda_task"],
                    lambda_collision=settings["lambda_collision"], alpha=settings["alpha"], beta=settings["beta"],
                    tau=settings["tau"], sharpness=settings["sharpness"], backend=backend,
                    units="paper")  # the experiment's λ are in the paper's raw units (means, Fisher of mean 1)
    return AGLLoss(model, state, cfg)


def finetune(
    aligned_model,
    tokenizer,
    train_records: Sequence[dict],
    holdout_records: Sequence[dict],
    *,
    settings: dict,
    state=None,
    seed: int,
    steps: int,
    lr: float,
    rank: int,
    lora_alpha: int,
    batch: int,
    targets: Sequence[str],
    log_every: int,
    max_length: int,
    device,
    backend: str = "auto",
    progress: bool = True,
    desc: str = "fine-tune",
):
    """Fine-tunes a LoRA adapter on ``train_records`` (``{"prompt", "response"}``) on a copy of ``aligned_model``.
    Returns ``(peft_model, log)``; ``log`` has ``curve`` (step, tokens, align_loss, delta_align_loss), per-step
    ``task_loss`` and the regulariser's terms at each logged step."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(aligned_model), lora_config(rank, lora_alpha, list(targets)))
    model.to(device)
    reg = make_regulariser(model, state, settings, backend=backend)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    hold = chat_batches(tokenizer, list(holdout_records), max_length, 16)
    order: List[int] = []
    tokens = 0
    L0 = mean_nll(model, hold, device)
    curve = [{"step": 0, "tokens": 0, "align_loss": L0, "delta_align_loss": 0.0}]
    task_losses: List[float] = []
    terms_log: List[dict] = []
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        if len(order) < batch:
            perm = list(range(len(train_records)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        b = to_device(chat_batches(tokenizer, [train_records[i] for i in idx], max_length, batch)[0], device)
        tokens += int(b["attention_mask"].sum())
        out = model(**b)
        task = out.loss
        loss = reg(task) if reg is not None else task
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task_losses.append(float(task.detach()))
        if step % log_every == 0 or step == steps:
            L = mean_nll(model, hold, device)
            curve.append({"step": step, "tokens": tokens, "align_loss": L, "delta_align_loss": L - L0})
            if reg is not None:
                terms_log.append({"step": step, **{k: v for k, v in reg.last_terms.items() if k != "layers"}})
            bar.set_postfix(task=f"{task_losses[-1]:.3f}", dL=f"{L - L0:+.3f}")
    bar.close()
    model.eval()
    log = {"settings": settings, "seed": seed, "steps": steps, "tokens": tokens, "curve": curve,
           "task_loss": task_losses, "terms": terms_log, "seconds": round(time.time() - t0, 2)}
    return model, log
