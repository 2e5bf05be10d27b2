"""The pure-PyTorch reference (the oracle of the kernel tests) against an element-by-element loop, and its checks."""
from __future__ import annotations

import math

import pytest
import torch

from agl import reference


def _loop_terms(B, A, Ba, Aa, F, H, M, s, beta, tau, kappa, eps):
    """The contract written as plain Python over the grid, one element at a time."""
    m, n, r = B.shape[0], A.shape[1], B.shape[1]
    S = dict(align=0.0, task=0.0, overlap=0.0, cross=0.0, tf=0.0)
    for i in range(m):
        for j in range(n):
            d = s * sum(B[i, k].item() * A[k, j].item() for k in range(r))
            if M is not None:
                da = M[i, j].item() * d
            elif Ba is not None:
                da = s * sum(Ba[i, k].item() * Aa[k, j].item() for k in range(Ba.shape[1]))
            else:
                da = 0.0
            dt = d - da
            g = F[i, j].item() if F is not None else 1.0
            h = H[i, j].item() if H is not None else 1.0
            eta = 1 + beta / (1 + math.exp(-kappa * (abs(d) - tau)))
            S["align"] += g * da * da
            S["task"] += h * dt * dt
            S["overlap"] += eta * abs(da) * abs(dt)
            S["cross"] += g * da * dt
            S["tf"] += g * dt * dt
    N = m * n
    return (S["align"] / N, S["task"] / N, S["overlap"] / N, S["cross"] ** 2 / (S["align"] * S["tf"] + eps))


@pytest.mark.parametrize("mode", ["align", "mask", "none"])
@pytest.mark.parametrize("metrics", [False, True])
def test_reference_matches_loop(mode, metrics):
    g = torch.Generator().manual_seed(0)
    m, n, r, ra = 4, 5, 2, 3
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.2, torch.randn(r, n, generator=g, dtype=torch.float64) * 0.2
    Ba = torch.randn(m, ra, generator=g, dtype=torch.float64) * 0.2 if mode == "align" else None
    Aa = torch.randn(ra, n, generator=g, dtype=torch.float64) * 0.2 if mode == "align" else None
    M = torch.rand(m, n, generator=g, dtype=torch.float64) if mode == "mask" else None
    F = torch.rand(m, n, generator=g, dtype=torch.float64) if metrics else None
    H = torch.rand(m, n, generator=g, dtype=torch.float64) if metrics else None
    s, beta, tau, kappa, eps = 0.8, 3.0, 0.02, 50.0, 1e-12
    got = reference.agl_terms(B, A, Ba, Aa, fisher=F, task_metric=H, align_mask=M, scale=s, beta=beta, tau=tau,
                              sharpness=kappa, eps=eps)
    want = _loop_terms(B, A, Ba, Aa, F, H, M, s, beta, tau, kappa, eps)
    for gt, w in zip(got, want):
        assert gt.dim() == 0
        assert math.isclose(gt.item(), w, rel_tol=1e-12, abs_tol=1e-15)


def test_reference_defaults_and_ranges():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(6, 2, generator=g), torch.randn(2, 7, generator=g)
    Ba, Aa = torch.randn(6, 3, generator=g), torch.randn(3, 7, generator=g)
    t = reference.agl_terms(B, A, Ba, Aa)
    assert 0 <= t.geodesic.item() <= 1 + 1e-6  # a squared cosine (Cauchy-Schwarz)
    assert t.align.item() > 0 and t.task.item() > 0 and t.overlap.item() > 0
    t0 = reference.agl_terms(B, A)  # no alignment subspace: D_A = 0
    assert t0.align.item() == 0 and t0.overlap.item() == 0 and t0.geodesic.item() == 0
    assert math.isclose(t0.task.item(), (B @ A).pow(2).mean().item(), rel_tol=1e-6)


def test_reference_is_differentiable_and_float64_safe():
    B = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    Ba, Aa = torch.randn(3, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    t = reference.agl_terms(B, A, Ba, Aa, tau=0.1, sharpness=5.0)
    assert all(x.dtype == torch.float64 for x in t)
    assert torch.autograd.gradcheck(lambda b, a: tuple(reference.agl_terms(b, a, Ba, Aa, tau=0.1, sharpness=5.0)), (B, A))


@pytest.mark.parametrize("kw,match", [
    (dict(A=torch.randn(3, 5)), "`A`"),
    (dict(B=torch.randn(4, 2).int()), "`B`"),
    (dict(fisher=torch.rand(5, 4)), "`fisher`"),
    (dict(align_mask=torch.rand(4, 5), B_align=torch.randn(4, 1), A_align=torch.randn(1, 5)), "align_mask"),
    (dict(B_align=torch.randn(4, 1)), "A_align"),
    (dict(scale=float("nan")), "`scale`"),
    (dict(sharpness=-2.0), "`sharpness`"),
    (dict(eps=-1.0), "`eps`"),
])
def test_reference_rejects_bad_input(kw, match):
    args = dict(B=torch.randn(4, 2), A=torch.randn(2, 5))
    args.update(kw)
    B, A = args.pop("B"), args.pop("A")
    Ba, Aa = args.pop("B_align", None), args.pop("A_align", None)
    with pytest.raises((ValueError, TypeError), match=match):
        reference.agl_terms(B, A, Ba, Aa, **args)
