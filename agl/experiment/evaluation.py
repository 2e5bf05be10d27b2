"""Stage 4: evaluation of one model: DriftCaps refusals on the eval prompts and task exact-match."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

from agl.experiment._common import generate
from agl.experiment.tasks import score_exact_match

__all__ = ["select_eval_prompts", "drift_eval", "task_eval", "verdicts"]


def select_eval_prompts(cfg) -> List[dict]:
    """The DriftCaps prompts of ``cfg.eval_split``; with ``eval_n_unsafe``/``eval_n_safe`` a fixed subset, spread
    evenly over categories (unsafe) and kinds (safe) by a seeded round-robin."""
    from agl.driftcaps import load_prompts

    prompts = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in load_prompts(cfg.prompts, split=cfg.eval_split)]

    def pick(items: List[dict], n: Optional[int], group_key: str) -> List[dict]:
        if n is None or n >= len(items):
            return items
        rng = random.Random(0)
        groups: Dict[str, List[dict]] = {}
        for p in sorted(items, key=lambda p: p["id"]):
            groups.setdefault(str(p.get(group_key)), []).append(p)
        for g in groups.values():
            rng.shuffle(g)
        out: List[dict] = []
        keys = sorted(groups)
        i = 0
        while len(out) < n:
            for k in keys:
                if i < len(groups[k]) and len(out) < n:
                    out.append(groups[k][i])
            i += 1
        return sorted(out, key=lambda p: p["id"])

    unsafe = pick([p for p in prompts if p["label"] == "unsafe"], cfg.eval_n_unsafe, "category")
    safe = pick([p for p in prompts if p["label"] == "safe"], cfg.eval_n_safe, "kind")
    return unsafe + safe


def _get(obj, key, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def verdicts(report) -> List[dict]:
    """Per-prompt records ``{id, label, category, kind, response, refused}`` from a DriftCaps report (object or
    dict); ``refused`` is True/False, or None when the judge could not decide (empty response)."""
    recs = None
    for attr in ("records", "results", "items", "prompts"):
        recs = _get(report, attr)
        if recs:
            break
    if not recs and hasattr(report, "to_dict"):
        d = report.to_dict()
        for attr in ("records", "results", "items", "prompts"):
            if d.get(attr):
                recs = d[attr]
                break
    if not recs:
        raise ValueError("could not find per-prompt records in the DriftCaps report")
    out = []
    for r in recs:
        if hasattr(r, "to_dict") and not isinstance(r, dict):
            r = r.to_dict()
        elif not isinstance(r, dict):
            r = dict(vars(r))
        prompt = r.get("prompt")
        pid = r.get("id") or _get(prompt, "id")
        out.append({
            "id": pid,
            "label": r.get("label") or _get(prompt, "label"),
            "category": r.get("category") or _get(prompt, "category"),
            "kind": r.get("kind") or _get(prompt, "kind"),
            "prompt": prompt if isinstance(prompt, str) else _get(prompt, "prompt"),
            "response": r.get("response"),
            "refused": r.get("refused"),
            "outcome": r.get("outcome"),  # refused | complied | incoherent (agl.driftcaps.outcome)
        })
    return out


def drift_eval(model, tokenizer, prompts: Sequence[dict], *, max_new_tokens: int, batch_size: int,
               cache: Optional[str] = None, progress: bool = True) -> Dict[str, object]:
    """DriftCaps evaluation (``agl.driftcaps.evaluate``, resumable through ``cache``) -> ``{"rr_unsafe",
    "over_refusal", "records"}`` (rates as fractions in [0, 1] over the decided prompts)."""
    from agl.driftcaps import evaluate
    from agl.driftcaps.prompts import prompts_from_records

    plist = prompts_from_records(prompts)
    rep = evaluate(model, tokenizer, plist, max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache,
                   progress=progress)
    recs = verdicts(rep)

    def rate(label):
        v = [r["refused"] for r in recs if r["label"] == label and r["refused"] is not None]
        return sum(v) / len(v) if v else float("nan")

    return {"rr_unsafe": rate("unsafe"), "over_refusal": rate("safe"), "n": len(recs),
            "metrics": getattr(rep, "metrics", None), "meta": getattr(rep, "meta", None), "records": recs}


def task_eval(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int, batch_size: int, device,
              cache: Optional[str] = None, progress: bool = True, desc: str = "task EM") -> Dict[str, object]:
    """Exact match on the task questions ``records`` (``{"prompt", "answer", "kind"}``)."""
    gens = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                    batch_size=batch_size, device=device, progress=progress, desc=desc, cache=cache)
    preds = [g["response"] for g in gens]
    score = score_exact_match(preds, records)
    return {"em": score["em"], "per_kind": score["per_kind"], "n": score["n"],
            "predictions": [{"id": r["id"], "prediction": p, "answer": r["answer"], "hit": h}
                            for r, p, h in zip(records, preds, score["hits"])]}
