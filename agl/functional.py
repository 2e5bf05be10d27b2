"""Functional API: ``agl_terms`` (one layer) and ``agl_terms_grouped`` (many layers, one op call) pick the fused
kernel or the pure-PyTorch reference.

Shapes: B (m, r), A (r, n), B_align (m, r'), A_align (r', n); fisher, task_metric, align_mask (m, n).
See ``agl.reference`` for the math and docs/MATH.md for the derivation of the backward.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from agl import reference
from agl._checks import check_grouped, check_inputs, grouped_lists
from agl.reference import AGLTerms

__all__ = ["AGLTerms", "agl_terms", "agl_terms_grouped", "kernel_supports"]

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
    if backend == "auto":
        backend = "kernel" if isinstance(B, Tensor) and kernel_supports(B.device) else "torch"
    if backend == "torch":  # the kernel path validates in C++ (and in the fake under tracing): once per path
        check_inputs(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps)
        return reference.agl_terms(
            B, A, B_align, A_align, fisher=fisher, task_metric=task_metric, align_mask=align_mask,
            scale=scale, beta=beta, tau=tau, sharpness=sharpness, eps=eps,
        )
    from agl import ops

    for name, v in (("scale", scale), ("beta", beta), ("tau", tau), ("sharpness", sharpness), ("eps", eps)):
        if isinstance(v, (Tensor, bool)) or not isinstance(v, (int, float)):
            raise TypeError(f"agl: `{name}` must be a Python float, got {type(v).__name__}")
    return ops.agl_terms_kernel(
        B, A, B_align, A_align, fisher=fisher, task_metric=task_metric, align_mask=align_mask,
        scale=float(scale), beta=float(beta), tau=float(tau), sharpness=float(sharpness), eps=float(eps),
    )


TensorList = Sequence[Optional[Tensor]]


def agl_terms_grouped(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    B_aligns: Optional[TensorList] = None,
    A_aligns: Optional[TensorList] = None,
    *,
    Us: Optional[TensorList] = None,
    Vs: Optional[TensorList] = None,
    fishers: Optional[TensorList] = None,
    task_metrics: Optional[TensorList] = None,
    scales: Union[float, Sequence[float]],
    beta: float = 4.0,
    tau: float = 0.01,
    sharpness: float = 100.0,
    eps: float = 1e-12,
    backend: str = "auto",
) -> Tensor:
    """The four AGL terms of L layers as one ``(L, 4)`` tensor (columns align, task, overlap, geodesic; row l is
    layer l), differentiable w.r.t. every ``Bs[l]``, ``As[l]``, ``B_aligns[l]``, ``A_aligns[l]``.

    Layer l is ``agl_terms(Bs[l], As[l], B_aligns[l], A_aligns[l], fisher=fishers[l], task_metric=task_metrics[l],
    scale=scales[l], ...)``; layers may differ in shape and dtype. Optional lists are None or hold one entry (or
    None) per layer; ``scales`` is one float per layer (or one float for all).

    ``Us`` / ``Vs`` (per layer (m, k) / (n, k), None allowed; instead of ``B_aligns`` / ``A_aligns``): every layer's
    alignment pair is formed inside the op, ``B_align = U (Uᵀ B)`` (``B`` where U is None) and
    ``A_align = (A V) Vᵀ`` (``A`` where V is None), and its gradient is chained back into ``B`` and ``A``; U and V
    are constants (no gradient). Giving both kinds is an error.

    Dtype: float64 when any layer has float64 factors, else float32 (16-bit factors accumulate in float32).
    ``backend``: ``"kernel"`` (one ``agl::terms_grouped_fwd`` call for all layers; on CPU one parallel region over
    every layer's row chunks; row l is bitwise what ``agl_terms`` gives for layer l alone), ``"torch"`` (the
    reference, layer by layer) or ``"auto"``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"agl: `backend` must be one of {_BACKENDS}, got {backend!r}")
    x = grouped_lists(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales)
    if backend == "auto":
        backend = "kernel" if kernel_supports(x["Bs"][0].device) else "torch"
    args = [x[k] for k in ("Bs", "As", "B_aligns", "A_aligns", "Us", "Vs", "fishers", "task_metrics", "scales")]
    if backend == "torch":
        check_grouped(*args, beta, tau, sharpness, eps)
        return _grouped_reference(*args, beta=beta, tau=tau, sharpness=sharpness, eps=eps)
    from agl import ops

    return ops.agl_terms_grouped_kernel(*args, beta, tau, sharpness, eps)


def _grouped_reference(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, **kw) -> Tensor:
    """``agl_terms_grouped`` with the reference, one layer at a time (lists as from ``grouped_lists``)."""
    opt = lambda lst, l: lst[l] if lst else None  # noqa: E731
    project = bool(Us) or bool(Vs)
    out = torch.float64 if any(B.dtype == torch.float64 for B in Bs) else torch.float32
    rows = []
    for l, (B, A) in enumerate(zip(Bs, As)):
        Ba, Aa = opt(B_aligns, l), opt(A_aligns, l)
        if project:
            U, V = opt(Us, l), opt(Vs, l)
            Ba = B if U is None else U @ (U.T @ B)
            Aa = A if V is None else (A @ V) @ V.T
        t = reference.agl_terms(B, A, Ba, Aa, fisher=opt(fishers, l), task_metric=opt(task_metrics, l),
                                scale=scales[l], **kw)
        rows.append(torch.stack(list(t)).to(out))
    return torch.stack(rows)
