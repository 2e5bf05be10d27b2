"""The LoRA layers an :class:`agl.AGLLoss` regularises: one :class:`Entry` per (peft LoRA layer, active adapter),
checked against the alignment state, with that state's tensors cached on the factors' device and dtype."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from agl.curvature import CrossCurvature
from agl.distributed import sq_norm
from agl.peft_binding import LoraBinding, find_lora_layers
from agl.state import AlignmentState

__all__ = ["Entry", "bind", "factors", "half_sq_norm", "unit_scales", "cross_curvature", "layers_dict"]


@dataclass
class Entry:
    """One (layer, adapter) pair with its state tensors cached on the factors' device and dtype."""

    name: str
    adapter: str
    binding: LoraBinding
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    cache: Dict[Tuple, Tuple] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The name ``last_terms["layers"]`` uses: the layer's, with ``[adapter]`` when it has several."""
        return self.name if len(self.binding.adapters) == 1 else f"{self.name}[{self.adapter}]"

    @property
    def numel(self) -> int:
        """N_l = m·n, the elements of the base weight (the per-layer terms are means over them)."""
        m, n = self.binding.shape
        return int(m) * int(n)

    def tensors(self, state: AlignmentState, task_state: Optional[AlignmentState], subspaces: bool, device, dtype):
        """(F, H, U, V) of this layer on ``device`` / ``dtype`` (H None without a task Fisher; U, V None without
        ``subspaces``), converted once and kept until the factors move to another device or dtype."""
        key = (str(device), dtype)
        hit = self.cache.get(key)
        if hit is None:
            ls = state.layers[self.name]
            conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            H = None if task_state is None else conv(task_state.layers[self.name].fisher)
            U, V = (conv(ls.U), conv(ls.V)) if subspaces else (None, None)
            hit = (conv(ls.fisher), H, U, V)
            self.cache.clear()
            self.cache[key] = hit
        return hit


def bind(model: nn.Module, state: AlignmentState, config) -> Tuple[List[Entry], Optional[AlignmentState]]:
    """The entries of ``model``'s LoRA layers that ``config.layers`` selects, and the task-Fisher state (None for
    ``task_metric="ones"``), both states checked against the model (every mismatch in one ValueError)."""
    bindings = find_lora_layers(model, config.layers)
    state.check(model, config.layers)
    task_state = config.task_metric if isinstance(config.task_metric, AlignmentState) else None
    if task_state is not None:
        try:
            task_state.check(model, config.layers)
        except ValueError as exc:
            raise ValueError(f"AGLLoss: the task metric (task Fisher) state does not match the model: {exc}") from None
    return [Entry(b.name, a.adapter, b, a.A, a.B, a.scaling) for b in bindings for a in b.adapters], task_state


def factors(entries: List[Entry], tensors: Optional[List[Tensor]] = None):
    """(Ls, Rs, scales): every entry's update in the base weight's orientation, ΔW = s · L @ R (``fan_in_fan_out``
    layers store the weight (in, out), so their factors are transposed: L = Aᵀ, R = Bᵀ). ``tensors``: the factors
    to use instead of the entries' own, ``[A_0, B_0, A_1, B_1, ...]`` (e.g. FSDP2 shards gathered whole)."""
    Ls, Rs, scales = [], [], []
    for i, e in enumerate(entries):
        A, B = (e.A, e.B) if tensors is None else (tensors[2 * i], tensors[2 * i + 1])
        L, R = (A.t(), B.t()) if e.binding.fan_in_fan_out else (B, A)
        Ls.append(L)
        Rs.append(R)
        scales.append(e.scaling)
    return Ls, Rs, scales


def half_sq_norm(Ls: List[Tensor], Rs: List[Tensor], scales: List[float]) -> Tensor:
    """½·Σ_l ‖ΔW_l‖²_F (0-dim, differentiable) of the updates ΔW_l = s_l·L_l R_l (L_l (m, r), R_l (r, n), as
    :func:`factors` gives them) without forming ΔW: ‖L R‖²_F = tr(Rᵀ LᵀL R) = ⟨LᵀL, R Rᵀ⟩, two r x r Gram
    matrices, O((m + n)·r²) per layer (``AGLConfig(curvature="identity")``, the L2-SP penalty)."""
    return 0.5 * sum(s * s * ((L.t() @ L) * (R @ R.t())).sum() for L, R, s in zip(Ls, Rs, scales))


def unit_scales(entries: List[Entry], state: AlignmentState, task_state: Optional[AlignmentState], units: str):
    """(c, c_H, w0_sq) for ``agl.units.unit_terms``: the alignment state's ``nats_scale``, the task state's (None
    without one) and, in nats without a task Fisher, Σ_l ‖W0_l‖²_F over the frozen base weights (float64; an FSDP2
    DTensor's rows all-reduced), else None."""
    w0_sq = None
    if task_state is None and units == "nats":
        w0_sq = sum(sq_norm(e.binding.module.get_base_layer().weight) for e in entries)
        if not w0_sq > 0:
            raise ValueError("AGLLoss: the adapted base weights are all zero, so the task term's relative size "
                             "‖ΔW_T‖²/‖W0‖² is undefined; give a task Fisher (`task_metric`) or units='paper'")
    return float(state.nats_scale), None if task_state is None else float(task_state.nats_scale), w0_sq


def cross_curvature(entries: List[Entry], state: AlignmentState) -> Tuple[List[int], CrossCurvature]:
    """The cross-layer penalty (``agl.curvature``) over the entries whose layer has U, V and a projected gradient C,
    and those entries' indices."""
    if not state.has_cross:
        raise ValueError("AGLLoss: curvature='cross' needs the per-sample gradients projected on the subspaces, "
                         "and this state has none: estimate it with estimate_alignment_state(..., "
                         "cross_curvature=True) or add them with agl.curvature.estimate_cross_curvature")
    idx = [i for i, e in enumerate(entries) if state.layers[e.name].C is not None]
    if not idx:
        raise ValueError("AGLLoss: curvature='cross': none of the adapted layers has a projected gradient C")
    Us, Vs, Cs = [], [], []
    for i in idx:
        ls = state.layers[entries[i].name]
        if tuple(ls.C.shape[1:]) != (ls.U.shape[1], ls.V.shape[1]):
            raise ValueError(f"AGLLoss: {entries[i].name}: C is {tuple(ls.C.shape)}, expected (N, "
                             f"{ls.U.shape[1]}, {ls.V.shape[1]}) from its U and V")
        Us.append(ls.U)
        Vs.append(ls.V)
        Cs.append(ls.C)
    return idx, CrossCurvature(Us, Vs, Cs, state.cross_tokens)


def layers_dict(entries: List[Entry], values: Tensor, names) -> Dict[str, Dict[str, float]]:
    """(L, k) per-layer values -> {entry key: {name: float}} (one host copy)."""
    return {e.key: dict(zip(names, row)) for e, row in zip(entries, values.double().tolist())}
