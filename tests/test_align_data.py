"""The second aligned-start attempt's data (issue 21, item 5): the extra borderline-safe SFT prompts
(data/borderline_more.jsonl, ``align_n_borderline_more``) and the enlarged tuning-dev set (data/tuning_dev_more.jsonl)
are well formed, new (no near duplicate of any DriftCaps or project prompt), never mixed with each other, and leave
today's recipe unchanged at ``align_n_borderline_more=0``; and the tuning driver's pre-registered selection rule."""
from __future__ import annotations

import importlib.util
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from agl.driftcaps import load_prompts
from agl.driftcaps.prompts import prompts_from_records
from agl.experiment import align_start
from agl.experiment.align_start import (build_alignment_data, load_borderline, load_tuning_dev_more, near_duplicate,
                                        tuning_dev_prompts)
from agl.experiment.config import STAGE_FIELDS, ExperimentConfig
from agl.experiment.plan import stage_plan

N_MORE = 120


@pytest.fixture(scope="module")
def cfg():
    return ExperimentConfig(align_n_borderline_more=0, align_steps=90)  # the first attempt's recipe


@pytest.fixture(scope="module")
def more():
    return load_borderline("builtin-more")


@pytest.fixture(scope="module")
def dev_more():
    return load_tuning_dev_more()


def test_borderline_more_is_well_formed(more):
    assert len(more) == N_MORE
    assert all(set(r) == {"id", "prompt", "category"} and r["prompt"].strip() for r in more)
    assert all(re.fullmatch(rf"own-borderline2-{re.escape(r['category'])}-\d\d", r["id"]) for r in more)
    ids = [r["id"] for r in more]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & ({p.id for p in load_prompts()} | {r["id"] for r in load_borderline()})
    cats = Counter(r["category"] for r in more)
    assert len(cats) >= 10 and min(cats.values()) >= 5  # varied topics, none a token


def test_tuning_dev_more_is_well_formed(dev_more, more):
    assert len(dev_more) == 160
    ids = [r["id"] for r in dev_more]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & ({p.id for p in load_prompts()} | {r["id"] for r in load_borderline() + more})
    assert all(r["split"] == "calibration" for r in dev_more)  # dev only: never in the eval split
    unsafe = [r for r in dev_more if r["label"] == "unsafe"]
    safe = [r for r in dev_more if r["label"] == "safe"]
    assert len(unsafe) == 64 and len(safe) == 96
    assert Counter(r["kind"] for r in safe) == {"borderline": 48, "plain": 48}
    assert all(r["kind"] is None for r in unsafe)
    harm = Counter(r["category"] for r in unsafe)
    assert set(harm) == {p.category for p in load_prompts() if p.label == "unsafe"}  # every harm category ...
    assert min(harm.values()) >= 7  # ... about evenly
    assert len(prompts_from_records(dev_more)) == 160  # valid DriftCaps records


@pytest.mark.slow  # ~15 s: 280 new prompts against ~1000
def test_new_prompts_are_no_near_duplicates(more, dev_more):
    new = [r["prompt"] for r in more + dev_more]
    old = [p.prompt for p in load_prompts()] + [r["prompt"] for r in load_borderline()]  # both splits
    hits = [(a, b) for i, a in enumerate(new) for b in old + new[i + 1:] if near_duplicate(a, b)]
    assert not hits, hits[:5]


def test_zero_more_is_todays_recipe(cfg):
    """At 0 (the first attempt's recipe) nothing of the new file is read and the aligned start's stage key is the one runs cached
    before the field existed (the field is left out of it)."""
    assert cfg.align_n_borderline_more == 0
    data = build_alignment_data(cfg)
    assert len(data["sft_own"]) == cfg.align_n_borderline
    assert {r["id"] for r in data["sft_own"]} <= {r["id"] for r in load_borderline()}
    assert "align_n_borderline_more" not in cfg.key(STAGE_FIELDS["aligned_start"])
    bigger = cfg.replace(align_n_borderline_more=5)
    assert bigger.key(STAGE_FIELDS["aligned_start"])["align_n_borderline_more"] == 5
    assert stage_plan(bigger)["aligned_start"].hash != stage_plan(cfg)["aligned_start"].hash


@pytest.mark.parametrize("n", [1, 17, N_MORE])
def test_more_adds_n_borderline_records_and_nothing_else_moves(cfg, more, n, monkeypatch, tmp_path):
    base = build_alignment_data(cfg)
    data = build_alignment_data(cfg.replace(align_n_borderline_more=n))
    assert {k: v for k, v in data.items() if k != "sft_own"} == {k: v for k, v in base.items() if k != "sft_own"}
    k = cfg.align_n_borderline
    assert data["sft_own"][:k] == base["sft_own"]
    added = data["sft_own"][k:]
    assert len(added) == n and len({r["id"] for r in added}) == n
    assert {r["id"] for r in added} <= {r["id"] for r in more}
    assert all(r["kind"] == "borderline" and set(r) == set(base["sft_own"][0]) for r in added)  # same slots
    full = build_alignment_data(cfg.replace(align_n_borderline_more=N_MORE))["sft_own"][k:]
    assert added == full[:n]  # the first n of one seeded order
    # the added prompts are distilled like the others: each gets the base model's answer as its response
    monkeypatch.setattr(align_start, "generate", lambda model, tok, prompts, **kw: [
        {"prompt": p, "response": f"A helpful answer to: {p}", "finished": True} for p in prompts])
    out, counts = align_start._distil(cfg, None, None, added, str(tmp_path), progress=False)
    assert [r["id"] for r in out] == [r["id"] for r in added] and counts["n_dropped"] == 0
    assert all(r["response"].endswith(r["prompt"]) for r in out)


def test_more_out_of_range_is_a_clear_error(cfg):
    for n in (-1, N_MORE + 1):
        with pytest.raises(ValueError, match="align_n_borderline_more"):
            build_alignment_data(cfg.replace(align_n_borderline_more=n))


def test_enlarged_tuning_dev_set_is_held_out(cfg, dev_more):
    dev = tuning_dev_prompts(cfg, more=True)
    assert dev[: len(dev) - len(dev_more)] == tuning_dev_prompts(cfg)
    assert Counter(r["label"] for r in dev) == {"unsafe": cfg.align_holdout + 64, "safe": cfg.align_dev_safe + 96}
    data = build_alignment_data(cfg.replace(align_n_borderline_more=N_MORE))
    sft = data["sft_unsafe"] + data["sft_safe"] + data["sft_own"]
    assert not {r["id"] for r in dev} & {r["id"] for r in sft}
    assert not {r["prompt"] for r in dev} & {r["prompt"] for r in sft}
    assert len(prompts_from_records(dev)) == len(dev)


# --- the driver's pre-registered rule (docs/results/2026-12-05-aligned-start/tune.py)
def _tune():
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "2026-12-05-aligned-start" / "tune.py"
    spec = importlib.util.spec_from_file_location("aligned_start_2026_12_05_tune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(run, steps, rr, orr, n_unsafe=96, n_safe=144):
    return {"run": run, "steps": steps, "candidate": f"{run}@{steps}",
            "rr_unsafe": {"n_refused": rr, "n": n_unsafe}, "over_refusal": {"n_refused": orr, "n": n_safe}}


def test_select_rule_on_synthetic_numbers():
    select = _tune().select
    # 87/96 = 90.6% reaches 90%, 86/96 does not; among those that reach it the lowest over-refusal wins
    rows = [_row("incumbent", 90, 86, 5), _row("R3", 60, 87, 20), _row("R3", 90, 90, 12), _row("R3", 120, 95, 30)]
    assert select(rows) == (rows[2], "rule")
    # exactly 90% counts (exact fractions, no float rounding)
    assert select([_row("R3", 60, 9, 5, n_unsafe=10), _row("incumbent", 90, 8, 0, n_unsafe=10)])[0]["run"] == "R3"
    # ties on over-refusal: higher RR, then fewer steps, then the incumbent
    assert select([_row("R3", 60, 90, 10), _row("R3", 90, 92, 10)])[0]["steps"] == 90
    assert select([_row("R3", 120, 90, 10), _row("R3", 60, 90, 10)])[0]["steps"] == 60
    assert select([_row("R3", 90, 90, 10), _row("incumbent", 90, 90, 10)])[0]["run"] == "incumbent"
    # none reaches 90%: the highest RR - over-refusal (here 80/96 - 0/144 beats 86/96 - 15/144)
    rows = [_row("incumbent", 90, 86, 15), _row("R3", 60, 80, 0)]
    assert select(rows) == (rows[1], "fallback")
    assert Fraction(86, 96) - Fraction(15, 144) < Fraction(80, 96)
    with pytest.raises(ValueError, match="no candidates"):
        select([])
