"""AGL's frontier at every baseline setting (rule 16, :mod:`agl.experiment.matched_em`): verdicts from the CI and
the EM range, the gains and their signs on refusal and compliance, counts. The report-level path is in
tests/test_ladder_report.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

from agl.experiment.matched_em import OVER, UNDER, VERDICTS, along_curves, summary_lines, verdict

P, Q = 200, 600


def point(rr, cr, em, seeds=2):
    """Arrays for one point: the first rr·P prompts refused, the next cr·P complied; em·Q questions hit."""
    nr, nc = round(rr * P), round(cr * P)
    refused = np.array([[float(i < nr) for i in range(P)]] * seeds)
    complied = np.array([[float(nr <= i < nr + nc) for i in range(P)]] * seeds)
    hits = np.array([[float(i < round(em * Q)) for i in range(Q)]] * seeds)
    return {"refused": refused, "complied": complied, "not_complied": 1 - complied, "hits": hits}


def test_verdict_from_ci_and_em_range():
    assert verdict(0.1, [0.02, 0.2]) == "above"
    assert verdict(-0.1, [-0.2, -0.01]) == "below"
    assert verdict(0.01, [-0.05, 0.08]) == "level"
    assert verdict(math.nan, [math.nan, math.nan]) == OVER
    assert verdict(0.1, None) == OVER
    # under the range: a gain above 0 means an AGL point dominates; anything else is no comparison
    assert verdict(0.3, [0.2, 0.4], em=0.1, em_range=(0.2, 0.5)) == "above"
    assert verdict(-0.3, [-0.4, -0.2], em=0.1, em_range=(0.2, 0.5)) == UNDER
    assert verdict(0.0, [-0.1, 0.1], em=0.1, em_range=(0.2, 0.5)) == UNDER
    assert verdict(0.3, [0.2, 0.4], em=0.6, em_range=(0.2, 0.5)) == OVER
    assert verdict(0.3, [0.2, 0.4], em=0.5, em_range=(0.2, 0.5)) == "above"  # the range's ends are matched


def test_along_curves_gains_signs_and_counts():
    # AGL's curve: LoRA (EM 0.5, RR 0.1, CR 0.8) and one AGL point (EM 0.4, RR 0.7, CR 0.2)
    curve = [point(0.1, 0.8, 0.5), point(0.7, 0.2, 0.4)]
    base = {"b": [("b-weak", point(0.2, 0.7, 0.45)),   # AGL's frontier at 0.45: RR 0.4, CR 0.5 -> AGL better
                  ("b-strong", point(0.9, 0.05, 0.4)),  # at 0.4 AGL has RR 0.7, CR 0.2 -> AGL worse
                  ("b-lowem", point(0.95, 0.0, 0.2)),   # under AGL's range, refuses more than AGL's best
                  ("b-dominated", point(0.5, 0.4, 0.3)),  # under it, but AGL's point (0.4, RR 0.7) dominates
                  ("b-highem", point(0.2, 0.7, 0.55))]}  # over it
    out = along_curves(curve, base, n_boot=200)["b"]
    assert out["agl_em_range"] == pytest.approx([0.4, 0.5])
    weak, strong, low, dominated, high = out["points"]
    assert weak["rr"]["gain"] == pytest.approx(0.4 - 0.2) and weak["rr"]["verdict"] == "above"
    assert weak["compliance"]["gain"] == pytest.approx(0.7 - 0.5) and weak["compliance"]["verdict"] == "above"
    assert weak["compliance"]["agl"] == pytest.approx(0.5) and weak["rr"]["agl"] == pytest.approx(0.4)
    assert strong["rr"]["gain"] == pytest.approx(0.7 - 0.9) and strong["rr"]["verdict"] == "below"
    assert strong["compliance"]["gain"] == pytest.approx(0.05 - 0.2) and strong["compliance"]["verdict"] == "below"
    assert low["rr"]["verdict"] == UNDER and low["rr"]["gain"] == pytest.approx(0.7 - 0.95)
    assert dominated["rr"]["verdict"] == "above" and dominated["rr"]["gain"] == pytest.approx(0.7 - 0.5)
    assert dominated["compliance"]["verdict"] == "above" and dominated["compliance"]["gain"] == pytest.approx(0.2)
    assert high["rr"]["verdict"] == OVER and math.isnan(high["rr"]["gain"])
    assert out["counts"]["rr"] == {"above": 2, "level": 0, "below": 1, UNDER: 1, OVER: 1}
    assert set(out["counts"]["compliance"]) == set(VERDICTS)
    lines = "\n".join(summary_lines({"b": out}, {"b": "Baseline B"}))
    assert "Baseline B, 5 setting(s), on compliance: AGL's frontier above at 2, below at 1; 1 " + UNDER in lines
    assert f"| Baseline B | b-highem | 55.0% | 70.0% / 20.0% | – / – | {OVER} | {OVER} |" in lines


def test_level_when_the_ci_spans_zero():
    rng = np.random.default_rng(0)
    curve = [point(0.1, 0.8, 0.5), point(0.7, 0.2, 0.4)]
    ref = point(0.4, 0.5, 0.45)  # exactly on AGL's frontier: the gain is 0, its CI spans it
    ref["refused"] = ref["refused"][:, rng.permutation(P)]  # same rate, other prompts: unpaired noise
    out = along_curves(curve, {"b": [("b", ref)]}, n_boot=300)["b"]["points"][0]
    assert out["rr"]["gain"] == pytest.approx(0.0)
    assert out["rr"]["verdict"] == "level" and out["rr"]["ci95"][0] < 0 < out["rr"]["ci95"][1]
