"""The fused AGL custom ops (``torch.ops.agl.terms_fwd`` / ``terms_bwd`` per layer, ``terms_grouped_fwd`` /
``terms_grouped_bwd`` for many layers in one call), their fakes and their autograd.

The C++ extension (``agl._C``, loaded through ``agl._load``) defines

    agl::terms_fwd(B, A, B_align?, A_align?, fisher?, task_metric?, align_mask?, scale, beta, tau, sharpness, eps)
        -> (terms (4,) = [align, task, overlap, geodesic],
            sums (5,)  = [sum G*D_A^2, sum H*D_T^2, sum eta*|D_A|*|D_T|, sum G*D_A*D_T, sum G*D_T^2])
    agl::terms_bwd(grad_terms, sums, <same inputs>) -> (grad_B, grad_A, grad_B_align, grad_A_align)

in the accumulation dtype (float64 for float64 factors, float32 otherwise), with align = S0/N, task = S1/N,
overlap = S2/N, geodesic = S3^2/(S0*S4 + eps), N = m*n. The sums are a by-product the backward needs; they are not
differentiable (their gradient is ignored). ``fisher``, ``task_metric`` and ``align_mask`` are not differentiated.
Shapes: B (m, r), A (r, n), B_align (m, r'), A_align (r', n); fisher, task_metric, align_mask (m, n).

    agl::terms_grouped_fwd(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                           eps) -> (terms (L, 4), sums (L, 5))
    agl::terms_grouped_bwd(grad_terms, sums, <same inputs>) -> (grad_Bs, grad_As, grad_B_aligns, grad_A_aligns)

the same for L layers at once (lists of per-layer tensors; see ``csrc/agl_grouped_ops.cpp`` and
:func:`agl.functional.agl_terms_grouped`); row l is bitwise what ``terms_fwd`` gives for layer l alone.
A bench/test build (``AGL_BENCH_OPS=1``, what ``make build`` makes) adds ``agl_bench::terms_grouped_null`` /
``terms_grouped_null_bwd``: the same arguments, only the outputs allocated (the benchmarks' floor; see
:func:`has_null_ops`). Inputs are validated once per path: by the C++ glue (csrc/agl_glue.cpp; its messages reach
Python as the ValueError / TypeError they raise), or by the fakes under tracing / meta with ``agl._checks``, whose
messages tests/test_ops.py and tests/test_grouped.py hold equal to the C++ ones case by case.
One autograd path per op: the ``register_autograd`` registrations below, for eager calls and traced graphs alike.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from agl import _load
from agl._checks import check_grouped, check_inputs
from agl.reference import AGLTerms

__all__ = ["available", "supports_device", "with_cuda", "agl_terms_kernel", "agl_terms_grouped_kernel",
           "set_cuda_grouped", "cuda_grouped_status", "has_null_ops", "SUM_NAMES", "TERM_NAMES"]

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


def has_null_ops() -> bool:
    """True when the extension is a bench/test build with the do-nothing ``agl_bench::terms_grouped_null`` ops."""
    return _EXT is not None and hasattr(torch.ops.agl_bench, "terms_grouped_null")


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

    # ---- grouped ----
    def _real(v):  # SymFloats (under tracing) are not checked here
        return float(v) if isinstance(v, (int, float)) else 1.0

    def _grouped_check(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps):
        check_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, [_real(v) for v in scales],
                      *(_real(v) for v in (beta, tau, sharpness, eps)))

    def _grouped_out_dtype(Bs):
        return torch.float64 if any(B.dtype == torch.float64 for B in Bs) else torch.float32

    def _grouped_grad_shapes(Bs, As, B_aligns, Us, Vs):
        """Shapes of grad_Bs, grad_As, grad_B_aligns, grad_A_aligns (align pairs formed from U/V get no own grads)."""
        project = bool(Us) or bool(Vs)
        ras = [0 if project or not B_aligns or B_aligns[l] is None else B_aligns[l].shape[1] for l in range(len(Bs))]
        return ([B.shape for B in Bs], [A.shape for A in As], [(B.shape[0], ra) for B, ra in zip(Bs, ras)],
                [(ra, A.shape[1]) for A, ra in zip(As, ras)])

    @torch.library.register_fake("agl::terms_grouped_fwd")
    def _grouped_fwd_fake(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                          eps):
        _grouped_check(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps)
        acc = _grouped_out_dtype(Bs)
        return Bs[0].new_empty((len(Bs), 4), dtype=acc), Bs[0].new_empty((len(Bs), 5), dtype=acc)

    @torch.library.register_fake("agl::terms_grouped_bwd")
    def _grouped_bwd_fake(grad_terms, sums, Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta,
                          tau, sharpness, eps):
        _grouped_check(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps)
        L = len(Bs)
        for name, t, k in (("grad_terms", grad_terms, 4), ("sums", sums, 5)):
            if tuple(t.shape) != (L, k) or t.device != Bs[0].device:
                raise ValueError(f"agl: `{name}` must have shape ({L}, {k}) on {Bs[0].device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
        shapes = _grouped_grad_shapes(Bs, As, B_aligns, Us, Vs)
        return tuple([B.new_empty(s) for B, s in zip(Bs, ss)] for ss in shapes)

    _GROUPED_LISTS = 8  # Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics

    def _grouped_setup_context(ctx, inputs, output):
        lists, scalars = inputs[:_GROUPED_LISTS], inputs[_GROUPED_LISTS:]
        ctx.mark_non_differentiable(output[1])
        ctx.lens = [len(x) for x in lists]
        ctx.save_for_backward(*(t for x in lists for t in x), output[1])
        ctx.scalars = (list(scalars[0]),) + tuple(scalars[1:])

    def _grouped_none(lst):
        """The "no gradient" entry for a list input: a list of Nones when autograd saw it as a list of tensors (all
        entries tensors, or empty), else None (a list holding None is a single non-tensor argument to autograd)."""
        return [None] * len(lst) if all(isinstance(t, Tensor) for t in lst) else None

    def _make_grouped_backward(bwd_op):
        def backward(ctx, grad_terms, grad_sums):  # grad_sums: the sums are not differentiable, ignored
            saved = ctx.saved_tensors
            sums, it = saved[-1], iter(saved[:-1])
            lists = [[next(it) for _ in range(n)] for n in ctx.lens]
            if grad_terms is None:
                grad_terms = sums.new_zeros((len(lists[0]), 4))
            grads = bwd_op(grad_terms, sums, *lists, *ctx.scalars)
            out = []
            for k in range(_GROUPED_LISTS):
                need = ctx.needs_input_grad[k]
                if k >= 4 or not isinstance(need, list):
                    out.append(_grouped_none(lists[k]))
                    continue
                out.append([g if (nd and lists[k][l] is not None) else None
                            for l, (g, nd) in enumerate(zip(grads[k], need))])
            return tuple(out) + (None,) * 5
        return backward

    torch.library.register_autograd("agl::terms_grouped_fwd", _make_grouped_backward(torch.ops.agl.terms_grouped_bwd),
                                    setup_context=_grouped_setup_context)
    if has_null_ops():
        torch.library.register_autograd("agl_bench::terms_grouped_null",
                                        _make_grouped_backward(torch.ops.agl_bench.terms_grouped_null_bwd),
                                        setup_context=_grouped_setup_context)


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
    terms, _ = torch.ops.agl.terms_fwd(*inputs)
    return AGLTerms(*terms.unbind())  # one view op (and one autograd node) instead of four selects


def agl_terms_grouped_kernel(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness,
                             eps, null: bool = False) -> Tensor:
    """The (L, 4) terms from ``agl::terms_grouped_fwd`` (``null``: the do-nothing provider of a bench/test build);
    lists as normalised by :func:`agl._checks.grouped_lists` (see :func:`agl.functional.agl_terms_grouped`)."""
    if _EXT is None:
        raise RuntimeError(f"agl: the fused kernel is unavailable: {_load.load_error()}")
    if null and not has_null_ops():
        raise RuntimeError("agl: `null=True` needs a bench/test build of the extension (AGL_BENCH_OPS=1, as "
                           "`make build` does)")
    if any(t is None for t in B_aligns) or any(t is None for t in A_aligns):
        # autograd sees a tensor list holding None as one opaque argument (no gradients for its tensors): stand an
        # empty (m, 0) x (0, n) pair in for a missing one (D_A = 0, exactly what "no align pair" means)
        # (only where both are missing: a half pair is left for the op to report)
        pairs = [(Ba, Aa) if (Ba is not None or Aa is not None) else (B.new_empty((B.shape[0], 0)),
                                                                        A.new_empty((0, A.shape[1])))
                 for B, A, Ba, Aa in zip(Bs, As, B_aligns, A_aligns)]
        B_aligns, A_aligns = [p[0] for p in pairs], [p[1] for p in pairs]
    op = torch.ops.agl_bench.terms_grouped_null if null else torch.ops.agl.terms_grouped_fwd
    terms, _ = op(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, float(beta), float(tau),
                  float(sharpness), float(eps))
    return terms


def set_cuda_grouped(enable: bool) -> bool:
    """Switch the opt-in single-launch CUDA implementation of the grouped op on or off (default: off, or on with
    ``AGL_CUDA_GROUPED=1`` in the environment at import). Returns whether it is now in use, i.e. switched on and
    compiled into this build; otherwise the grouped op loops over the verified per-layer CUDA kernels."""
    if _EXT is None:
        raise RuntimeError(f"agl: the fused kernel is unavailable: {_load.load_error()}")
    return bool(_EXT.set_cuda_grouped(bool(enable)))


def cuda_grouped_status() -> dict:
    """``{"enabled": bool, "implementation": name or None}`` of the opt-in CUDA grouped implementation."""
    if _EXT is None:
        return {"enabled": False, "implementation": None}
    enabled, name = _EXT.cuda_grouped_status()
    return {"enabled": bool(enabled), "implementation": name}
