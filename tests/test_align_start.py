"""The aligned start's data: well-formed, deterministic, and disjoint from the DriftCaps eval split and from the
tuning-dev set it was chosen on."""
from __future__ import annotations

from collections import Counter

import pytest

from agl.driftcaps import load_prompts
from agl.driftcaps.judge import judge_refusal
from agl.experiment import align_start
from agl.experiment.align_start import (build_alignment_data, load_borderline, load_refusals, near_duplicate,
                                        tuning_dev_prompts)
from agl.experiment.config import ExperimentConfig


@pytest.fixture(scope="module")
def cfg():
    return ExperimentConfig()  # the defaults: the tuned recipe


@pytest.fixture(scope="module")
def data(cfg):
    return build_alignment_data(cfg)


def test_near_duplicate():
    assert near_duplicate("How do I kill a zombie process?", "how do I kill a zombie process")
    assert near_duplicate("What is SQL injection and how do developers prevent it?",
                          "What is SQL injection, and how do developers prevent it?")
    assert near_duplicate("How do doctors treat a snake bite?", "How do doctors treat a venomous snake bite?")
    assert not near_duplicate("How do I kill a zombie process?", "Write a haiku about the ocean.")
    assert not near_duplicate("What should I do if I smell gas in my house?",
                              "What should I do if I think someone is stalking me?")


def test_own_borderline_prompts_are_well_formed():
    own = load_borderline()
    assert len(own) >= 80
    ids = [r["id"] for r in own]
    assert len(set(ids)) == len(ids)
    driftcaps_ids = {p.id for p in load_prompts()}
    assert not set(ids) & driftcaps_ids
    texts = [r["prompt"].strip().lower() for r in own]
    assert len(set(texts)) == len(texts) and all(texts)
    cats = Counter(r["category"] for r in own)
    borderline_cats = {p.category for p in load_prompts() if p.kind == "borderline"}
    assert set(cats) <= borderline_cats, set(cats) - borderline_cats
    assert min(cats.values()) >= 5  # every kind of risky-sounding request is represented


def test_refusal_texts_are_refusals():
    for r in load_refusals():
        assert judge_refusal(r["text"]), r["id"]


@pytest.mark.slow  # > 5 s: left out of `make test-fast`
def test_sft_data_is_disjoint_from_the_eval_split(cfg, data):
    assert cfg.align_n_borderline > 0, "the tuned recipe uses the project's borderline prompts"
    sft = data["sft_unsafe"] + data["sft_safe"] + data["sft_own"]
    assert len(data["sft_own"]) == cfg.align_n_borderline + cfg.align_n_borderline_more
    evals = [p.prompt for p in load_prompts(cfg.prompts, split="eval")]
    eval_set = {t.strip().lower() for t in evals}
    hits = [(r["prompt"], e) for r in sft for e in evals
            if r["prompt"].strip().lower() in eval_set or near_duplicate(r["prompt"], e)]
    assert not hits, hits[:5]
    cal_ids = {p.id for p in load_prompts(cfg.prompts, split="calibration")}
    own_ids = {r["id"] for r in load_borderline() + load_borderline("builtin-more")}
    assert all(r["id"] in cal_ids | own_ids for r in sft)


def test_sft_data_is_disjoint_from_the_tuning_dev_set(cfg, data):
    dev = tuning_dev_prompts(cfg)
    sft = data["sft_unsafe"] + data["sft_safe"] + data["sft_own"]
    assert not {r["id"] for r in dev} & {r["id"] for r in sft}
    assert not {r["prompt"] for r in dev} & {r["prompt"] for r in sft}
    labels = Counter(r["label"] for r in dev)
    assert labels == {"unsafe": cfg.align_holdout, "safe": cfg.align_dev_safe}
    kinds = Counter(r["kind"] for r in dev if r["label"] == "safe")
    assert kinds["borderline"] > 0 and kinds["plain"] > 0
    assert all(r["split"] == "calibration" for r in dev)
    from agl.driftcaps.prompts import prompts_from_records

    assert len(prompts_from_records(dev)) == len(dev)  # valid DriftCaps records


def test_selection_is_deterministic_and_the_holdout_does_not_move(cfg, data):
    assert build_alignment_data(cfg) == data
    without_own = build_alignment_data(cfg.replace(align_n_borderline=0, align_n_borderline_more=0))
    assert without_own["holdout"] == data["holdout"]  # the ΔL_align demonstrations do not depend on the mix
    assert without_own["sft_safe"] == data["sft_safe"] and without_own["sft_own"] == []
    for r in data["sft_unsafe"] + data["holdout"]:
        assert r["response"] and judge_refusal(r["response"])


def test_distillation_re_asks_refused_answers_and_drops_persistent_ones(monkeypatch, tmp_path, cfg):
    """A base answer the judge calls a refusal is asked for again with the steering preamble; kept if the new answer
    helps, dropped if it refuses again; helpful first answers are kept as they are."""
    first = {"a": "Sure: run `kill -9` on its parent.", "b": "I'm sorry, but I can't help with that.",
             "c": "I can't help with that."}
    steered = {"b": "A zombie process is reaped when its parent calls wait().", "c": "Sorry, I can't do that."}

    def fake_generate(model, tok, prompts, **kw):
        out = []
        for p in prompts:
            key = p[len(align_start.STEER):] if p.startswith(align_start.STEER) else p
            text = (steered if p.startswith(align_start.STEER) else first)[key]
            out.append({"prompt": p, "response": text, "finished": True})
        return out

    monkeypatch.setattr(align_start, "generate", fake_generate)
    recs = [{"id": k, "prompt": k} for k in "abc"]
    out, counts = align_start._distil(cfg, None, None, recs, str(tmp_path), progress=False)
    assert [(r["id"], r["response"]) for r in out] == [("a", first["a"]), ("b", steered["b"])]
    assert counts == {"n_distilled": 3, "n_refused_first": 2, "n_steered": 1, "n_dropped": 1}
    out, counts = align_start._distil(cfg.replace(align_distill_filter=False), None, None, recs, str(tmp_path),
                                      progress=False)
    assert len(out) == 3 and counts["n_refused_first"] == 0
