"""What :class:`agl.AGLLoss` records of its calls: the last call's terms, kept as 0-dim tensors on the device (no
host sync per step; floats only when ``last_terms`` is read), and their running sums for the logging callback."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from agl._layers import layers_dict
from agl.units import TERMS

__all__ = ["TermLog"]


class TermLog:
    """The last call's terms (``last``; with per-layer values ``layers`` (L, 5): the four means and align_nats) and
    the sums of every recorded call since :meth:`pop_running_means`."""

    def __init__(self):
        self.last: Dict[str, Tensor] = {}
        self.layers: Optional[Tensor] = None
        self._running: Dict[str, Tensor] = {}
        self._n = 0

    @torch.no_grad()
    def set_last(self, u: Dict[str, Tensor], parts: Dict[str, Tensor], reg: Tensor, lam_a: Tensor, alpha: float,
                 layers: Optional[Tensor] = None) -> None:
        """One regulariser call: ``u`` the terms in units, ``parts`` the weighted terms, ``reg`` their sum, ``lam_a``
        the λ_A in force; each part's share of ``reg`` (all 0 when ``reg`` is 0) and the α-mixed collision."""
        denom = reg.detach()
        shares = {f"share_{k}": torch.where(denom > 0, v.detach() / denom, torch.zeros_like(denom))
                  for k, v in parts.items()}
        nats = {"align_nats": u["align_nats"].detach()} if "align_nats" in u else {}  # none for the identity metric
        self.last = {**{k: u[k].detach() for k in TERMS if k in u}, "regularizer": reg.detach(), **nats,
                     "lambda_align": lam_a.detach(), **shares}
        if "overlap" in u:
            self.last["collision"] = (alpha * u["overlap"] + (1.0 - alpha) * u["geodesic"]).detach()
        if "align_nats_diagonal" in u:
            self.last["align_nats_diagonal"] = u["align_nats_diagonal"].detach()
        self.layers = layers

    def record(self, task_loss, total: Tensor) -> None:
        """Add the task loss and the total of the call to the last terms, and all of them to the running sums."""
        self.last["task_loss"] = (task_loss.detach().float() if torch.is_tensor(task_loss)
                                  else torch.tensor(float(task_loss)))
        self.last["total"] = total.detach().float()
        for k, v in self.last.items():
            self._running[k] = v if k not in self._running else self._running[k] + v.to(self._running[k].device)
        self._n += 1

    def last_terms(self, entries) -> Dict[str, Any]:
        """The last call as floats, with ``layers`` (entry key -> the four means and align_nats) when recorded."""
        out: Dict[str, Any] = {k: float(v) for k, v in self.last.items()}
        if self.layers is not None:
            out["layers"] = layers_dict(entries, self.layers, (*TERMS, "align_nats"))
        return out

    def pop_running_means(self) -> Dict[str, float]:
        """Means of the recorded terms since the last call, then reset."""
        if not self._n:
            return {}
        out = {k: float(v) / self._n for k, v in self._running.items()}
        self._running, self._n = {}, 0
        return out
