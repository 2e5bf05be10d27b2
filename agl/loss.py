"""``AGLLoss``: the drop-in AlignGuard-LoRA regulariser for any PyTorch / Hugging Face training loop.

Plain loop::

    agl_loss = agl.AGLLoss(model, agl.AlignmentState.load("state_dir"))   # model: a peft LoRA model (or DDP)
    loss = agl_loss(model(**batch).loss)          # task loss + regularisers
    loss.backward(); print(agl_loss.last_terms)

Hugging Face ``Trainer`` / TRL: ``agl_loss = agl.hf.attach(trainer, state, config)`` (loss, logging, checkpoints).

Per step one ``agl_terms_grouped`` call forms the (L, 4) per-layer means T (align, task, overlap, geodesic) of every
LoRA layer and adapter (ΔW = s·B A, B_align = U (Uᵀ B), A_align = (A V) Vᵀ; fan_in_fan_out layers transposed into
the base weight's orientation, the state's); ``agl.units`` turns T into the terms in ``config.units`` (default nats:
``align`` = ``align_nats`` = ½·Σ_l Σ_ij F (ΔW_A)², docs/MATH.md §7; across layers with ``curvature="cross"``, §9), and

    total = task_loss + λ_A·align + λ_T·task + λ_NC·(α·overlap + (1 − α)·geodesic)

with λ_A fixed or held to ``config.align_budget`` (``agl.budget``, §8). Nothing of size m x n is materialised with
the kernel backend (the torch reference materialises it per layer).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from agl import _layers
from agl._termlog import TermLog
from agl.budget import AlignWeight, BudgetController
from agl.config import AGLConfig, resolve_backend
from agl.distributed import gather_whole, is_dtensor, sharded_terms_for
from agl.functional import agl_terms_grouped
from agl.sharded_state import ShardedAlignmentState
from agl.state import AlignmentState
from agl.units import TERMS as _TERMS, layer_align_nats, unit_terms as _unit_terms

__all__ = ["AGLConfig", "AGLLoss", "AGLLoggingCallback", "resolve_backend"]


def _grad_norm(v: Tensor, params, **kw) -> float:
    """‖∂v/∂θ‖₂ over ``params`` (0 when ``v`` does not depend on them)."""
    grads = torch.autograd.grad(v, params, allow_unused=True, **kw) if v.requires_grad else ()
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


class AGLLoss:
    """Task loss + AGL regularisers over every active peft LoRA adapter of ``model``; see the module docstring.

    ``state``: the :class:`AlignmentState` of the aligned model (checked against the model: every mismatch is
    reported in one ``ValueError``). Merged adapters, a model without LoRA layers and FSDP1 / ZeRO-3 parameters
    raise clear errors. Under DDP the value is identical on every rank (and so the budget multiplier). Under FSDP2
    (DTensor LoRA factors) or with a ``ShardedAlignmentState`` each rank holds only its rows of every Fisher; the
    per-layer grid sums are all-reduced before the terms are formed, so value and gradients equal the
    single-process ones (``agl.distributed``), and every rank must call the regulariser (it is a collective)."""

    def __init__(self, model: nn.Module, state: AlignmentState, config: Optional[AGLConfig] = None):
        if not isinstance(state, AlignmentState):
            raise TypeError(f"AGLLoss: `state` must be an agl.AlignmentState, got {type(state).__name__}")
        self.config = config if config is not None else AGLConfig()
        if not isinstance(self.config, AGLConfig):
            raise TypeError(f"AGLLoss: `config` must be an agl.AGLConfig, got {type(self.config).__name__}")
        self.model, self.state = model, state
        self.entries, self._task_state = _layers.bind(model, state, self.config)
        self._sharded = sharded_terms_for(self.entries, state, self._task_state, self.config)  # FSDP2 / row-sharded
        self._cross = self._cross_curvature(state) if self.config.curvature == "cross" else None
        # unit conversions (agl.units): N_l (cached per device and dtype: no host copy per step), c, c_H, Σ‖W0‖²
        self._numel = torch.tensor([e.numel for e in self.entries], dtype=torch.float64)
        self._numel_cache: Dict[Tuple, Tensor] = {}
        self._nats_align, self._nats_task, self._w0_sq = _layers.unit_scales(self.entries, state, self._task_state,
                                                                             self.config.units)
        # λ_A: fixed, or the budget controller's multiplier (tensors only, so a step never syncs with the host)
        self._weight = AlignWeight(self.config, [p for e in self.entries for p in (e.A, e.B)])
        self.budget: Optional[BudgetController] = self._weight.controller
        self._log = TermLog()

    # ------------------------------------------------------------------ the layers and their terms
    def _tensors(self, e: _layers.Entry, device, dtype):
        return e.tensors(self.state, self._task_state, self.config.subspaces, device, dtype)

    def _cross_curvature(self, state: AlignmentState):
        """The cross-layer penalty over the entries whose layer has U, V and C (``agl.curvature``)."""
        if isinstance(state, ShardedAlignmentState):  # it stores Fisher rows, U and V, and no C
            raise NotImplementedError("AGLLoss: curvature='cross' needs the whole AlignmentState (its per-sample "
                                      f"projections C), got a {type(state).__name__}: load the state file whole on "
                                      "every rank (C is N x Σ k·k' floats, independent of the layer widths)")
        self._cross_idx, cross = _layers.cross_curvature(self.entries, state)
        return cross

    def _factors(self):  # (Ls, Rs, scales): ΔW = s · L @ R in the base weight's orientation
        return _layers.factors(self.entries)

    def _of_whole_factors(self, fn, factors) -> Tensor:
        """``fn(Ls, Rs, scales)`` of the whole factors. Under FSDP2 (DTensor factors) every rank gathers them whole
        (``agl.distributed.gather_whole``) and forms the same value; the gather's backward sums the ranks'
        gradients, which here are the whole gradient on every rank, so each rank's is divided by the world size
        (the value is untouched): the LoRA shards get ∇ once, the mean over ranks as for the other terms."""
        if self._sharded is None or not is_dtensor(self.entries[0].B):
            return fn(*factors)
        whole = gather_whole([t for e in self.entries for t in (e.A, e.B)], self._sharded.group)
        v = fn(*_layers.factors(self.entries, whole))
        return v.detach() + (v - v.detach()) / self._sharded.world

    def _half_sq_norm(self, factors) -> Tensor:
        """½·Σ_l ‖ΔW_l‖²_F (the identity metric), from r x r Gram matrices; under FSDP2 of the gathered factors."""
        return self._of_whole_factors(_layers.half_sq_norm, factors)

    def cross_nats(self, factors=None) -> Tensor:
        """The cross-layer align_nats ½·(1/ΣT)·Σ_n z_n² of the current factors (``agl.curvature``); needs
        ``config.curvature == "cross"``. Under FSDP2 every rank forms it from the gathered factors and the whole
        C (z couples the layers), as the identity metric does."""
        if self._cross is None:
            raise ValueError("AGLLoss.cross_nats: the config's curvature is not 'cross'")
        def of_cross_layers(Ls, Rs, scales):  # the entries whose layer has C
            return self._cross(*([x[i] for i in self._cross_idx] for x in (Ls, Rs, scales)))[0]

        return self._of_whole_factors(of_cross_layers, factors or self._factors())

    def _term_matrix(self, backend: str, factors=None) -> Tensor:
        """(L, 4) terms of every entry (rows in ``self.entries`` order) from one ``agl_terms_grouped`` call, so a
        step dispatches the same few ops whatever the number of layers."""
        if self._sharded is not None:  # FSDP2: each rank sums its Fisher rows; sums all-reduced (agl.distributed)
            return self._sharded.term_matrix(backend)
        Ls, Rs, scales = factors or self._factors()
        Fs, Hs, Us, Vs = zip(*(self._tensors(e, L.device, L.dtype) for e, L in zip(self.entries, Ls)))
        c = self.config
        return agl_terms_grouped(Ls, Rs, Us=list(Us), Vs=list(Vs), fishers=list(Fs), task_metrics=list(Hs)
                                 if any(h is not None for h in Hs) else None, scales=scales, beta=c.beta, tau=c.tau,
                                 sharpness=c.sharpness, eps=c.eps, backend=backend)

    def _numel_like(self, T: Tensor) -> Tensor:
        key = (T.device, T.dtype)
        if key not in self._numel_cache:
            self._numel_cache[key] = self._numel.to(device=T.device, dtype=T.dtype)
        return self._numel_cache[key]

    def unit_terms(self, T: Tensor) -> Dict[str, Tensor]:
        """The four terms in ``config.units`` and ``align_nats`` from the (L, 4) per-layer means ``T``
        (:func:`agl.units.unit_terms`)."""
        return _unit_terms(T, self._numel_like(T), self.config.units, self._nats_align, self._nats_task, self._w0_sq)

    # ------------------------------------------------------------------ the loss
    @property
    def lambda_align(self) -> float:
        """λ_A in force: the budget controller's multiplier, else ``config.lambda_align`` (or the value set here)."""
        return self._weight.value

    @lambda_align.setter
    def lambda_align(self, value: float) -> None:
        self._weight.value = value

    def _weighted(self):
        """(T or None, terms in units, λ_A in force, the weighted terms) for the factors as they are now. With the
        cross curvature and λ_T = λ_NC = 0 (and no per-layer log) the grouped op is skipped: every term it forms
        would be weighted by 0, so T is None and only the align term is formed (and logged). The identity metric
        (L2-SP) never calls it: its one term is ½‖ΔW‖²_F, which has no ``align_nats``."""
        c = self.config
        factors = self._factors()
        if c.curvature == "identity":
            v = self._half_sq_norm(factors)
            lam_a = self._weight.multiplier(v)
            return None, {"align": v}, lam_a, {"align": lam_a * v}
        if self._cross is not None and c.lambda_task == 0 and c.lambda_collision == 0 and not c.per_layer_terms:
            nats = self.cross_nats(factors)
            lam_a = self._weight.multiplier(nats)
            return None, {"align": nats, "align_nats": nats}, lam_a, {"align": lam_a * nats}
        T = self._term_matrix(resolve_backend(c.backend, self.entries[0].B.device), factors)
        u = self.unit_terms(T)
        if self._cross is not None:  # the align term in the cross-layer metric (agl.curvature)
            u["align_nats_diagonal"] = u["align_nats"]
            u["align_nats"] = u["align"] = self.cross_nats(factors)
        lam_a = self._weight.multiplier(T)
        return T, u, lam_a, {"align": lam_a * u["align"], "task": c.lambda_task * u["task"],
                             "overlap": c.lambda_collision * c.alpha * u["overlap"],
                             "geodesic": c.lambda_collision * (1.0 - c.alpha) * u["geodesic"]}

    def regularizer(self) -> Tensor:
        """λ-weighted sum of the terms in ``config.units`` (a 0-dim tensor, differentiable w.r.t. every LoRA factor).
        Records ``last_terms``; in budget mode a call with gradients enabled in training mode is shown to the budget
        controller, which moves λ_A once per optimiser step (``agl.budget``)."""
        observe = self.budget is not None and torch.is_grad_enabled() and self.entries[0].binding.module.training
        if observe:  # a plain loop's optimiser step since the last call moves λ_A before this call uses it
            self.budget.begin_call()
        T, u, lam_a, parts = self._weighted()
        reg = sum(parts.values())
        layers = None
        if self.config.per_layer_terms:
            Td = T.detach()
            layers = torch.cat([Td, layer_align_nats(Td, self._numel_like(Td), self._nats_align)[:, None]], dim=1)
        self._log.set_last(u, parts, reg, lam_a, self.config.alpha, layers)
        if observe:
            self.budget.observe(u["align_nats"])
        return reg

    def gradient_shares(self) -> Dict[str, float]:
        """How much each weighted term pulls on the LoRA factors now: ``grad_norm_<term>`` = ‖∂(λ·term)/∂θ‖₂ over
        every LoRA factor θ, ``grad_share_<term>`` = that norm / the sum of the four (0 when all are 0), and
        ``grad_norm_total`` = ‖∂ regulariser/∂θ‖₂ (≤ the sum; less when terms pull against each other). Four
        backward passes and nothing recorded (``last_terms``, the budget multiplier and the factors' ``.grad`` are
        left alone): a probe for calibrating weights, not something to call every step."""
        params = list({id(p): p for e in self.entries for p in (e.A, e.B)}.values())
        with torch.enable_grad():
            _, _, _, parts = self._weighted()
            norms = {k: _grad_norm(v, params, retain_graph=True) for k, v in parts.items()}
            out = {**{f"grad_norm_{k}": v for k, v in norms.items()},
                   "grad_norm_total": _grad_norm(sum(parts.values()), params)}
        denom = sum(norms.values())
        return {**out, **{f"grad_share_{k}": (v / denom if denom > 0 else 0.0) for k, v in norms.items()}}

    def __call__(self, task_loss: Tensor) -> Tensor:
        """``task_loss`` + regularisers (0-dim tensor)."""
        reg = self.regularizer()
        total = task_loss + reg.to(task_loss.dtype) if torch.is_tensor(task_loss) else reg + task_loss
        self._record(task_loss, total)
        return total

    def trainer_loss(self, outputs, labels: Optional[Tensor], num_items_in_batch=None) -> Tensor:
        """A ``compute_loss_func`` for ``transformers.Trainer`` (and TRL): the causal-LM loss of ``outputs.logits``
        against ``labels`` (``agl._hf.causal_lm_loss``: shifted, -100 ignored; summed / ``num_items_in_batch`` when
        given, else the mean) plus the regulariser, weighted by this micro-batch's share of the counted tokens, so it
        enters each optimiser step exactly once in total."""
        from agl._hf import causal_lm_loss  # transformers: there whenever a Trainer is

        task, weight = causal_lm_loss(outputs, labels, num_items_in_batch)
        reg = self.regularizer()
        self._record(task, task + reg)
        return task + weight * reg

    # ------------------------------------------------------------------ λ_A across optimiser steps and resumes
    def optimizer_step(self) -> None:
        """An optimiser step happened: the budget's λ_A steps on its micro-batches (a no-op with a fixed λ_A). Needed
        only when the optimiser does not update the LoRA factors in place; ``agl.hf.attach`` calls it."""
        if self.budget is not None:
            self.budget.optimizer_step()

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue as it was (JSON-able): the budget controller's state (None with a
        fixed λ_A) and a fixed λ_A set through ``lambda_align`` (else None)."""
        return self._weight.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (into a loss built with the same ``align_budget`` mode)."""
        self._weight.load_state_dict(state)

    # ------------------------------------------------------------------ logging
    def _record(self, task_loss, total) -> None:
        self._log.record(task_loss, total)

    @property
    def last_terms(self) -> Dict[str, Any]:
        """Floats of the last call: ``align``, ``task``, ``overlap``, ``geodesic`` (in ``config.units``), ``collision``
        (their α-mix), ``regularizer`` (the λ-weighted sum), ``align_nats`` (predicted rise of the alignment loss,
        nats per token, in any units; ``align_nats_diagonal`` beside the cross one when the grouped op ran; absent
        with ``curvature="identity"``, whose ``align`` is ½‖ΔW‖²_F and predicts nothing in nats),
        ``lambda_align`` (in force), ``share_<term>`` (fractions of the regulariser; 0 when it is 0), ``task_loss``,
        ``total``; ``layers`` (name -> per-layer means and ``align_nats``) with ``config.per_layer_terms``."""
        return self._log.last_terms(self.entries)

    @torch.no_grad()
    def layer_terms(self) -> Dict[str, Dict[str, float]]:
        """Per-layer (and adapter) values of the four terms now (per-element means, as ``agl_terms`` gives them),
        without recording anything."""
        if self.config.curvature == "identity":
            raise ValueError("AGLLoss.layer_terms: the per-layer terms are the grouped op's (Fisher-weighted means), "
                             "which curvature='identity' (½‖ΔW‖²_F) does not form")
        T = self._term_matrix(resolve_backend(self.config.backend, self.entries[0].B.device))
        return _layers.layers_dict(self.entries, T, _TERMS)

    def pop_running_means(self) -> Dict[str, float]:
        """Means of the recorded terms since the last call (what the logging callback reports), then reset."""
        return self._log.pop_running_means()


def __getattr__(name):  # the callback needs transformers: build it on first use
    if name == "AGLLoggingCallback":
        from agl._hf import AGLLoggingCallback

        return AGLLoggingCallback
    raise AttributeError(f"module 'agl.loss' has no attribute {name!r}")
