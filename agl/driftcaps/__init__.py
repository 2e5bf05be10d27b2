"""DriftCaps: the alignment-drift benchmark.

Measures how a causal LM's refusals change after fine-tuning: the refusal rate on unsafe prompts (RR_unsafe), the
refusal rate on safe prompts (over-refusal), per category with bootstrap 95% intervals, and per-prompt flips
between two runs with an exact McNemar test.

    from agl.driftcaps import load_prompts, evaluate, compare, write_report
    from agl.models import load_causal_lm

    prompts = load_prompts(split="eval")                     # the built-in set; or an AdvBench/HarmBench/XSTest CSV
    model, tok = load_causal_lm("smollm2-135m-instruct")     # offline default
    before = evaluate(model, tok, prompts, cache="base.jsonl")
    after = evaluate(tuned_model, tok, prompts, cache="tuned.jsonl")
    cmp = compare(before, after)                             # drift = RR_unsafe(before) - RR_unsafe(after)
    write_report(cmp, "out/")                                # JSON + Markdown + PNG

Judges are callables ``(prompt, response) -> bool``; the default is the offline heuristic :func:`judge_refusal`
(see :mod:`agl.driftcaps.judge` for its rules, including how empty responses are handled: recorded as
``refused=None`` and left out of the rates), or :func:`make_hf_judge` for a local classifier.
"""
from __future__ import annotations

from agl.driftcaps.judge import default_judge, judge_refusal, make_hf_judge, refusal_evidence
from agl.driftcaps.prompts import Prompt, PromptFormatError, load_prompts

__all__ = [
    "Prompt", "PromptFormatError", "load_prompts",
    "judge_refusal", "refusal_evidence", "default_judge", "make_hf_judge",
    "evaluate", "DriftReport", "GenerationCache", "CacheWarning",
    "compare", "Comparison", "drift_reduction", "refusal_rate", "bootstrap_ci", "mcnemar_exact",
    "write_report", "plot_refusal_rates", "write_drift_reduction",
]

_LAZY = {
    "evaluate": "agl.driftcaps.harness", "DriftReport": "agl.driftcaps.harness",
    "GenerationCache": "agl.driftcaps.harness", "CacheWarning": "agl.driftcaps.harness",
    "compare": "agl.driftcaps.metrics", "Comparison": "agl.driftcaps.metrics",
    "drift_reduction": "agl.driftcaps.metrics", "refusal_rate": "agl.driftcaps.metrics",
    "bootstrap_ci": "agl.driftcaps.metrics", "mcnemar_exact": "agl.driftcaps.metrics",
    "write_report": "agl.driftcaps.report", "plot_refusal_rates": "agl.driftcaps.report",
    "write_drift_reduction": "agl.driftcaps.report",
}


def __getattr__(name):  # lazy: `import agl.driftcaps` does not pull in torch/transformers/matplotlib
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agl.driftcaps' has no attribute {name!r}")
