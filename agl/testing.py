"""The shared harness of the op tests and benchmarks: random layer inputs, the per-layer and grouped runners, and the
tolerance rules that compare the kernels with the float64 reference (:mod:`agl.reference`).

A *layer* is a dict of tensors (``None`` where absent):

    B (m, r), A (r, n)          the LoRA factors
    Ba (m, r'), Aa (r', n)      the align pair (``B_align``, ``A_align``)
    F, H, M (m, n)              fisher, task metric, align mask

Values: factor entries ~ N(0, c²) with c = 0.35 / max(r, 1)^¼, so the entries of D = s·B·A straddle tau = 0.01 (eta's
sigmoid is neither flat 0 nor flat 1); F, H uniform in [0, 2), M uniform in [0, 1). They are drawn in float64 and
rounded to the requested dtype, so one seed gives the same numbers whatever the dtype.

Tolerance rules (kernel against reference, on the same inputs):

* float64: terms rtol 1e-10, atol 1e-14; grads rtol 1e-9, atol 1e-13 (:data:`F64_TERMS`, :data:`F64_GRADS`);
* float32 kernel against a float64 oracle: terms rtol 2e-5, atol 1e-9; grads rtol 1e-4, atol 1e-5·max|ref|;
* bfloat16/float16: the kernel's max error against the float64 reference is at most twice the error of the reference
  evaluated in that dtype, plus a floor of 1e-6·|ref| (the rule flash-attention uses).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
FACTORS = ("B", "A", "Ba", "Aa")
F64_TERMS = dict(rtol=1e-10, atol=1e-14)
F64_GRADS = dict(rtol=1e-9, atol=1e-13)
Layer = Dict[str, Optional[Tensor]]


def random_layer(g: torch.Generator, m: int, n: int, r: int, ra: Optional[int] = None, *, dtype=F64, mdtype=None,
                 fisher: bool = True, task: bool = True, mask: bool = False, device=None) -> Layer:
    """One layer drawn from ``g`` (a CPU generator) in the order B, A, [Ba, Aa], [F], [H], [M]; ``ra=None``: no align
    pair. Factors in ``dtype``, metrics in ``mdtype`` (default ``dtype``), all on ``device`` (default CPU)."""
    c = 0.35 / max(r, 1) ** 0.25
    mdtype = mdtype or dtype

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=F64) * c).to(device=device, dtype=dtype)

    def metric(hi):
        return (torch.rand(m, n, generator=g, dtype=F64) * hi).to(device=device, dtype=mdtype)

    x = dict(B=rnd(m, r), A=rnd(r, n), Ba=None, Aa=None, F=None, H=None, M=None)
    if ra is not None:
        x["Ba"], x["Aa"] = rnd(m, ra), rnd(ra, n)
    if fisher:
        x["F"] = metric(2)
    if task:
        x["H"] = metric(2)
    if mask:
        x["M"] = metric(1)
    return x


def random_layers(specs: Sequence[tuple], seed: int = 0, dtype=None) -> List[Layer]:
    """Layers from specs ``(m, n, r, r' or None, factor dtype, fisher?, task?)`` drawn from one generator; ``dtype``
    overrides every factor dtype. Metrics are float32 beside 16-bit factors, else in the factor dtype."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n, r, ra, dt, fisher, task in specs:
        dt = dtype or dt
        out.append(random_layer(g, m, n, r, ra, dtype=dt, mdtype=F32 if dt in (BF16, F16) else dt, fisher=fisher,
                                task=task))
    return out


def weights_for(L: int, seed: int = 1) -> Tensor:
    """(L, 4) float64 weights in [0.5, 3.5): the loss Σ W ⊙ terms is not the last op, so kernels that assume
    dL/dterms = 1 fail."""
    return torch.rand(L, 4, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3 + 0.5


def scales_for(layers: Sequence[Layer]) -> List[float]:
    return [0.7 + 0.1 * l for l in range(len(layers))]


def metrics_of(x: Layer) -> dict:
    """The layer's metrics as keyword arguments of ``agl_terms``."""
    return dict(fisher=x["F"], task_metric=x["H"], align_mask=x["M"])


def run_layer(x: Layer, backend: str = "kernel", *, scale: float = 1.0, weights: Optional[Tensor] = None,
              dtype=None, **kw) -> Tuple[List[Tensor], List[Tensor]]:
    """The four terms (0-dim, detached) of one layer and the grads of Σ_k w_k·term_k w.r.t. the factors present (B, A,
    Ba, Aa order). ``backend``: "kernel" (``agl.functional.agl_terms``) or "torch" (:func:`agl.reference.agl_terms`);
    ``weights`` (4,), default ``weights_for(1)[0]``, applied in the terms' dtype; ``dtype`` casts every input first;
    ``kw`` goes to the op (beta, tau, ...)."""
    from agl import reference
    from agl.functional import agl_terms

    def cast(t):
        return t if t is None or dtype is None else t.to(dtype)

    fs = [None if x[k] is None else cast(x[k]).detach().requires_grad_() for k in FACTORS]
    metrics = {k: cast(v) for k, v in metrics_of(x).items()}
    if backend == "torch":
        terms = reference.agl_terms(*fs, scale=scale, **metrics, **kw)
    else:
        terms = agl_terms(*fs, scale=scale, backend="kernel", **metrics, **kw)
    t = torch.stack(list(terms))
    w = weights_for(1)[0] if weights is None else weights
    grads = torch.autograd.grad((t * w.to(t)).sum(), [f for f in fs if f is not None])
    return list(t.detach().unbind()), list(grads)


def run_per_layer(layers: Sequence[Layer], weights: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
    """One kernel ``agl_terms`` call per layer at ``scales_for(layers)``: the (4,) rows and all grads in layer
    order; row l of ``weights`` (default ``weights_for(L)``) weights layer l."""
    W = weights_for(len(layers)) if weights is None else weights
    rows, grads = [], []
    for l, (x, s) in enumerate(zip(layers, scales_for(layers))):
        t, g = run_layer(x, scale=s, weights=W[l])
        rows.append(torch.stack(t))
        grads += g
    return rows, grads


def run_grouped(layers: Sequence[Layer], backend: str = "kernel", project=None,
                weights: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
    """(L, 4) terms of one ``agl_terms_grouped`` call at ``scales_for(layers)`` and the grads of Σ W ⊙ terms w.r.t.
    every factor present (layer order, then B, A, Ba, Aa). ``project=(Us, Vs)``: the op forms the align pairs from B,
    A and the projections (the layers' Ba/Aa are ignored)."""
    from agl.functional import agl_terms_grouped

    keys = FACTORS if project is None else ("B", "A")
    fac = [{k: (None if x[k] is None else x[k].detach().clone().requires_grad_()) for k in keys} for x in layers]
    kw = dict(fishers=[x["F"] for x in layers], task_metrics=[x["H"] for x in layers], scales=scales_for(layers))
    if project is None:
        kw.update(B_aligns=[f["Ba"] for f in fac], A_aligns=[f["Aa"] for f in fac])
    else:
        kw.update(Us=project[0], Vs=project[1])
    T = agl_terms_grouped([f["B"] for f in fac], [f["A"] for f in fac], backend=backend, **kw)
    W = weights_for(len(layers)) if weights is None else weights
    flat = [t for f in fac for t in f.values() if t is not None]
    grads = torch.autograd.grad((T * W.to(T)).sum(), flat)
    return T.detach(), list(grads)


# ---- tolerance rules ----
def assert_close_float64(terms, grads, ref_terms, ref_grads) -> None:
    """float64 kernel against the float64 reference: F64_TERMS on terms, F64_GRADS (and equal shape and dtype) on
    grads."""
    for k, r in zip(terms, ref_terms):
        torch.testing.assert_close(k, r, **F64_TERMS)
    assert len(grads) == len(ref_grads)
    for k, r in zip(grads, ref_grads):
        assert k.shape == r.shape and k.dtype == r.dtype
        torch.testing.assert_close(k, r, **F64_GRADS)


def assert_close_float32(terms, grads, ref_terms, ref_grads) -> None:
    """float32 kernel results against a float64 oracle on the same inputs."""
    for k, r in zip(terms, ref_terms):
        assert k.dtype == F32
        torch.testing.assert_close(k.double(), r, rtol=2e-5, atol=1e-9)
    for k, r in zip(grads, ref_grads):
        assert k.dtype == F32
        torch.testing.assert_close(k.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item() + 1e-12)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_low_precision_rule(terms, grads, lo_terms, lo_grads, ref_terms, ref_grads) -> None:
    """16-bit rule: max|kernel - ref| <= 2·max|lo - ref| + 1e-6·max|ref| (+ 1e-12 on terms), per term and per grad;
    ``lo_*`` is the reference evaluated in the low dtype, ``ref_*`` in float64, all on the same quantised inputs."""
    for k, lo, r in zip(terms, lo_terms, ref_terms):
        assert max_err(k, r) <= 2 * max_err(lo, r) + 1e-6 * r.abs().item() + 1e-12
    for k, lo, r in zip(grads, lo_grads, ref_grads):
        assert max_err(k, r) <= 2 * max_err(lo, r) + 1e-6 * r.abs().max().item()
