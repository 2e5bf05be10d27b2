"""Safety-data mixing (agl.mixing): the placement rule, the dataset-level helper, and its errors. The experiment's
step schedule (``example_schedule``) is tested with the ladder's methods (tests/test_ladder_methods.py)."""
from __future__ import annotations

import pytest

from agl.mixing import example_schedule, mix_records, mix_slots


def test_mix_slots_are_distinct_in_range_and_evenly_spread():
    for total, k in [(100, 3), (97, 10), (10, 10), (640, 19), (5, 1)]:
        s = sorted(mix_slots(total, k))
        assert len(s) == k and 0 <= s[0] and s[-1] < total
        gaps = [b - a for a, b in zip(s, s[1:])]
        assert all(total // k <= g <= -(-total // k) for g in gaps), (total, k, gaps)
    assert mix_slots(7, 0) == set()
    with pytest.raises(ValueError, match="k <= total"):
        mix_slots(3, 4)


def _recs(tag, n):
    return [{"prompt": f"{tag} {i}", "response": f"r {i}"} for i in range(n)]


def test_mix_records_keeps_every_task_record_in_order_and_the_fraction():
    task, ref = _recs("task", 97), _recs("refuse", 4)
    out = mix_records(task, ref, 0.03, seed=1)
    assert [r for r in out if r["prompt"].startswith("task")] == task  # every task record once, in its order
    mixed = [i for i, r in enumerate(out) if r["prompt"].startswith("refuse")]
    assert len(mixed) == round(0.03 / 0.97 * 97) == 3 and len(out) == 100
    assert set(mixed) == mix_slots(100, 3)  # spread over the whole list, not bunched at an end
    assert len({out[i]["prompt"] for i in mixed}) == 3  # each demonstration once before any repeats
    assert mix_records(task, ref, 0.03, seed=1) == out and mix_records(task, ref, 0.0, seed=1) == task
    # more demonstrations than the pool: every one before a repeat
    many = [r["prompt"] for r in mix_records(task, ref, 0.1, seed=0) if r["prompt"].startswith("refuse")]
    assert len(many) == 11 and set(many[:4]) == {r["prompt"] for r in ref}


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan"), True, "0.1"])
def test_mix_records_rejects_a_bad_fraction(fraction):
    with pytest.raises(ValueError, match="`fraction` must be a number in \\[0, 1\\)"):
        mix_records(_recs("t", 3), _recs("r", 2), fraction)


def test_mix_records_needs_data():
    with pytest.raises(ValueError, match="`refusals` is empty"):
        mix_records(_recs("t", 30), [], 0.1)
    with pytest.raises(ValueError, match="`task` holds no record"):
        mix_records([], _recs("r", 2), 0.1)


def test_example_schedule_uses_the_same_slots():
    flat = [s for step in example_schedule(50, steps=10, batch=8, seed=0, n_mix=5, mix_fraction=0.05) for s in step]
    assert {i for i, (kind, _) in enumerate(flat) if kind == "mix"} == mix_slots(80, 4)
