"""The forgetting scaling law: ``ΔL_align(D) = A · D^β (+ E)``.

``D`` is the number of fine-tuning tokens seen, ``ΔL_align`` the rise of the alignment loss (the loss of the
aligned model's refusal demonstrations) since the start of the fine-tune. "A method flattens forgetting" means a
smaller ``A`` or ``β``; the bootstrap intervals say whether a difference between two methods is real.

Fit: ordinary least squares in log space (``log ΔL = log A + β log D``) gives the starting point, then
``scipy.optimize.least_squares`` minimises the squared residuals on the original scale, with ``A`` parametrised as
``exp(log A)`` so it stays positive. Intervals: a pairs bootstrap (resample the points with replacement, refit),
percentile 95% intervals.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["ForgettingLawFit", "fit_forgetting_law", "forgetting_law"]


@dataclass(frozen=True)
class ForgettingLawFit:
    """Result of :func:`fit_forgetting_law`. Intervals are percentile bootstrap 95% intervals (lo, hi)."""

    A: float
    beta: float
    E: float  # 0.0 when fitted without an offset
    A_ci: Tuple[float, float]
    beta_ci: Tuple[float, float]
    E_ci: Optional[Tuple[float, float]]
    with_offset: bool
    n_points: int
    n_boot: int  # bootstrap refits that succeeded
    rmse: float  # on the original scale
    r2_log: float  # R^2 of log(prediction) vs log(data) (points with positive data)

    def predict(self, tokens) -> np.ndarray:
        return forgetting_law(np.asarray(tokens, dtype=float), self.A, self.beta, self.E)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("A_ci", "beta_ci", "E_ci"):
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        return d


def forgetting_law(tokens, A: float, beta: float, E: float = 0.0) -> np.ndarray:
    """``A · tokens^β + E``."""
    return A * np.power(np.asarray(tokens, dtype=float), beta) + E


def _validate(tokens, delta_loss, with_offset: bool):
    x = np.asarray(tokens, dtype=float).reshape(-1)
    y = np.asarray(delta_loss, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"fit_forgetting_law: `tokens` has {x.size} values but `delta_loss` has {y.size}")
    need = 4 if with_offset else 3
    if x.size < need:
        raise ValueError(f"fit_forgetting_law: need at least {need} points, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit_forgetting_law: `tokens` and `delta_loss` must be finite (found NaN or inf)")
    if np.any(x <= 0):
        raise ValueError(f"fit_forgetting_law: `tokens` must be positive; {int(np.sum(x <= 0))} value(s) are <= 0")
    if np.unique(x).size < 2:
        raise ValueError("fit_forgetting_law: `tokens` needs at least two distinct values")
    if not with_offset and np.any(y <= 0):
        bad = int(np.sum(y <= 0))
        raise ValueError(
            f"fit_forgetting_law: {bad} of {y.size} `delta_loss` value(s) are <= 0, which A·D^β (A > 0) cannot fit; "
            "drop those points (no forgetting measured there) or fit with with_offset=True"
        )
    return x, y


def _init(x, y, with_offset: bool):
    """Starting point from a log-space line fit."""
    E0 = 0.0
    if with_offset:
        # shift so every point is positive; the offset then absorbs the shift
        E0 = min(0.0, float(y.min())) - 1e-3 * max(float(np.ptp(y)), 1e-12)
    ys = y - E0
    lx, ly = np.log(x), np.log(ys)
    beta0, logA0 = np.polyfit(lx, ly, 1)
    return [float(logA0), float(beta0)] + ([E0] if with_offset else [])


def _fit_once(x, y, p0, with_offset: bool):
    from scipy.optimize import least_squares

    lx = np.log(x)

    def resid(p):
        pred = np.exp(np.clip(p[0] + p[1] * lx, -700, 700))
        if with_offset:
            pred = pred + p[2]
        return pred - y

    res = least_squares(resid, np.asarray(p0, dtype=float), x_scale="jac", method="lm" if x.size > len(p0) else "trf",
                        max_nfev=2000)
    return res.x, res.success


def fit_forgetting_law(
    tokens: Sequence[float],
    delta_loss: Sequence[float],
    *,
    with_offset: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> ForgettingLawFit:
    """Fit ``delta_loss ≈ A · tokens^β (+ E)`` by nonlinear least squares, with bootstrap 95% intervals.

    ``tokens``: positive token counts D; ``delta_loss``: ΔL_align at those counts. Without an offset every
    ``delta_loss`` must be positive (a clear ValueError says how many are not). ``n_boot=0`` skips the intervals
    (they are then (nan, nan)).
    """
    x, y = _validate(tokens, delta_loss, with_offset)
    p0 = _init(x, y, with_offset)
    p, _ = _fit_once(x, y, p0, with_offset)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(max(0, int(n_boot))):
        idx = rng.integers(0, x.size, x.size)
        xb, yb = x[idx], y[idx]
        if np.unique(xb).size < (3 if with_offset else 2):
            continue
        try:
            pb, ok = _fit_once(xb, yb, p, with_offset)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if ok and np.all(np.isfinite(pb)):
            boots.append(pb)
    boots = np.asarray(boots)

    def ci(col, transform=lambda v: v):
        if boots.shape[0] < 2:
            return (math.nan, math.nan)
        lo, hi = np.percentile(transform(boots[:, col]), [2.5, 97.5])
        return (float(lo), float(hi))

    A, beta = float(np.exp(p[0])), float(p[1])
    E = float(p[2]) if with_offset else 0.0
    pred = forgetting_law(x, A, beta, E)
    rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
    pos = (y > 0) & (pred > 0)
    r2 = math.nan
    if pos.sum() >= 2:
        ly, lp = np.log(y[pos]), np.log(pred[pos])
        ss = float(np.sum((ly - ly.mean()) ** 2))
        r2 = 1.0 - float(np.sum((ly - lp) ** 2)) / ss if ss > 0 else math.nan
    return ForgettingLawFit(
        A=A, beta=beta, E=E, A_ci=ci(0, np.exp), beta_ci=ci(1), E_ci=ci(2) if with_offset else None,
        with_offset=with_offset, n_points=int(x.size), n_boot=int(boots.shape[0]), rmse=rmse, r2_log=r2,
    )
