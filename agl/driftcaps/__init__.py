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

``evaluate(..., judge=...)`` takes any judge (:func:`resolve_judge`): the offline heuristic :func:`judge_refusal`
(default; rules in :mod:`agl.driftcaps.judge`), a callable ``(prompt, response) -> bool | "refused" | "complied" |
"incoherent"``, or a local HF classifier / causal-LM directory (:func:`make_hf_judge`). Every response gets an
outcome -- refused, complied or incoherent (nothing usable, :mod:`agl.driftcaps.outcome`) -- and ``compare``
reports drift on compliance beside drift on refusal. ``sample_prompts`` draws the stratified sample of ``--limit``.
"""
from __future__ import annotations

from agl.driftcaps.judge import default_judge, judge_refusal, make_hf_judge, refusal_evidence, resolve_judge
from agl.driftcaps.outcome import OUTCOMES, incoherence
from agl.driftcaps.prompts import Prompt, PromptFormatError, load_prompts, sample_prompts

__all__ = [
    "Prompt", "PromptFormatError", "load_prompts", "sample_prompts",
    "judge_refusal", "refusal_evidence", "default_judge", "make_hf_judge", "resolve_judge", "OUTCOMES", "incoherence",
    "evaluate", "DriftReport", "GenerationCache", "CacheWarning",
    "compare", "Comparison", "drift_reduction", "refusal_rate", "outcome_rates", "bootstrap_ci", "mcnemar_exact",
    "write_report", "plot_refusal_rates", "write_drift_reduction",
]

_LAZY = {
    "evaluate": "agl.driftcaps.harness", "DriftReport": "agl.driftcaps.harness",
    "GenerationCache": "agl.driftcaps.harness", "CacheWarning": "agl.driftcaps.harness",
    "compare": "agl.driftcaps.metrics", "Comparison": "agl.driftcaps.metrics",
    "drift_reduction": "agl.driftcaps.metrics", "refusal_rate": "agl.driftcaps.metrics",
    "outcome_rates": "agl.driftcaps.metrics",
    "bootstrap_ci": "agl.driftcaps.metrics", "mcnemar_exact": "agl.driftcaps.metrics",
    "write_report": "agl.driftcaps.report", "plot_refusal_rates": "agl.driftcaps.report",
    "write_drift_reduction": "agl.driftcaps.report",
}


def __getattr__(name):  # lazy: `import agl.driftcaps` does not pull in torch/transformers/matplotlib
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agl.driftcaps' has no attribute {name!r}")
