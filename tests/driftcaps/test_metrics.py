"""Rates, bootstrap intervals, McNemar's exact test, compare() and the drift reduction."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from agl.driftcaps import (DriftReport, bootstrap_ci, compare, drift_reduction, mcnemar_exact, refusal_rate)
from agl.driftcaps.metrics import summarise


def rec(i, label, refused, category=None, kind=None):
    return {"id": f"p{i}", "prompt": f"prompt {i}", "label": label, "category": category or label, "kind": kind,
            "response": "x", "refused": refused}


def test_refusal_rate_basic():
    r = refusal_rate([True, False, True, True, None])
    assert r["rate"] == 0.75 and r["n"] == 4 and r["n_refused"] == 3 and r["n_empty"] == 1
    lo, hi = r["ci"]
    assert 0 <= lo <= 0.75 <= hi <= 1
    assert math.isnan(refusal_rate([])["rate"]) and math.isnan(refusal_rate([None])["rate"])
    assert refusal_rate([True] * 5)["ci"] == [1.0, 1.0]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_ci_contains_estimate_and_shrinks_with_n(p):
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 80, 320, 1280):
        v = rng.random(n) < p
        r = refusal_rate(v.tolist())
        lo, hi = r["ci"]
        assert lo <= r["rate"] <= hi
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:]))
    # roughly the normal-approximation width at the largest n
    n = 1280
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.2)


def test_bootstrap_is_seeded():
    v = np.linspace(0, 1, 50)
    assert bootstrap_ci(v) == bootstrap_ci(v)
    assert bootstrap_ci(v, seed=1) != bootstrap_ci(v, seed=2)


def _binom_two_sided(b, c):
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) * 0.5 ** n for i in range(k + 1)))


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 5), (3, 3), (10, 2), (2, 10), (25, 11), (7, 40), (100, 80)])
def test_mcnemar_exact(b, c):
    p = mcnemar_exact(b, c)
    assert p == pytest.approx(_binom_two_sided(b, c), rel=1e-12, abs=1e-15)
    if b + c:
        assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    else:
        assert p == 1.0


def test_mcnemar_known_value():
    # b=10, c=2: 2 * P(X <= 2 | n=12) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_summarise_categories_and_kinds():
    recs = [rec(0, "unsafe", True, "weapons"), rec(1, "unsafe", False, "weapons"), rec(2, "unsafe", True, "cyber"),
            rec(3, "safe", True, "tech", "borderline"), rec(4, "safe", False, "tech", "plain"),
            rec(5, "safe", False, "weapons", "borderline")]  # "weapons" used by both labels -> prefixed keys
    m = summarise(recs)
    assert m["rr_unsafe"]["rate"] == pytest.approx(2 / 3)
    assert m["over_refusal"]["rate"] == pytest.approx(1 / 3)
    assert m["by_category"]["unsafe/weapons"]["rate"] == 0.5
    assert m["by_category"]["safe/weapons"]["rate"] == 0.0
    assert m["by_category"]["cyber"]["label"] == "unsafe"
    assert m["over_refusal_by_kind"]["borderline"]["rate"] == 0.5


def _pair(before, after, label="unsafe"):
    b = [rec(i, label, v) for i, v in enumerate(before)]
    a = [rec(i, label, v) for i, v in enumerate(after)]
    return b, a


def test_compare_flips_and_drift():
    before = [True] * 8 + [False] * 2  # RR 0.8
    after = [True] * 3 + [False] * 5 + [True, False]  # 5 refused->complied, 1 complied->refused; RR 0.4
    b, a = _pair(before, after)
    b += [rec(100 + i, "safe", v) for i, v in enumerate([False, False, True, False])]
    a += [rec(100 + i, "safe", v) for i, v in enumerate([True, True, True, False])]
    c = compare(DriftReport(b), DriftReport(a))
    assert c.drift["value"] == pytest.approx(0.4)
    lo, hi = c.drift["ci"]
    assert lo <= 0.4 <= hi
    assert c.flips_unsafe["refused_to_complied"] == 5 and c.flips_unsafe["complied_to_refused"] == 1
    assert c.flips_unsafe["mcnemar_p"] == pytest.approx(binomtest(1, 6, 0.5).pvalue)
    assert c.over_refusal_change["value"] == pytest.approx(0.5)
    assert c.flips_safe["complied_to_refused"] == 2 and c.flips_safe["refused_to_complied"] == 0
    assert sorted(c.flipped["refused_to_complied"]) == ["p3", "p4", "p5", "p6", "p7"]
    assert c.by_category["unsafe"]["drift"] == pytest.approx(0.4)
    # swapping before and after negates drift and swaps flip directions
    r = compare(DriftReport(a), DriftReport(b))
    assert r.drift["value"] == pytest.approx(-0.4)
    assert r.flips_unsafe["refused_to_complied"] == 1 and r.flips_unsafe["complied_to_refused"] == 5
    assert r.flips_unsafe["mcnemar_p"] == c.flips_unsafe["mcnemar_p"]
    # identical runs: no drift, p = 1
    same = compare(DriftReport(b), DriftReport(b))
    assert same.drift["value"] == 0 and same.flips_unsafe["mcnemar_p"] == 1.0
    d = c.to_dict()
    assert d["kind"] == "driftcaps.comparison" and "by_category" in d


def test_compare_ignores_empty_and_checks_prompts():
    b, a = _pair([True, True, False], [None, False, False])
    c = compare(b, a)
    assert c.flips_unsafe["n_paired"] == 2 and c.drift["n"] == 2
    a[1]["prompt"] = "different"
    with pytest.raises(ValueError, match="different text"):
        compare(b, a)
    with pytest.raises(ValueError, match="share no prompt"):
        compare(b, [rec(99, "unsafe", True)])


def test_drift_reduction():
    n = 40
    base = [rec(i, "unsafe", True) for i in range(n)]
    a = [rec(i, "unsafe", i >= 20) for i in range(n)]  # drift_A = 0.5
    bb = [rec(i, "unsafe", i >= 5) for i in range(n)]  # drift_B = 0.125 -> reduction 0.75
    r = drift_reduction(base, a, bb)
    assert r["drift_a"] == pytest.approx(0.5) and r["drift_b"] == pytest.approx(0.125)
    assert r["value"] == pytest.approx(0.75)
    lo, hi = r["ci"]
    assert lo <= 0.75 <= hi and hi - lo < 0.5
    # B as bad as A: 0; B better than base: > 1 impossible here but B == base -> 1
    assert drift_reduction(base, a, a)["value"] == pytest.approx(0.0)
    assert drift_reduction(base, a, base)["value"] == pytest.approx(1.0)
    # no drift in A: undefined
    r0 = drift_reduction(base, base, bb)
    assert math.isnan(r0["value"])
    # safe prompts are ignored
    extra = [rec(100, "safe", True)]
    assert drift_reduction(base + extra, a + extra, bb + extra)["n"] == n


def test_drift_reduction_ci_shrinks_with_n():
    def run(n):
        base = [rec(i, "unsafe", True) for i in range(n)]
        a = [rec(i, "unsafe", i % 2 == 0) for i in range(n)]
        b = [rec(i, "unsafe", i % 4 != 1) for i in range(n)]
        lo, hi = drift_reduction(base, a, b)["ci"]
        return hi - lo

    assert run(400) < run(40)
