"""Functional API: ``agl_terms`` picks the fused kernel or the pure-PyTorch reference.

Shapes: B (m, r), A (r, n), B_align (m, r'), A_align (r', n); fisher, task_metric, align_mask (m, n).
See ``agl.reference`` for the math and docs/MATH.md for the derivation of the backward.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from agl import reference
from agl._checks import check_inputs
from agl.reference import AGLTerms

__all__ = ["AGLTerms", "agl_terms", "kernel_supports"]

_BACKENDS = ("auto", "kernel", "torch")


def kernel_supports(device) -> bool:
    """True when the compiled extension has kernels for ``device`` (a torch.device or its string)."""
    from agl import ops

    return ops.supports_device(device)


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
    backend: str = "auto",
) -> AGLTerms:
    """The four AGL terms ``(align, task, overlap, geodesic)`` as 0-dim tensors, differentiable w.r.t. the factors.

    ``backend``: ``"kernel"`` (the fused C++/CUDA op; never materialises an m x n tensor), ``"torch"`` (the
    reference) or ``"auto"`` (the kernel when the extension supports the inputs' device, else the reference).
    With the kernel, 16-bit factors give float32 terms (the kernel accumulates in float32).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"agl: `backend` must be one of {_BACKENDS}, got {backend!r}")
    check_inputs(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps)
    if backend == "auto":
        backend = "kernel" if kernel_supports(B.device) else "torch"
    if backend == "torch":
        return reference.agl_terms(
            B, A, B_align, A_align, fisher=fisher, task_metric=task_metric, align_mask=align_mask,
            scale=scale, beta=beta, tau=tau, sharpness=sharpness, eps=eps,
        )
    from agl import ops

    return ops.agl_terms_kernel(
        B, A, B_align, A_align, fisher=fisher, task_metric=task_metric, align_mask=align_mask,
        scale=float(scale), beta=float(beta), tau=float(tau), sharpness=float(sharpness), eps=float(eps),
    )
