"""The unit conversions of the AGL terms (docs/MATH.md §7): pure functions from the (L, 4) matrix ``T`` of per-layer
means that ``agl_terms_grouped`` returns (columns ``TERMS``; row l = layer and adapter l) to the quantities
``AGLConfig.units`` names. ``numel`` (L,) holds N_l = m_l·n_l on ``T``'s device and dtype, so per-layer sums are
``T_l · N_l``; ``nats_scale`` c converts Σ F̃ ΔW² (mean-1 Fisher) to nats per token (``AlignmentState.nats_scale``).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

__all__ = ["TERMS", "UNITS", "layer_align_nats", "unit_terms"]

TERMS = ("align", "task", "overlap", "geodesic")  # the columns of T
UNITS = ("nats", "paper")


def unit_terms(T: Tensor, numel: Tensor, units: str, nats_scale: float, task_nats_scale: Optional[float] = None,
               w0_sq: Optional[float] = None) -> Dict[str, Tensor]:
    """The four ``TERMS`` in ``units`` and ``align_nats`` (0-dim tensors) from ``T`` (L, 4).

    ``units="nats"``: align = ½cΣ_l N_l T_l0 (= align_nats); task = ½c_H Σ_l N_l T_l1 with a task Fisher
    (``task_nats_scale`` c_H), else Σ_l N_l T_l1 / Σ_l ‖W0_l‖² (``w0_sq``: the relative size); overlap =
    ½cΣ_l N_l T_l2; geodesic = Σ_l T_l3 · ½cN_l T_l0 (each layer's cos² weighted by its align nats).
    ``units="paper"``: the column means over layers (align_nats is still in nats)."""
    sums = T * numel[:, None]
    align_l = 0.5 * nats_scale * sums[:, 0]
    out = {"align_nats": align_l.sum()}
    if units == "paper":
        out.update(zip(TERMS, T.mean(0).unbind()))
        return out
    task = sums[:, 1].sum()
    task = 0.5 * task_nats_scale * task if task_nats_scale is not None else task / w0_sq
    out.update(align=out["align_nats"], task=task, overlap=0.5 * nats_scale * sums[:, 2].sum(),
               geodesic=(align_l * T[:, 3]).sum())
    return out


def layer_align_nats(T: Tensor, numel: Tensor, nats_scale: float) -> Tensor:
    """(L,) each layer's align_nats, ½·c·T_l0·N_l (what ``last_terms["layers"]`` logs beside the means)."""
    return 0.5 * nats_scale * T[:, 0] * numel
