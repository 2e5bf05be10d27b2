"""The pre-registered choices and the frontier statistics of the experiment (pure numpy, no model).

Operating-point rule (written in docs/EXPERIMENT.md before any run): among the settings of one method's grid, the
*strongest* (largest λ, smallest budget, most Safe LoRA layers projected) whose task dev EM, averaged over the seeds,
is at least LoRA's dev EM minus ``tolerance`` (2 points). Dev data only. The term sweeps' rule (rule 7) is
:func:`choose_term_weight`.

The frontier gain of AGL over a baseline B (EWC, LoRA at a lower lr, L2-SP, mixing, Safe LoRA): with each point's
per-seed, per-prompt values on the unsafe eval prompts (``refused``: seeds x prompts, 1/0, NaN = not judged; or
``not_complied`` = 1 - complied, for the compliance gain) and per-seed task test hits (``hits``: seeds x
questions), a point is (EM, y) = (mean hits, mean value). AGL's frontier is the upper-left Pareto set of its points
(LoRA included as λ = 0), joined linearly; the gain is AGL's frontier y at B's EM minus B's y, at B's operating
point (y higher is better, so a positive gain means AGL keeps more refusals / complies less). Its 95% interval and
p-value come from a bootstrap that resamples seeds, unsafe prompts and task questions jointly for every point
(paired: the same resample for AGL and B, and, with the same ``seed``, for the refusal and the compliance gain).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["choose_operating_point", "choose_term_weight", "pareto_frontier", "frontier_value", "frontier_gain", "spearman",
           "prediction_quality"]


def choose_operating_point(points: Sequence[dict], lora_dev_em: float, tolerance: float = 0.02) -> Optional[dict]:
    """The pre-registered rule: the point with the largest ``strength`` among those with ``dev_em >= lora_dev_em -
    tolerance``; None when no point qualifies. ``points``: dicts with ``strength`` (larger = more regularisation)
    and ``dev_em``."""
    if not math.isfinite(lora_dev_em):
        raise ValueError(f"choose_operating_point: LoRA's dev EM must be finite, got {lora_dev_em!r}")
    ok = [p for p in points if p["dev_em"] is not None and p["dev_em"] >= lora_dev_em - tolerance - 1e-12]
    return max(ok, key=lambda p: p["strength"]) if ok else None


def choose_term_weight(points: Sequence[dict], base: dict, lora_dev_em: float, tolerance: float = 0.02,
                       min_gain: float = 0.10) -> Optional[dict]:
    """Rule 7 (term sweeps, dev data only): the weight of one extra AGL term (task, overlap or geodesic).

    Among ``points`` (dicts with ``weight``, ``dev_em`` and ``dev_delta_align``: means over the sweep's seeds of
    task dev EM and of the calibration hold-out's refusal-NLL rise at the end of the fine-tune) whose
    ``dev_em >= lora_dev_em - tolerance``, take the one with the smallest ``dev_delta_align`` (ties: the smaller
    weight). It is chosen only if ``dev_delta_align <= (1 - min_gain) · base["dev_delta_align"]``, i.e. at least
    ``min_gain`` (10%) relatively below the base point's (the same config with the term at 0). Returns the chosen
    point, or None: the weight stays 0 (the term does not help). A base that did not forget (ΔL_align <= 0, or not
    finite) leaves nothing to reduce: None."""
    if not math.isfinite(lora_dev_em):
        raise ValueError(f"choose_term_weight: LoRA's dev EM must be finite, got {lora_dev_em!r}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"choose_term_weight: `min_gain` must be in [0, 1), got {min_gain!r}")

    def finite(x):
        return x is not None and math.isfinite(x)

    ok = [p for p in points if finite(p["dev_em"]) and finite(p["dev_delta_align"])
          and p["dev_em"] >= lora_dev_em - tolerance - 1e-12]
    b = base.get("dev_delta_align")
    if not ok or not finite(b) or b <= 0:
        return None
    best = min(ok, key=lambda p: (p["dev_delta_align"], p["weight"]))
    return best if best["dev_delta_align"] <= (1.0 - min_gain) * b else None


def pareto_frontier(em: Sequence[float], rr: Sequence[float]):
    """The points no other point beats on both EM and RR, sorted by EM ascending (so RR descending):
    ``(em, rr)`` arrays."""
    pts = sorted(zip(map(float, em), map(float, rr)), key=lambda p: (-p[0], -p[1]))
    keep, best_rr = [], -math.inf
    for e, r in pts:  # from the highest EM down, keep a point only when it raises the best RR so far
        if r > best_rr:
            keep.append((e, r))
            best_rr = r
    keep.reverse()
    return np.array([k[0] for k in keep]), np.array([k[1] for k in keep])


def frontier_value(em: Sequence[float], rr: Sequence[float], em_star: float) -> float:
    """RR of the Pareto frontier of ``(em, rr)`` at EM ``em_star`` (linear between frontier points); NaN when
    ``em_star`` is above the frontier's largest EM (AGL never reaches that task quality); the frontier's best RR
    when it is below its smallest EM (a method can always give up task quality, so the frontier is flat there)."""
    fe, fr = pareto_frontier(em, rr)
    if em_star > fe[-1] + 1e-12:
        return math.nan
    if em_star <= fe[0]:
        return float(fr[0])
    return float(np.interp(em_star, fe, fr))


def _point_means(values: np.ndarray, hits: np.ndarray, si, pi, qi):
    return float(np.nanmean(hits[np.ix_(si, qi)])), float(np.nanmean(values[np.ix_(si, pi)]))


def frontier_gain(curve: Sequence[Dict[str, np.ndarray]], ref: Dict[str, np.ndarray], *, key: str = "refused",
                  n_boot: int = 1000, seed: int = 0) -> dict:
    """``rr_gain_at_matched_em`` (a fraction: 0.05 = 5 points of RR_unsafe-after), its bootstrap ``ci95`` and
    two-sided ``p_value`` for the curve's frontier against the reference point ``ref`` at the reference's EM.

    Every point (the curve's and ``ref``) has ``key`` (S x P; ``refused`` by default, any per-prompt value where
    higher is better, e.g. ``not_complied``: then the "rr" keys hold that value's gain) and ``hits`` (S x Q) on
    the same seeds, prompts and questions, in the same order. Resamples where the reference's EM is beyond the
    curve's reach (NaN) are dropped and counted (``n_out_of_range``)."""
    pts = list(curve) + [ref]
    S, P = ref[key].shape
    Q = ref["hits"].shape[1]
    for p in pts:
        if p[key].shape != (S, P) or p["hits"].shape != (S, Q):
            raise ValueError(f"frontier_gain: every point needs `{key}` (seeds x prompts) and hits (seeds x "
                             "questions) of the same shape")

    def gain(si, pi, qi):
        means = [_point_means(p[key], p["hits"], si, pi, qi) for p in pts]
        em_ref, rr_ref = means[-1]
        em, rr = zip(*means[:-1])
        return frontier_value(em, rr, em_ref) - rr_ref, em_ref

    full = (np.arange(S), np.arange(P), np.arange(Q))
    value, em_ref = gain(*full)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        g, _ = gain(rng.integers(0, S, S), rng.integers(0, P, P), rng.integers(0, Q, Q))
        boots.append(g)
    b = np.array(boots)
    ok = b[np.isfinite(b)]
    if len(ok) == 0:
        ci, p = [math.nan, math.nan], math.nan
    else:
        ci = [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]
        tail = min(np.sum(ok <= 0), np.sum(ok >= 0))
        p = float(min(1.0, 2.0 * (tail + 1) / (len(ok) + 1)))
    return {"rr_gain_at_matched_em": value, "ci95": ci, "p_value": p, "em_matched": em_ref,
            "n_boot": n_boot, "n_out_of_range": int(len(b) - len(ok)), "n_seeds": S, "n_prompts": P,
            "n_questions": Q}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant input."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


def prediction_quality(points: Sequence[dict], *, key: str = "pred_align_nats", n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """How well the predicted rise of the alignment loss matches the measured one. ``points``: dicts with ``run``
    (the cluster: one fine-tune), ``measured`` and ``key`` (predicted). Returns the pooled ``ratio`` = Σ measured /
    Σ predicted, the median per-point ratio (``median_point_ratio``), ``spearman`` and their 95% intervals from a
    bootstrap over runs
    (points of one run are correlated, so whole runs are resampled)."""
    pts = [p for p in points if p.get(key) is not None and p.get("measured") is not None
           and math.isfinite(p[key]) and math.isfinite(p["measured"])]
    if len(pts) < 3:
        return {"n_points": len(pts), "ratio": math.nan, "ratio_ci": [math.nan, math.nan],
                "spearman": math.nan, "spearman_ci": [math.nan, math.nan]}
    runs: Dict[str, List[dict]] = {}
    for p in pts:
        runs.setdefault(str(p["run"]), []).append(p)
    names = sorted(runs)

    def stats(sel: List[dict]):
        pred = np.array([p[key] for p in sel])
        meas = np.array([p["measured"] for p in sel])
        ratio = float(meas.sum() / pred.sum()) if pred.sum() > 0 else math.nan
        return ratio, spearman(pred, meas)

    def median_ratio(sel: List[dict]) -> float:
        pos = [p["measured"] / p[key] for p in sel if p[key] > 0]
        return float(np.median(pos)) if pos else math.nan

    ratio, rho = stats(pts)
    rng = np.random.default_rng(seed)
    rs, cs, ms = [], [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(names), len(names))
        sel = [p for i in pick for p in runs[names[i]]]
        r, c = stats(sel)
        rs.append(r)
        cs.append(c)
        ms.append(median_ratio(sel))

    def ci(v):
        v = np.array(v, float)
        v = v[np.isfinite(v)]
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan, math.nan]

    return {"n_points": len(pts), "n_runs": len(names), "predictor": key, "ratio": ratio, "ratio_ci": ci(rs),
            "median_point_ratio": median_ratio(pts), "median_point_ratio_ci": ci(ms), "spearman": rho,
            "spearman_ci": ci(cs)}
