"""Pluggable judges end to end: a callable, 'module:function', a local HF classifier and a local causal LM prompted
as a classifier (tiny random models built here and saved to tmp dirs; nothing is downloaded)."""
from __future__ import annotations

import json

import pytest

from agl.cli import main
from agl.driftcaps import DriftReport, evaluate
from agl.driftcaps.judge import default_judge, judge_name, resolve_judge
from agl.driftcaps.judge_hf import detect_kind, make_hf_judge

from _dc_tiny import TINY_PROMPTS, keyword_judge, make_classifier_dir

TEMPLATE = "{prompt} please {response} the"
ANSWERS = {"sorry": "refusal", "sure": "compliance"}


def test_resolve_judge_forms(tmp_path):
    assert resolve_judge(None) is default_judge and resolve_judge("heuristic") is default_judge
    assert resolve_judge(keyword_judge) is keyword_judge
    assert resolve_judge("_dc_tiny:keyword_judge") is keyword_judge
    assert judge_name(keyword_judge) == "_dc_tiny.keyword_judge" and judge_name(default_judge) == default_judge.name
    for bad, msg in ((42, "judge must be"), ("no/such/dir", "judge must be"), ("_dc_tiny:nothing", "cannot import"),
                     ("_dc_tiny:TINY_PROMPTS", "not callable")):
        with pytest.raises(ValueError, match=msg):
            resolve_judge(bad)


def _independent_choice(model_dir, prompt, response):
    """The answer a generator judge should pick, computed here without its code: mean log-prob of each answer's
    tokens after the rendered template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ctx = tok(TEMPLATE.format(prompt=prompt, response=response), add_special_tokens=True)["input_ids"]
    scores = {}
    for a in ANSWERS:
        ids = tok(" " + a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + ids])).logits[0].float(), -1)
        scores[a] = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(ids)) / len(ids)
    return {"sorry": "refused", "sure": "complied"}[max(scores, key=scores.get)]


def test_generator_judge_scores_the_answers(tiny_model_dir):
    assert detect_kind(tiny_model_dir) == "generator"
    judge = make_hf_judge(tiny_model_dir, template=TEMPLATE, answers=ANSWERS)
    assert judge.name == "hf-generator:tiny-model:custom"
    for p in TINY_PROMPTS[:4]:
        for response in ("sorry can't help with that", "sure here are the steps one two three"):
            assert judge(p["prompt"], response) == _independent_choice(tiny_model_dir, p["prompt"], response)
    flipped = make_hf_judge(tiny_model_dir, template=TEMPLATE, answers={"sorry": "compliance", "sure": "refusal"})
    v, w = judge("how do i make a bomb", "sorry"), flipped("how do i make a bomb", "sorry")
    assert {v, w} == {"refused", "complied"}
    # built-in templates load and answer with one of their outcomes
    assert make_hf_judge(tiny_model_dir)("a", "b") in ("refused", "complied")
    assert make_hf_judge(tiny_model_dir, template="llama-guard")("a", "b") in ("refused", "complied")
    assert make_hf_judge(tiny_model_dir, template="harmbench", max_length=8)("a " * 50, "b " * 50) in (
        "refused", "complied")  # long inputs are cut to max_length


def test_generator_judge_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="template must be"):
        make_hf_judge(tiny_model_dir, template="nope")
    with pytest.raises(ValueError, match="answers"):
        make_hf_judge(tiny_model_dir, template=TEMPLATE)
    with pytest.raises(ValueError, match="kind must be"):
        make_hf_judge(tiny_model_dir, kind="oracle")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="neither"):
        make_hf_judge(tmp_path / "odd")


def test_evaluate_with_model_directory_judges(tiny_lm, tiny_prompts, tiny_model_dir, tmp_path):
    model, tok = tiny_lm
    make_classifier_dir(tmp_path / "clf", labels=("compliance", "refusal", "incoherent"))
    clf = make_hf_judge(tmp_path / "clf")
    rep = evaluate(model, tok, tiny_prompts, max_new_tokens=4, batch_size=4, judge=str(tmp_path / "clf"),
                   incoherence=False, progress=False)
    assert rep.meta["judge"] == "hf-classifier:clf"
    for r in rep.records:  # the same verdicts as the judge built directly
        v = clf(r["prompt"], r["response"])
        assert r["outcome"] == ("incoherent" if v == "incoherent" else "refused" if v else "complied")
    gen = evaluate(model, tok, tiny_prompts, max_new_tokens=4, batch_size=4, judge=tiny_model_dir,
                   incoherence=False, progress=False)
    assert gen.meta["judge"] == "hf-generator:tiny-model:refusal"
    assert all(r["outcome"] in ("refused", "complied") for r in gen.records)
    assert DriftReport.from_json(gen.to_json()).meta["judge"] == "hf-generator:tiny-model:refusal"


def run(capsys, *argv):
    code = main(["driftcaps", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_custom_judge_and_stratified_limit(capsys, tmp_path, tiny_model_dir):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in TINY_PROMPTS) + "\n")
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "run", "--model", str(tiny_model_dir), "--prompts", str(f), "--out", str(out),
                            "--max-new-tokens", "3", "--limit", "4", "--judge", "_dc_tiny:keyword_judge",
                            "--no-incoherence", "--no-progress")
    assert code == 0, err
    rep = DriftReport.from_json(out / "report.json")
    assert rep.meta["judge"] == "_dc_tiny.keyword_judge" and "_dc_tiny.keyword_judge" in stdout
    assert "_dc_tiny.keyword_judge" in (out / "report.md").read_text()
    labels = [r["label"] for r in rep.records]
    assert labels.count("unsafe") == 2 and labels.count("safe") == 2  # stratified: both labels
    assert len({r["category"] for r in rep.records}) == 4
    assert all(r["refused"] == ("bomb" in r["prompt"]) for r in rep.records)
    code, _, err = run(capsys, "run", "--model", str(tiny_model_dir), "--prompts", str(f), "--out",
                       str(tmp_path / "first"), "--max-new-tokens", "2", "--limit", "4", "--sample", "first",
                       "--no-progress")
    assert code == 0, err
    first = DriftReport.from_json(tmp_path / "first" / "report.json")
    assert [r["id"] for r in first.records] == [p["id"] for p in TINY_PROMPTS[:4]]
    code, _, err = run(capsys, "run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                       "--judge", "not_a_module_xyz:f")
    assert code != 0 and "--judge" in err and "cannot import" in err
