"""Safety-data mixing (Bianchi et al., ICLR 2024, "Safety-Tuned LLaMAs"): a small fraction of the fine-tune's
examples are refusal demonstrations, so the fine-tune keeps seeing what the aligned model should do.

It is the baseline the ladder (docs/results/2026-12-05-ladder) compares AGL with, and it composes with AGL: mixing
changes the data, ``AGLLoss`` the objective. Mixing needs refusal demonstrations at train time (the same
``{"prompt", "response"}`` JSONL a Fisher is estimated from: use demonstrations the state did not use, so the two
do not share samples); AGL needs only the state estimated once.

Two forms, one placement rule (:func:`mix_slots`: k of N slots, slot ⌊(j + ½)·N/k⌋ for j < k, evenly spread so no
stretch of the run goes without them):

- :func:`mix_records`: a dataset-level helper. The task records in their order with refusal demonstrations inserted
  at evenly spread positions, a fraction ``p`` of the result (a Trainer that shuffles its dataset still sees that
  fraction).
- :func:`example_schedule`: the experiment's step-level schedule (which example fills each slot of each step).
"""
from __future__ import annotations

import random
from typing import List, Sequence, Set, Tuple

__all__ = ["mix_slots", "mix_records", "example_schedule"]


def mix_slots(total: int, k: int) -> Set[int]:
    """The ``k`` slots of ``total`` that hold refusal demonstrations: ⌊(j + ½)·total/k⌋ for j < k (distinct, in
    [0, total), spread evenly: consecutive ones are ⌊total/k⌋ or ⌈total/k⌉ apart)."""
    if not 0 <= k <= total:
        raise ValueError(f"mix_slots: need 0 <= k <= total, got k={k}, total={total}")
    return {int((j + 0.5) * total / k) for j in range(k)}


def _passes(n: int, rng: random.Random):
    """Indices 0..n-1 in shuffled passes: every index once before any repeats."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        yield from perm


def mix_records(task: Sequence[dict], refusals: Sequence[dict], fraction: float, *, seed: int = 0) -> List[dict]:
    """``task`` (every record once, in its order) with k = round(fraction/(1 − fraction)·len(task)) refusal
    demonstrations inserted at evenly spread positions, so they are a share ``fraction`` of the result; the
    demonstrations are drawn in seeded shuffled passes (each once before any repeats). ``fraction`` in [0, 1);
    0 returns a copy of ``task``. The records are the caller's dicts (not copied)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"mix_records: `fraction` must be a number in [0, 1), got {fraction!r}")
    if not task:
        raise ValueError("mix_records: `task` holds no record")
    k = round(fraction / (1.0 - fraction) * len(task)) if fraction else 0
    if k and not refusals:
        raise ValueError("mix_records: `fraction` > 0 needs refusal demonstrations (`refusals` is empty)")
    total = len(task) + k
    slots = mix_slots(total, k)
    t, r = iter(task), _passes(len(refusals), random.Random(seed))
    return [refusals[next(r)] if i in slots else next(t) for i in range(total)]


def example_schedule(n_train: int, steps: int, batch: int, seed: int, n_mix: int = 0,
                     mix_fraction: float = 0.0) -> List[List[Tuple[str, int]]]:
    """Which example fills each slot of each step: ``steps`` lists of ``batch`` pairs ``("task", i)`` (an index
    into the task data) or ``("mix", j)`` (into the ``n_mix`` refusal demonstrations).

    Task examples come in seeded shuffled passes over the data (``random.Random(seed)``: the same order for every
    method of a seed). With mixing, k = round(mix_fraction · steps · batch) slots (:func:`mix_slots`) hold refusal
    demonstrations instead, in seeded shuffled passes of their own; the task stream skips no example, it only
    arrives later."""
    if mix_fraction and not n_mix:
        raise ValueError("example_schedule: mix_fraction > 0 needs refusal demonstrations (n_mix > 0)")
    total = steps * batch
    k = round(mix_fraction * total) if mix_fraction else 0
    slots = mix_slots(total, k)
    task, mix = _passes(n_train, random.Random(seed)), _passes(n_mix, random.Random(seed + 1_000_003))
    flat = [("mix", next(mix)) if i in slots else ("task", next(task)) for i in range(total)]
    return [flat[i:i + batch] for i in range(0, total, batch)]
