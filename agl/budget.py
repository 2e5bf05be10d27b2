"""``BudgetController``: the multiplier λ_A that holds the predicted alignment-loss rise at or below a budget.

Dual ascent in log space on the violation predicted H steps ahead (docs/MATH.md §8; ``AGLConfig.align_budget``),
once per optimiser step, with a = that step's ``align_nats`` (nats per token), ε the budget, η the step size and λ0
the starting weight::

    e = clamp((a + H·(a − a_prev))/ε − 1, −1, 3),    λ ← clamp(λ·exp(η·e), λ0/R, λ0·R),   R = 1e6

The controller only sees what :class:`agl.AGLLoss` shows it: grad-enabled ``regularizer()`` calls in training mode
(never a ``torch.no_grad`` or eval-mode forward). The calls between two optimiser steps (the micro-batches of
gradient accumulation) form one *window*, and a is the window's mean (align_nats depends on the LoRA factors only,
so every call of a window sees the same value). A window closes, and λ takes its step, at :meth:`optimizer_step`
(the Trainer callback of :func:`agl.hf.attach` calls it after each ``optimizer.step()``) or, in a plain loop that
never calls it, at the first call that finds the LoRA factors modified in place since the window opened (their
version counters: ``optimizer.step()`` updates parameters in place). So with k micro-batches per step λ moves once
per step, as with one k-times larger batch, and a plain loop without accumulation steps it once per call, as before.

Everything stays on the device (no host sync per step); :meth:`state_dict` is plain JSON so a resumed run continues
with the multiplier it had. :class:`AlignWeight` is the λ_A an ``AGLLoss`` uses: this controller's multiplier in
budget mode, else the config's fixed weight (or one set by hand).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["AlignWeight", "BudgetController"]

LAMBDA_RANGE = 1e6  # λ stays within [λ0 / R, λ0 · R] of its initial value λ0
_STALL = 4096  # calls in one window without a step: the optimiser does not update the factors in place
_STATE_KEYS = ("lambda", "prev_align_nats", "window_sum", "window_n", "told")


def _number(owner: str, name: str, v, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{owner}: `{name}` must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


class BudgetController:
    """λ_A by dual ascent, stepped once per optimiser step (see the module docstring).

    ``budget`` ε > 0 (nats per token), ``lambda0`` λ0 > 0 (the start), ``lr`` η > 0 (λ changes by at most ×e^(3η)
    up, ÷e^η down per step), ``horizon`` H ≥ 0 (steps; 0 is plain dual ascent), ``params``: the LoRA factors whose
    in-place updates mark optimiser steps in a plain loop."""

    def __init__(self, budget: float, lambda0: float, lr: float = 0.3, horizon: float = 10.0,
                 params: Iterable[Tensor] = ()):
        self.budget = _number("BudgetController", "budget", budget, positive=True)
        self.lambda0 = _number("BudgetController", "lambda0", lambda0, positive=True)
        self.lr = _number("BudgetController", "lr", lr, positive=True)
        self.horizon = _number("BudgetController", "horizon", horizon, positive=False)
        self._params = list(params)
        self._lam = torch.tensor(self.lambda0, dtype=torch.float64)
        self._prev: Optional[Tensor] = None  # a of the last closed window
        self._sum: Optional[Tensor] = None  # Σ a over the open window's calls
        self._n = 0  # calls in the open window
        self._versions = None  # the factors' version counters when the window's last call ran
        self._told = False  # optimizer_step() has been called: windows close only there

    @classmethod
    def from_config(cls, config, params: Iterable[Tensor] = ()) -> "BudgetController":
        """The controller ``AGLConfig(align_budget=ε, lambda_align=λ0, budget_lr=η, budget_horizon=H)`` asks for."""
        return cls(config.align_budget, config.lambda_align, config.budget_lr, config.budget_horizon, params)

    # ------------------------------------------------------------------ the multiplier
    @property
    def value(self) -> float:
        """λ now (a window still open moves it at its optimiser step)."""
        return float(self._lam)

    @value.setter
    def value(self, v: float) -> None:
        self._lam = torch.tensor(_number("BudgetController", "value", v, positive=True), dtype=torch.float64,
                                 device=self._lam.device)

    def multiplier(self, like: Tensor) -> Tensor:
        """λ as a 0-dim tensor on ``like``'s device and dtype (the float64 master moves to that device once)."""
        if self._lam.device != like.device:
            self._lam = self._lam.to(like.device)
        return self._lam.to(like.dtype)

    # ------------------------------------------------------------------ windows
    def _signature(self):
        return tuple(p._version for p in self._params)

    def begin_call(self) -> None:
        """Before a call reads λ: in a plain loop (never told), close the window if the factors changed since."""
        if self._n and not self._told and self._signature() != self._versions:
            self._close()

    @torch.no_grad()
    def observe(self, align_nats: Tensor) -> None:
        """Add a call's ``align_nats`` (0-dim tensor) to the open window."""
        a = align_nats.detach().to(device=self._lam.device, dtype=torch.float64)
        self._sum = a if self._n == 0 else self._sum + a
        self._n += 1
        if not self._told:
            self._versions = self._signature()
            if self._n == _STALL:
                warnings.warn(f"agl budget: {_STALL} training calls without an optimiser step: this optimiser does not "
                              "update the LoRA factors in place, so call AGLLoss.optimizer_step() after each step",
                              stacklevel=3)

    def optimizer_step(self) -> None:
        """An optimiser step happened: close the window (one dual-ascent step); from now on only this closes one."""
        self._told = True
        self._close()

    @torch.no_grad()
    def _close(self) -> None:
        if not self._n:
            return
        a = self._sum / self._n
        prev = a if self._prev is None else self._prev
        e = ((a + self.horizon * (a - prev)) / self.budget - 1.0).clamp(-1.0, 3.0)
        self._lam = (self._lam * torch.exp(self.lr * e)).clamp(self.lambda0 / LAMBDA_RANGE, self.lambda0 * LAMBDA_RANGE)
        self._prev, self._sum, self._n, self._versions = a, None, 0, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able state (one host copy): λ, the last window's a, the open window (sum, calls) and whether
        windows close only at :meth:`optimizer_step`. Floats are float64, so a round trip is exact."""
        return {"lambda": float(self._lam), "prev_align_nats": None if self._prev is None else float(self._prev),
                "window_sum": float(self._sum) if self._n else 0.0, "window_n": self._n, "told": self._told}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. An open window restored without being told closes at the next call
        (it belongs to an optimiser step taken before the save)."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"BudgetController.load_state_dict: `state` must be a dict with keys {list(_STATE_KEYS)}, "
                             f"got {got}")
        n = state["window_n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"BudgetController.load_state_dict: `window_n` must be an int >= 0, got {n!r}")
        dev = self._lam.device
        t = lambda v: torch.tensor(float(v), dtype=torch.float64, device=dev)  # noqa: E731
        self._lam = t(_number("BudgetController", "lambda", state["lambda"], positive=True))
        prev = state["prev_align_nats"]
        self._prev = None if prev is None else t(_number("BudgetController", "prev_align_nats", prev, positive=False))
        self._sum = t(_number("BudgetController", "window_sum", state["window_sum"], positive=False)) if n else None
        self._n, self._versions, self._told = n, None, bool(state["told"])


class AlignWeight:
    """The λ_A in force for :class:`agl.AGLLoss`: the multiplier of ``controller`` (a :class:`BudgetController`
    built from ``config`` when ``config.align_budget`` is set; ``params`` are the LoRA factors), else
    ``config.lambda_align`` or the value last set through :attr:`value`."""

    def __init__(self, config, params: Iterable[Tensor] = ()):
        self.controller = None if config.align_budget is None else BudgetController.from_config(config, params)
        self._default = float(config.lambda_align)
        self._set: Optional[Tensor] = None  # a fixed λ_A set by hand (float64 master)
        self._fixed: Dict[tuple, Tensor] = {}  # the config's λ_A per (device, dtype), made once

    @property
    def value(self) -> float:
        if self.controller is not None:
            return self.controller.value
        return float(self._set) if self._set is not None else float(self._default)

    @value.setter
    def value(self, v: float) -> None:
        from agl.config import _finite  # the config's message for a bad weight

        if self.controller is not None:
            self.controller.value = _finite("lambda_align", v, positive=True)
        else:
            self._set = torch.tensor(_finite("lambda_align", v), dtype=torch.float64)

    def multiplier(self, like: Tensor) -> Tensor:
        """λ_A as a 0-dim tensor on ``like``'s device and dtype (no host sync)."""
        if self.controller is not None:
            return self.controller.multiplier(like)
        if self._set is None:
            key = (like.device, like.dtype)
            if key not in self._fixed:
                self._fixed[key] = torch.tensor(self._default, dtype=like.dtype, device=like.device)
            return self._fixed[key]
        if self._set.device != like.device:
            self._set = self._set.to(like.device)
        return self._set.to(like.dtype)

    def state_dict(self) -> Dict[str, Any]:
        """``{"budget": the controller's state or None, "lambda_align": a λ_A set by hand or None}`` (JSON-able)."""
        return {"budget": None if self.controller is None else self.controller.state_dict(),
                "lambda_align": None if self._set is None else float(self._set)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (from a loss in the same mode: budget or fixed λ_A)."""
        if not isinstance(state, dict) or set(state) != {"budget", "lambda_align"}:
            raise ValueError("AGLLoss.load_state_dict: `state` must be a dict with keys 'budget' and 'lambda_align' "
                             f"(AGLLoss.state_dict()), got {sorted(state) if isinstance(state, dict) else state!r}")
        if (state["budget"] is None) != (self.controller is None):
            mode = lambda has: "with a budget" if has else "with a fixed λ_A"  # noqa: E731
            raise ValueError(f"AGLLoss.load_state_dict: `state` is from a loss {mode(state['budget'] is not None)}, "
                             f"this one is {mode(self.controller is not None)}; set AGLConfig.align_budget as in the "
                             "run saved")
        if self.controller is not None:
            self.controller.load_state_dict(state["budget"])
        if state["lambda_align"] is not None:
            self.value = state["lambda_align"]
