"""The LoRA fine-tune loop shared by every method (same seeds, data order, steps and learning rate).

Methods (see ``agl.experiment.config.method_settings``):

- ``lora``: plain LoRA, task loss only.
- ``agl``, its ablations and ``ewc``: task loss + ``agl.AGLLoss`` with the method's ``AGLConfig`` (EWC is
  ``AGLConfig.ewc``: the Fisher penalty on the whole update, every other term off; the fused op computes it as the
  align term with B_align = B and A_align = A, so ΔW is never materialised with the kernel backend).
- ``lora_lr``: plain LoRA at another learning rate; ``l2``: ``AGLConfig.l2``, the isotropic proximal penalty.
- ``mix``: plain LoRA with a fraction of the training examples replaced by refusal demonstrations
  (:func:`example_schedule`: safety-data mixing).
- ``safe_lora`` is not trained: it projects the LoRA fine-tune afterwards (``agl.experiment.safe_lora``).

Every ``log_every`` steps (and before the first) the loop measures the alignment loss: the mean per-token NLL of
held-out refusal demonstrations, with the number of training tokens seen so far (non-pad tokens of the fine-tune
batches). ``ΔL_align(D) = L(D) - L(0)`` is what the forgetting law is fitted to; at the same points it logs the
predicted rise (:class:`AlignmentProbe`), for every method.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Sequence

import torch

from agl.experiment._common import chat_batches, lora_config, mean_nll, to_device
from agl.mixing import example_schedule  # the one placement rule of safety-data mixing (agl.mixing)

__all__ = ["AlignmentProbe", "example_schedule", "finetune", "make_regulariser", "unit_weights"]


class AlignmentProbe:
    """The predicted rise of the alignment loss of any LoRA model, by the formula ``AGLLoss`` logs as
    ``align_nats``: ½·c·Σ_l Σ_ij F̃ (ΔW)², c = ``state.nats_scale`` (so F = c·F̃ is the un-normalised Fisher of the
    token-averaged alignment loss, and the value is in nats per token). Two probes: ``pred_align_nats`` on the
    alignment part ΔW_A = U Uᵀ ΔW V Vᵀ (what AGL penalises), ``pred_full_nats`` on the whole ΔW (what EWC
    penalises; the plain second-order prediction) and, when the state has the projected per-sample gradients,
    ``pred_cross_nats``: ½·(1/ΣT)·Σ_n z_n², the empirical Fisher's quadratic form on ΔW_A across layers
    (``agl.curvature``). Probes never train: all weights 0, no budget."""

    def __init__(self, model, state, backend: str = "auto"):
        from agl.loss import AGLConfig, AGLLoss

        off = dict(lambda_align=0.0, lambda_task=0.0, lambda_collision=0.0, units="nats", backend=backend)
        self.losses = {"pred_align_nats": AGLLoss(model, state, AGLConfig(**off)),
                       "pred_full_nats": AGLLoss(model, state, AGLConfig(**off, subspaces=False))}
        if state.has_cross:  # the cross-layer empirical Fisher on the subspaces (agl.curvature)
            self.losses["pred_cross_nats"] = AGLLoss(model, state, AGLConfig(**off, curvature="cross"))

    @torch.no_grad()
    def __call__(self) -> Dict[str, float]:
        out = {}
        for key, loss in self.losses.items():
            loss.regularizer()
            out[key] = float(loss.last_terms["align_nats"])
        return out


def make_regulariser(model, state, settings):
    """None for no regulariser (``settings`` None: LoRA), else ``AGLLoss(model, state, settings)``: AGL, its
    ablations and EWC (``AGLConfig.ewc``) are all configs of the one loss."""
    if settings is None:
        return None
    from agl.loss import AGLLoss

    if state is None:
        raise ValueError("a regularised fine-tune needs an alignment state")
    return AGLLoss(model, state, settings)


def unit_weights(settings):
    """``settings`` with λ_A = λ_T = λ_NC = 1 and no budget: every term at its natural scale (α still splits the
    collision weight between overlap and geodesic), what ``grad_shares_unit`` of a LoRA run measures."""
    import dataclasses

    return dataclasses.replace(settings, lambda_align=1.0, lambda_task=1.0, lambda_collision=1.0, align_budget=None)


def finetune(
    aligned_model,
    tokenizer,
    train_records: Sequence[dict],
    holdout_records: Sequence[dict],
    *,
    settings,
    state,
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
    progress: bool = True,
    desc: str = "fine-tune",
    unit_probe=None,
    on_log=None,
    mix_records: Sequence[dict] = (),
    mix_fraction: float = 0.0,
):
    """Fine-tunes a LoRA adapter on ``train_records`` (``{"prompt", "response"}``) on a copy of ``aligned_model``
    with the regulariser ``settings`` (an AGLConfig, or None for plain LoRA). Returns ``(peft_model, log)``; ``log``
    has ``curve`` (per logged step: step, tokens, align_loss, delta_align_loss = the measured rise, and the
    predicted rises ``pred_align_nats`` / ``pred_full_nats`` of :class:`AlignmentProbe`), per-step ``task_loss``
    and the regulariser's ``last_terms`` at each logged step (with ``align_nats`` and ``lambda_align``).

    At the end, ``grad_shares``: the regulariser's ``AGLLoss.gradient_shares()`` on the final adapter (how hard
    each weighted term pulls); without a regulariser and with ``unit_probe`` (an AGLConfig), ``grad_shares_unit``:
    the same for ``unit_weights(unit_probe)`` (the terms' natural scale at LoRA's adapter) and its settings.
    ``on_log(step, model)``: called at every logged step after the first (the pipeline saves the adapter there:
    ``checkpoints/step-<k>/``, what ``bench/curvature_decomposition.py`` reads). ``mix_records`` (``{"prompt",
    "response"}`` refusal demonstrations) fill a ``mix_fraction`` of the training slots (:func:`example_schedule`);
    the log then has ``mix`` (fraction, slots, distinct demonstrations)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(aligned_model), lora_config(rank, lora_alpha, list(targets)))
    model.to(device)
    reg = make_regulariser(model, state, settings)
    probe = AlignmentProbe(model, state, backend=settings.backend if settings is not None else "auto")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = example_schedule(len(train_records), steps, batch, seed, len(mix_records), mix_fraction)
    pools = {"task": train_records, "mix": mix_records}
    hold = chat_batches(tokenizer, list(holdout_records), max_length, 16)
    tokens = 0
    L0 = mean_nll(model, hold, device)
    curve = [{"step": 0, "tokens": 0, "align_loss": L0, "delta_align_loss": 0.0, **probe()}]
    task_losses: List[float] = []
    terms_log: List[dict] = []
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        recs = [pools[src][i] for src, i in schedule[step - 1]]
        b = to_device(chat_batches(tokenizer, recs, max_length, batch)[0], device)
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
            curve.append({"step": step, "tokens": tokens, "align_loss": L, "delta_align_loss": L - L0, **probe()})
            if reg is not None:
                terms_log.append({"step": step, **{k: v for k, v in reg.last_terms.items() if k != "layers"}})
            if on_log is not None:
                on_log(step, model)
            bar.set_postfix(task=f"{task_losses[-1]:.3f}", dL=f"{L - L0:+.3f}")
    bar.close()
    model.eval()
    from agl.experiment.config import agl_settings

    log = {"settings": None if settings is None else agl_settings(settings), "seed": seed, "steps": steps, "tokens": tokens, "curve": curve,
           "task_loss": task_losses, "terms": terms_log, "seconds": round(time.time() - t0, 2)}
    if mix_fraction:
        used = [i for step in schedule for src, i in step if src == "mix"]
        log["mix"] = {"fraction": mix_fraction, "slots": len(used), "distinct": len(set(used)),
                      "pool": len(mix_records)}
    if reg is not None:
        log["grad_shares"] = reg.gradient_shares()
    elif unit_probe is not None:
        unit = unit_weights(unit_probe)
        log["grad_shares_unit"] = make_regulariser(model, state, unit).gradient_shares()
        log["grad_shares_unit_settings"] = agl_settings(unit)
    return model, log
