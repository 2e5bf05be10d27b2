"""Hugging Face ``Trainer`` / TRL glue under ``agl.hf.attach``: the logging callback, checkpoint I/O of the
regulariser's state, Trainer's gradient-accumulation rule and its causal-LM loss. (No import of ``agl.loss`` here:
it imports this.)"""
from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from agl._io import atomic_write_json

__all__ = ["AGLLoggingCallback", "CHECKPOINT_FILE", "causal_lm_loss"]

CHECKPOINT_FILE = "agl_loss.json"  # AGLLoss.state_dict() inside each Trainer checkpoint folder


class AGLLoggingCallback(TrainerCallback):
    """Adds the AGL terms to every training log of a ``Trainer`` as ``agl/<term>``: every key of
    ``AGLLoss.last_terms`` but ``layers``, e.g. ``agl/align_nats`` (predicted rise of the alignment loss, nats per
    token), ``agl/lambda_align`` (the weight in force) and ``agl/share_align`` … (each term's fraction of the
    regulariser), each the mean over the optimiser steps since the previous log of that step's value.

    It also ends each optimiser step for the loss (``AGLLoss.optimizer_step()``: the budget controller's step) and
    writes ``AGLLoss.state_dict()`` into every checkpoint folder (``agl_loss.json``). ``agl.hf.attach`` installs it
    first in the callback list, so the reporters (TensorBoard, wandb, the printer) see the scalars."""

    def __init__(self, agl_loss, prefix: str = "agl/"):
        self.agl_loss = agl_loss
        self.prefix = prefix
        self._sums: dict = {}
        self._steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.agl_loss.optimizer_step()
        step = self.agl_loss.pop_running_means()  # this optimiser step's micro-batches
        if step:
            for k, v in step.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
            self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._steps or logs is None or "loss" not in logs:  # training logs only, not eval metrics
            return
        extra = {f"{self.prefix}{k}": v / self._steps for k, v in self._sums.items()}
        self._sums, self._steps = {}, 0
        logs.update(extra)
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):  # e.g. a hyper-parameter search trial writes elsewhere
            warnings.warn(f"agl: checkpoint folder {folder} not found; the regulariser's state was not saved")
            return
        atomic_write_json(os.path.join(folder, CHECKPOINT_FILE), self.agl_loss.state_dict())


def load_checkpoint(agl_loss, folder: str) -> None:
    """Load ``agl_loss.json`` of a Trainer checkpoint folder into ``agl_loss`` (a warning in budget mode if absent)."""
    path = os.path.join(folder, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        if agl_loss.budget is not None:
            warnings.warn(f"agl: {path} not found (a checkpoint saved without agl.hf.attach): the budget multiplier "
                          "restarts at its initial λ_A")
        return
    with open(path, encoding="utf-8") as f:
        agl_loss.load_state_dict(json.load(f))


def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether the task loss ``trainer.compute_loss`` returned is already scaled for gradient accumulation, by
    ``Trainer``'s documented rule (``Trainer.loss_is_scaled_for_ga``): the attribute when set, else True when the
    loss was normalised by ``num_items_in_batch`` (the model takes loss kwargs, or a ``compute_loss_func`` is set)."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """(task loss, the regulariser's weight) of one micro-batch, by ``transformers``' causal-LM rule: the
    cross-entropy of ``outputs.logits`` (B, T, V) against ``labels`` (B, T) shifted by one, -100 ignored, summed /
    ``num_items_in_batch`` when given (the weight is then this micro-batch's share of the counted tokens, so the
    regulariser enters each optimiser step once in total), else the mean (weight 1). ``labels`` None: the model's
    own ``outputs.loss``, weight 1."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if labels is None:
        return (outputs["loss"] if isinstance(outputs, dict) else outputs.loss), 1.0
    lg = logits[..., :-1, :].float()
    tg = labels[..., 1:].to(lg.device)
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="sum")
    local = (tg != -100).sum()
    if num_items_in_batch is None:
        return ce / local.clamp_min(1), 1.0
    nib = num_items_in_batch.to(lg.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return ce / nib, local.float() / nib
