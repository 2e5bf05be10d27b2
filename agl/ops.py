"""The fused AGL custom ops (``torch.ops.agl.terms_fwd`` / ``terms_bwd``), their fakes and their autograd.

The C++ extension (``agl._C``, loaded through ``agl._load``) defines

    agl::terms_fwd(B, A, B_align?, A_align?, fisher?, task_metric?, align_mask?, scale, beta, tau, sharpness, eps)
        -> (terms (4,) = [align, task, overlap, geodesic],
            sums (5,)  = [sum G*D_A^2, sum H*D_T^2, sum eta*|D_A|*|D_T|, sum G*D_A*D_T, sum G*D_T^2])
    agl::terms_bwd(grad_terms, sums, <same inputs>) -> (grad_B, grad_A, grad_B_align, grad_A_align)

in the accumulation dtype (float64 for float64 factors, float32 otherwise), with align = S0/N, task = S1/N,
overlap = S2/N, geodesic = S3^2/(S0*S4 + eps), N = m*n. The sums are a by-product the backward needs; they are not
differentiable (their gradient is ignored). ``fisher``, ``task_metric`` and ``align_mask`` are not differentiated.
Shapes: B (m, r), A (r, n), B_align (m, r'), A_align (r', n); fisher, task_metric, align_mask (m, n).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from agl import _load
from agl._checks import check_inputs
from agl.reference import AGLTerms

__all__ = ["available", "supports_device", "with_cuda", "agl_terms_kernel", "SUM_NAMES", "TERM_NAMES"]

SUM_NAMES = ("align", "task", "overlap", "cross", "task_fisher")
TERM_NAMES = ("align", "task", "overlap", "geodesic")
_EXT = _load.extension()


def available() -> bool:
    """True when the compiled extension is loaded (``agl._load.load_error()`` says why when not)."""
    return _EXT is not None


def with_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    return _EXT is not None and bool(_EXT.with_cuda())


def supports_device(device) -> bool:
    """True when the fused op has kernels for ``device`` (a torch.device or its string)."""
    if _EXT is None:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return with_cuda()
    return False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _EXT is not None:

    def _fake_check(B, A, B_align, A_align, fisher, task_metric, align_mask, scalars):
        # The fakes also run for meta tensors, and for calls mixing a meta tensor with real ones (the dispatcher then
        # picks the Meta kernel): validate like the real kernels so such calls fail clearly instead of returning
        # uninitialised memory. scalars: (scale, beta, tau, sharpness, eps).
        scalars = [float(v) if isinstance(v, (int, float)) else 1.0 for v in scalars]  # SymFloats: not checked here
        check_inputs(B, A, B_align, A_align, fisher, task_metric, align_mask, *scalars)

    @torch.library.register_fake("agl::terms_fwd")
    def _terms_fwd_fake(B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps):
        _fake_check(B, A, B_align, A_align, fisher, task_metric, align_mask, (scale, beta, tau, sharpness, eps))
        acc = _acc_dtype(B.dtype)
        return B.new_empty((4,), dtype=acc), B.new_empty((5,), dtype=acc)

    @torch.library.register_fake("agl::terms_bwd")
    def _terms_bwd_fake(grad_terms, sums, B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau,
                        sharpness, eps):
        _fake_check(B, A, B_align, A_align, fisher, task_metric, align_mask, (scale, beta, tau, sharpness, eps))
        for name, t, k in (("grad_terms", grad_terms, 4), ("sums", sums, 5)):
            if t.dim() != 1 or t.shape[0] != k or t.device != B.device:
                raise ValueError(f"agl: `{name}` must have shape ({k},) on {B.device}, got {tuple(t.shape)} "
                                 f"on {t.device}")
        m, r = B.shape
        n = A.shape[1]
        ra = B_align.shape[1] if B_align is not None else 0
        return (B.new_empty((m, r)), B.new_empty((r, n)), B.new_empty((m, ra)), B.new_empty((ra, n)))

    def _setup_context(ctx, inputs, output):
        B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps = inputs
        sums = output[1]
        ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(B, A, B_align, A_align, fisher, task_metric, align_mask, sums)
        ctx.scalars = (scale, beta, tau, sharpness, eps)

    def _backward(ctx, grad_terms, grad_sums):  # grad_sums: the sums are not differentiable, ignored
        B, A, B_align, A_align, fisher, task_metric, align_mask, sums = ctx.saved_tensors
        if grad_terms is None:
            grad_terms = sums.new_zeros((4,))
        gB, gA, gBa, gAa = torch.ops.agl.terms_bwd(
            grad_terms, sums, B, A, B_align, A_align, fisher, task_metric, align_mask, *ctx.scalars
        )
        need = ctx.needs_input_grad
        return (
            gB if need[0] else None,
            gA if need[1] else None,
            gBa if (B_align is not None and need[2]) else None,
            gAa if (A_align is not None and need[3]) else None,
            None, None, None, None, None, None, None, None,
        )

    torch.library.register_autograd("agl::terms_fwd", _backward, setup_context=_setup_context)

    class _TermsFwd(torch.autograd.Function):
        """Eager autograd of ``agl::terms_fwd`` with the same setup/backward as the registration above, without the
        per-call Python cost of the wrapper that ``register_autograd`` generates (it fills defaults from the schema
        and redispatches: ~0.25 ms per call, as much as the kernel itself on a 192x576 rank-8 layer)."""

        @staticmethod
        def forward(ctx, B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps):
            inputs = (B, A, B_align, A_align, fisher, task_metric, align_mask, scale, beta, tau, sharpness, eps)
            out = torch.ops.agl.terms_fwd(*inputs)  # grad mode is off here: straight to the kernel
            _setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, grad_terms, grad_sums):
            return _backward(ctx, grad_terms, grad_sums)


def agl_terms_kernel(
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
    """The four AGL terms from the fused op (see :func:`agl.functional.agl_terms`); 16-bit factors give float32."""
    if _EXT is None:
        raise RuntimeError(f"agl: the fused kernel is unavailable: {_load.load_error()}")
    inputs = (B, A, B_align, A_align, fisher, task_metric, align_mask,
              float(scale), float(beta), float(tau), float(sharpness), float(eps))
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        terms, _ = _TermsFwd.apply(*inputs)  # eager: the lean autograd path (same kernels, same results)
    else:
        terms, _ = torch.ops.agl.terms_fwd(*inputs)  # traced graphs (and no-grad calls) see the custom op itself
    return AGLTerms(*terms.unbind())  # one view op (and one autograd node) instead of four selects
