"""Pure-PyTorch reference of the AlignGuard-LoRA (AGL) penalty terms.

This module is the oracle the tests compare the fused kernels against and the baseline the benchmarks time.
It materialises every m x n tensor on purpose: one obvious line per formula, float64-safe.

Shapes: B (m, r), A (r, n), B_align (m, r'), A_align (r', n); fisher, task_metric, align_mask (m, n).

    D   = s * B @ A
    D_A = s * B_align @ A_align         (or align_mask * D in mask mode)
    D_T = D - D_A
    G   = fisher or 1 ;  H = task_metric or 1 ;  eta = 1 + beta * sigmoid(sharpness * (|D| - tau))
    align    = mean(G * D_A**2)
    task     = mean(H * D_T**2)
    overlap  = mean(eta * |D_A| * |D_T|)
    geodesic = (sum G*D_A*D_T)**2 / ((sum G*D_A**2) * (sum G*D_T**2) + eps)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class AGLTerms(NamedTuple):
    """The four AGL penalty terms, each a 0-dim tensor."""

    align: Tensor
    task: Tensor
    overlap: Tensor
    geodesic: Tensor


def agl_terms(
    B: Tensor,
    A: Tensor,
    B_align: Optional[Tensor] = None,
    A_align: Optional[Tensor] = None,
    *,
    fisher: Optional[Tensor] = None,
    task_metric: Optional[Tensor] = None,
    align_mask: Optional[Tensor] = None,
    scale: float = 1.0,
    beta: float = 4.0,
    tau: float = 0.01,
    sharpness: float = 100.0,
    eps: float = 1e-12,
) -> AGLTerms:
    """Reference AGL terms; see the module docstring for the math. Returns an :class:`AGLTerms`."""
    from agl._checks import check_inputs

    check_inputs(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps)
    S = agl_sums(B, A, B_align, A_align, fisher=fisher, task_metric=task_metric, align_mask=align_mask, scale=scale,
                 beta=beta, tau=tau, sharpness=sharpness)
    return AGLTerms(*terms_from_sums(S, B.shape[0] * A.shape[1], eps).unbind(-1))


def agl_sums(B: Tensor, A: Tensor, B_align: Optional[Tensor] = None, A_align: Optional[Tensor] = None, *,
             fisher: Optional[Tensor] = None, task_metric: Optional[Tensor] = None, align_mask: Optional[Tensor] = None,
             scale: float = 1.0, beta: float = 4.0, tau: float = 0.01, sharpness: float = 100.0) -> Tensor:
    """The five grid sums (5,) = [Σ G D_A², Σ H D_T², Σ η |D_A| |D_T|, Σ G D_A D_T, Σ G D_T²] (docs/MATH.md §2),
    differentiable. Rows of D depend only on rows of B, so the sums of a row block of the grid are this function
    of ``B[r0:r1]`` (and ``B_align``, ``fisher``, ... rows): sums of row blocks add up to the whole grid's."""
    D = scale * (B @ A)
    if align_mask is not None:
        D_A = align_mask.to(D.dtype) * D
    elif B_align is not None:
        D_A = scale * (B_align @ A_align)
    else:
        D_A = torch.zeros_like(D)
    D_T = D - D_A
    G = fisher.to(D.dtype) if fisher is not None else torch.ones_like(D)
    H = task_metric.to(D.dtype) if task_metric is not None else torch.ones_like(D)
    eta = 1 + beta * torch.sigmoid(sharpness * (D.abs() - tau))
    return torch.stack([(G * D_A**2).sum(), (H * D_T**2).sum(), (eta * D_A.abs() * D_T.abs()).sum(),
                        (G * D_A * D_T).sum(), (G * D_T**2).sum()])


def terms_from_sums(S: Tensor, N, eps: float) -> Tensor:
    """(..., 4) terms [align, task, overlap, geodesic] from (..., 5) sums over N = m·n elements (N a number or a
    tensor broadcasting against ``S[..., 0]``): S0/N, S1/N, S2/N, S3²/(S0·S4 + eps); the mirror of
    ``terms_from_sums`` in csrc/agl_math.h."""
    S0, S1, S2, S3, S4 = S.unbind(-1)
    return torch.stack([S0 / N, S1 / N, S2 / N, S3 * S3 / (S0 * S4 + eps)], dim=-1)
