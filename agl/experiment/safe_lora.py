"""The Safe LoRA baseline (Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large
Language Models", NeurIPS 2024): project the fine-tuned update of the layers that stray from the alignment direction.

For every adapted layer (weights in (out, in) orientation, m x n):

    V = W_aligned - W_base                       the alignment matrix (m x n): what safety training changed
    C = V V^T / ||V||_F                          (m x m), the paper's cheap stand-in for the projector onto V's columns
    ΔW = s B A                                   the LoRA update (B: m x r, A: r x n)
    sim = <C ΔW, ΔW>_F / (||C ΔW||_F ||ΔW||_F)    cosine similarity of the projected and the original update
    ΔW' = C ΔW = s (C B) A   when sim < τ         (so the projected adapter is a LoRA adapter with B' = C B)

Here the aligned start is the base model plus a merged SFT adapter, so V is exactly that adapter's update. The
threshold τ is chosen on dev data by the pre-registered rule of docs/EXPERIMENT.md (``choose_threshold``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

__all__ = ["alignment_projections", "projection_matrix", "cosine", "layer_similarities", "candidate_thresholds",
           "apply_projection"]

_PEFT_PREFIX = "base_model.model."


def projection_matrix(V: torch.Tensor) -> torch.Tensor:
    """``C = V V^T / ||V||_F`` (m x m) for an alignment matrix ``V`` (m x n), in float64. A zero V raises: a layer
    that safety training did not change has no alignment direction."""
    V = V.detach().to(torch.float64)
    norm = torch.linalg.matrix_norm(V)
    if not norm > 0:
        raise ValueError("Safe LoRA: the alignment matrix V = W_aligned - W_base is zero for this layer")
    return (V @ V.t()) / norm


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius cosine ``<a, b> / (||a|| ||b||)``; 0 when either is zero."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    den = float(torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))
    return float((a * b).sum()) / den if den > 0 else 0.0


def _base_name(lora_name: str) -> str:
    return lora_name[len(_PEFT_PREFIX):] if lora_name.startswith(_PEFT_PREFIX) else lora_name


def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.t() if fan_in_fan_out else weight


def alignment_projections(peft_model, base_model) -> Dict[str, torch.Tensor]:
    """``C`` of every LoRA layer of ``peft_model`` (a LoRA model on top of the aligned start, whose frozen base
    weights *are* W_aligned), with W_base from ``base_model`` (same architecture, no adapter). Keys: the LoRA
    layers' qualified names."""
    from agl.peft_binding import find_lora_layers

    base_mods = dict(base_model.named_modules())
    out = {}
    for b in find_lora_layers(peft_model):
        name = _base_name(b.name)
        if name not in base_mods:
            raise ValueError(f"Safe LoRA: layer {name!r} of the fine-tuned model is not in the base model")
        W_al = _oriented(b.module.get_base_layer().weight, b.fan_in_fan_out)
        W_base = _oriented(base_mods[name].weight, b.fan_in_fan_out)
        out[b.name] = projection_matrix(W_al.detach().cpu() - W_base.detach().cpu())
    return out


def _updates(peft_model):
    """(name, adapter factors, ΔW = s B A in (out, in) orientation, float64 on the CPU) per LoRA adapter."""
    from agl.peft_binding import find_lora_layers

    for b in find_lora_layers(peft_model):
        for a in b.adapters:
            dW = a.scaling * (a.B.detach().cpu().to(torch.float64) @ a.A.detach().cpu().to(torch.float64))
            yield b.name, a, dW


def layer_similarities(peft_model, projections: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``cos(C ΔW, ΔW)`` per LoRA layer."""
    return {name: cosine(projections[name] @ dW, dW) for name, _, dW in _updates(peft_model)}


def candidate_thresholds(similarities: Sequence[float], fractions: Sequence[float]) -> List[float]:
    """For each fraction f, the threshold τ that projects ``ceil(f · n)`` of the ``n`` similarities (those
    strictly below τ): the midpoint between the k-th and (k+1)-th smallest, or just above the largest for f = 1."""
    s = sorted(float(x) for x in similarities)
    if not s:
        raise ValueError("Safe LoRA: no layer similarities to choose a threshold from")
    out = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"Safe LoRA: fraction must be in (0, 1], got {f!r}")
        k = min(len(s), max(1, math.ceil(f * len(s) - 1e-9)))
        out.append(s[-1] + max(1e-12, abs(s[-1]) * 1e-9) if k == len(s) else 0.5 * (s[k - 1] + s[k]))
    return out


@torch.no_grad()
def apply_projection(peft_model, projections: Dict[str, torch.Tensor], tau: float) -> Dict[str, dict]:
    """Replaces ``B`` by ``C B`` (so ΔW by C ΔW) in every layer whose similarity is below ``tau``, in place.
    Returns per layer ``{"similarity", "projected"}``."""
    out = {}
    for name, a, dW in list(_updates(peft_model)):
        C = projections[name]
        sim = cosine(C @ dW, dW)
        hit = sim < tau
        if hit:
            a.B.copy_((C @ a.B.detach().cpu().to(torch.float64)).to(a.B.dtype).to(a.B.device))
        out[name] = {"similarity": sim, "projected": bool(hit)}
    return out
