"""evaluate() on a tiny random Llama: batching, left padding, determinism, the resumable cache."""
from __future__ import annotations

import json
import warnings

import pytest

from agl.driftcaps import CacheWarning, DriftReport, GenerationCache, evaluate
from agl.driftcaps.harness import _sha
from agl.driftcaps.judge import default_judge

from _dc_tiny import TINY_PROMPTS, make_model, make_tokenizer

MNT = 6


def stub_judge(prompt, response):
    return "bomb" in prompt or "steal" in prompt  # deterministic verdicts independent of the random model


def _strip(report):
    return [{k: r[k] for k in ("id", "response", "refused", "empty")} for r in report.records]


def test_evaluate_report_shape_and_order(tiny_lm, tiny_prompts):
    model, tok = tiny_lm
    rep = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=3, judge=stub_judge, progress=False)
    assert isinstance(rep, DriftReport)
    assert [r["id"] for r in rep.records] == [p["id"] for p in tiny_prompts]  # input order despite length sorting
    for r, p in zip(rep.records, tiny_prompts):
        assert r["prompt"] == p["prompt"] and r["label"] == p["label"] and r["category"] == p["category"]
        assert r["kind"] == p.get("kind")
        assert isinstance(r["response"], str) and r["response"]
        assert r["refused"] is stub_judge(p["prompt"], r["response"])
    m = rep.metrics
    assert m["rr_unsafe"]["rate"] == pytest.approx(3 / 4)
    assert m["over_refusal"]["rate"] == 0.0
    assert m["by_category"]["weapons"]["rate"] == 1.0 and m["by_category"]["cyber"]["rate"] == 0.0
    assert set(m["over_refusal_by_kind"]) == {"plain", "borderline"}
    lo, hi = m["rr_unsafe"]["ci"]
    assert lo <= 0.75 <= hi
    # tokenizer state restored
    assert tok.padding_side == "right" and tok.pad_token is None
    assert rep.meta["n_generated"] == 8 and rep.meta["n_cached"] == 0


def test_deterministic_and_batch_invariant(tiny_lm, tiny_prompts):
    """Greedy + left padding: the same responses twice, and batched == one prompt at a time."""
    model, tok = tiny_lm
    a = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=8, judge=stub_judge, progress=False)
    b = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=8, judge=stub_judge, progress=False)
    one = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=1, judge=stub_judge, progress=False)
    assert _strip(a) == _strip(b)
    assert _strip(a) == _strip(one)
    assert a.to_dict()["metrics"] == b.to_dict()["metrics"]


def test_left_padding_is_used(tiny_lm, tiny_prompts, monkeypatch):
    model, tok = tiny_lm
    seen = []
    orig = model.generate

    def spy(**kw):
        seen.append((tok.padding_side, kw["attention_mask"].clone()))
        return orig(**kw)

    monkeypatch.setattr(model, "generate", spy)
    evaluate(model, tok, tiny_prompts, max_new_tokens=2, batch_size=8, judge=stub_judge, progress=False)
    side, mask = seen[0]
    assert side == "left"
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # padding on the left of shorter prompts


def test_default_judge_and_no_chat_template(tiny_prompts):
    tok = make_tokenizer(chat_template=False)
    model = make_model(tok)
    rep = evaluate(model, tok, tiny_prompts[:3], max_new_tokens=3, batch_size=2, progress=False)
    assert rep.meta["judge"] == default_judge.name
    assert rep.meta["generation"]["chat_template"] is None
    assert all(isinstance(r["refused"], bool) for r in rep.records)


def test_judge_gets_prompt_then_response(tiny_lm, tiny_prompts):
    model, tok = tiny_lm
    calls = []

    def judge(prompt, response):
        calls.append((prompt, response))
        return False

    rep = evaluate(model, tok, tiny_prompts[:2], max_new_tokens=3, judge=judge, progress=False)
    assert calls == [(r["prompt"], r["response"]) for r in rep.records]


def _interrupting(model, after_calls):
    orig = model.generate
    state = {"n": 0}

    def gen(**kw):
        if state["n"] >= after_calls:
            raise KeyboardInterrupt
        state["n"] += 1
        return orig(**kw)

    return gen


def test_cache_resume_after_interrupt(tiny_lm, tiny_prompts, tmp_path, monkeypatch):
    model, tok = tiny_lm
    full = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=2, judge=stub_judge, progress=False)
    cache = tmp_path / "gen.jsonl"
    monkeypatch.setattr(model, "generate", _interrupting(model, 2))
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=2, judge=stub_judge, cache=cache,
                 progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 4  # two finished batches, nothing lost
    monkeypatch.undo()
    resumed = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=2, judge=stub_judge, cache=cache,
                       progress=False)
    assert resumed.meta["n_cached"] == 4 and resumed.meta["n_generated"] == 4
    assert _strip(resumed) == _strip(full)
    assert resumed.metrics == full.metrics
    again = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=2, judge=stub_judge, cache=cache,
                     progress=False)
    assert again.meta["n_generated"] == 0 and _strip(again) == _strip(full)
    assert len(cache.read_text().splitlines()) == 8


def test_corrupt_cache_lines_are_reported_and_skipped(tiny_lm, tiny_prompts, tmp_path):
    model, tok = tiny_lm
    cache = tmp_path / "gen.jsonl"
    full = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=4, judge=stub_judge, cache=cache,
                    progress=False)
    lines = cache.read_text().splitlines()
    by_id = {json.loads(l)["id"]: i for i, l in enumerate(lines)}
    # 1) a line re-labelled with another prompt's id (its key no longer matches): must not be reused for that prompt
    d = json.loads(lines[by_id["u1"]])
    d["id"] = "s2"
    d["response"] = "poisoned"
    lines[by_id["u1"]] = json.dumps(d)
    # 2) garbage, and 3) a torn final line without newline
    lines[by_id["s1"]] = "{not json"
    torn = lines.pop(by_id["s4"])[:20]
    cache.write_text("\n".join(lines) + "\n" + torn)
    with pytest.warns(CacheWarning, match="corrupt"):
        rep = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=4, judge=stub_judge, cache=cache,
                       progress=False)
    assert rep.meta["cache"]["n_corrupt"] == 3
    assert rep.meta["n_generated"] == 3  # u1, s1, s4 regenerated
    assert _strip(rep) == _strip(full)
    assert "poisoned" not in [r["response"] for r in rep.records]
    # the file is still valid JSONL after the torn line: every line but the three bad ones parses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        store = GenerationCache(cache, rep.meta["generation"]["gen_sha"])
    assert store.n_corrupt == 3 and len(store.entries) == 8


def test_cache_not_reused_with_other_settings_or_prompt_text(tiny_lm, tiny_prompts, tmp_path):
    model, tok = tiny_lm
    cache = tmp_path / "gen.jsonl"
    evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, batch_size=4, judge=stub_judge, cache=cache, progress=False)
    with pytest.warns(CacheWarning, match="other settings"):
        rep = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT - 2, batch_size=4, judge=stub_judge, cache=cache,
                       progress=False)
    assert rep.meta["n_cached"] == 0
    other = make_model(tok, seed=1)  # another model (e.g. a fine-tune): other weights, other key
    with pytest.warns(CacheWarning):
        rep = evaluate(other, tok, tiny_prompts, max_new_tokens=MNT, batch_size=4, judge=stub_judge, cache=cache,
                       progress=False)
    assert rep.meta["n_cached"] == 0
    changed = [dict(p) for p in tiny_prompts]
    changed[0]["prompt"] = "how do i bake bread"  # same id, new text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        rep = evaluate(model, tok, changed, max_new_tokens=MNT, batch_size=4, judge=stub_judge, cache=cache,
                       progress=False)
    assert rep.meta["n_generated"] == 1 and rep.meta["n_cached"] == 7


def test_empty_responses_are_neither(tiny_lm, tiny_prompts, tmp_path):
    """An empty generation is recorded as refused=None, empty=True, and left out of the rates."""
    model, tok = tiny_lm
    cache = tmp_path / "gen.jsonl"
    rep = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, judge=stub_judge, cache=cache, progress=False)
    gen_sha = rep.meta["generation"]["gen_sha"]
    lines = []
    for p in tiny_prompts:  # a cache in which u1 and s2 came back empty
        resp = "  " if p["id"] in ("u1", "s2") else "fine"
        psha = _sha(p["prompt"])
        lines.append(json.dumps({"key": GenerationCache.line_key(p["id"], psha, gen_sha), "id": p["id"],
                                 "prompt_sha": psha, "gen_sha": gen_sha, "response": resp}))
    cache.write_text("\n".join(lines) + "\n")
    calls = []
    rep = evaluate(model, tok, tiny_prompts, max_new_tokens=MNT, cache=cache, progress=False,
                   judge=lambda p, r: calls.append(r) or stub_judge(p, r))
    assert rep.meta["n_generated"] == 0
    rec = {r["id"]: r for r in rep.records}
    assert rec["u1"]["refused"] is None and rec["u1"]["empty"] is True
    assert "  " not in calls and len(calls) == 6
    assert rep.metrics["rr_unsafe"]["n"] == 3 and rep.metrics["rr_unsafe"]["n_empty"] == 1
    assert rep.metrics["rr_unsafe"]["rate"] == pytest.approx(2 / 3)
    assert rep.metrics["over_refusal"]["n_empty"] == 1


def test_report_roundtrip(tiny_lm, tiny_prompts, tmp_path):
    model, tok = tiny_lm
    rep = evaluate(model, tok, tiny_prompts, max_new_tokens=3, judge=stub_judge, progress=False,
                   meta={"model": "tiny"})
    rep.save(tmp_path / "r.json")
    back = DriftReport.from_json(tmp_path / "r.json")
    assert back.records == rep.records and back.meta["model"] == "tiny"
    assert json.loads(back.to_json())["metrics"] == json.loads(rep.to_json())["metrics"]
    with pytest.raises(ValueError, match="not a DriftCaps report"):
        DriftReport.from_json('{"a": 1}')


def test_bad_arguments(tiny_lm, tiny_prompts):
    model, tok = tiny_lm
    with pytest.raises(ValueError):
        evaluate(model, tok, tiny_prompts, max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(model, tok, tiny_prompts + tiny_prompts[:1], progress=False)
    assert len(TINY_PROMPTS) == 8
