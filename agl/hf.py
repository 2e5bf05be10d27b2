"""Hugging Face ``Trainer`` and TRL integration::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...))
    agl_loss = agl.hf.attach(trainer, agl.AlignmentState.load("state_dir"), agl.AGLConfig(align_budget=1e-5))
    trainer.train()            # agl/* scalars in every log; λ_A saved in checkpoints, restored on resume

The loss is added to the trainer's own forward (no extra forward, no ``compute_loss_func``); see :func:`attach`.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.trainer_utils import get_last_checkpoint

from agl._hf import CHECKPOINT_FILE, AGLLoggingCallback, load_checkpoint, loss_is_scaled_for_ga
from agl.loss import AGLConfig, AGLLoss

__all__ = ["attach", "AGLLoggingCallback", "CHECKPOINT_FILE"]


def attach(trainer, state, config: Optional[AGLConfig] = None) -> AGLLoss:
    """Add the AGL regulariser to a built ``transformers.Trainer`` or TRL trainer (``SFTTrainer(peft_config=...)``
    included) and return its :class:`AGLLoss`, built from ``trainer.model`` (the peft model) with ``state`` and
    ``config``. Call it after building the trainer and before ``train()``:

    - ``trainer.compute_loss`` is wrapped on this instance: the trainer's own task loss (TRL's included, from its one
      forward) plus the regulariser, weighted so that it enters each optimiser step once whatever the gradient
      accumulation (``reg / k`` per micro-batch when the task loss is already scaled for accumulation, else ``reg``,
      which ``Trainer`` then divides by k). Evaluation (no grad or eval mode) gets the task loss alone.
    - :class:`AGLLoggingCallback` goes first in the callback list; the logged ``agl/task_loss`` is the optimiser
      step's task loss (on one process ``loss`` − ``agl/regularizer`` of the same log) and ``agl/total`` the step's
      loss, comparable to the Trainer's ``loss``.
    - Each checkpoint gets ``agl_loss.json`` (``AGLLoss.state_dict()``), and ``trainer.train(resume_from_checkpoint=
      ...)`` loads it back first, so a budget run resumes with the multiplier it had.
    """
    original = trainer.compute_loss
    if getattr(original, "agl_loss", None) is not None:
        raise ValueError("agl.hf.attach: `trainer` already has an AGL regulariser attached")
    if isinstance(getattr(getattr(trainer, "compute_loss_func", None), "__self__", None), AGLLoss):
        raise ValueError("agl.hf.attach: `trainer` was built with compute_loss_func=AGLLoss.trainer_loss; build it "
                         "without that argument (attach adds the regulariser itself)")
    agl_loss = AGLLoss(trainer.model, state, config)

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (torch.is_grad_enabled() and model.training):
            return out
        task = out[0] if return_outputs else out
        k = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        scaled = loss_is_scaled_for_ga(trainer, num_items_in_batch)
        reg = agl_loss.regularizer()
        total = task + (reg / k if scaled else reg).to(task.dtype)
        step_task = task.detach().float().mean() * (k if scaled else 1)  # the optimiser step's task loss, per call
        agl_loss._record(step_task, step_task + reg.detach().float())
        return (total, *out[1:]) if return_outputs else total

    compute_loss.agl_loss = agl_loss
    trainer.compute_loss = compute_loss
    trainer.callback_handler.callbacks.insert(0, AGLLoggingCallback(agl_loss))

    original_train = trainer.train

    def train(resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = get_last_checkpoint(trainer.args.output_dir) if folder else None
        if folder is not None:
            load_checkpoint(agl_loss, folder)
        return original_train(resume_from_checkpoint, *args, **kwargs)

    trainer.train = train
    return agl_loss
