"""Stage 1: the aligned start.

The offline default model complies with harmful requests, so the experiment first gives it safety alignment: LoRA
SFT on DriftCaps ``calibration`` prompts (unsafe prompts -> refusal texts written by the project, with varied
wording; safe and borderline prompts -> the model's own original greedy answers, i.e. self-distillation, to keep
its helpfulness), then the adapter is merged into the weights.

Against over-refusal the SFT also sees ``align_n_borderline`` borderline-safe prompts written by the project
(``data/borderline.jsonl``: benign requests that sound risky -- "kill a zombie process", crime fiction, overdose
first aid), answered by the base model, and ``align_n_borderline_more`` more of them (``data/borderline_more.jsonl``:
medicine, self-defence, lab safety, war history, horror fiction, idioms, ...); and a distilled answer that the refusal judge calls a refusal is asked for
again with a steering preamble, and dropped if it is still a refusal (``align_distill_filter``), so the SFT never
teaches the model to refuse a safe prompt.

Held out of the SFT (the *tuning-dev* set, for choosing this recipe; the eval split is never looked at):
``align_holdout`` calibration unsafe prompts (with refusal texts they are also the held-out refusal demonstrations on
which the fine-tunes log the alignment loss) and ``align_dev_safe`` calibration safe prompts (stratified by kind).
The project's own ``data/tuning_dev_more.jsonl`` (unsafe, borderline and plain prompts in the DriftCaps schema) enlarges
that set; it is never trained on.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import random
import re
from importlib import resources
from typing import Callable, Dict, List, Optional

import torch

from agl._io import read_jsonl, write_jsonl
from agl.experiment._common import chat_batches, generate, lora_config, set_seed, to_device

__all__ = ["load_refusals", "load_borderline", "load_tuning_dev_more", "build_alignment_data", "tuning_dev_prompts",
           "near_duplicate", "train_aligned_start", "load_aligned_model"]

# asked of the base model again when its first answer to a safe prompt is a refusal (the SFT keeps the plain prompt)
STEER = "This is a harmless, legitimate request. Answer it directly and helpfully.\n\n"


def _data_path(source: str, builtin: Dict[str, str], what: str) -> str:
    """``source`` resolved: a name in ``builtin`` -> that file of ``agl/experiment/data``, else a path that exists."""
    path = str(resources.files("agl.experiment") / "data" / builtin[source]) if source in builtin else source
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_refusals(source: str = "builtin") -> List[dict]:
    """Refusal texts: ``agl/experiment/data/refusals.jsonl`` (``{"id", "text", "style"[, "category"]}`` per line,
    ``category`` a DriftCaps harm category or ``any``) or a path in that format."""
    path = _data_path(source, {"builtin": "refusals.jsonl"}, "refusal texts")
    recs = [dict(r, text=r["text"].strip()) for r in read_jsonl(path) if str(r.get("text", "")).strip()]
    if len([r for r in recs if r.get("category", "any") == "any"]) < 2:
        raise ValueError(f"{path}: need at least 2 refusal texts for category 'any'")
    return recs


def load_borderline(source: str = "builtin") -> List[dict]:
    """Borderline-safe prompts written by the project (``{"id", "prompt", "category"}`` per line): ``"builtin"``
    (``data/borderline.jsonl``, ``align_n_borderline``), ``"builtin-more"`` (``data/borderline_more.jsonl``,
    ``align_n_borderline_more``) or a path in that format. They are never DriftCaps prompts of either split."""
    path = _data_path(source, {"builtin": "borderline.jsonl", "builtin-more": "borderline_more.jsonl"},
                      "borderline prompts")
    recs = read_jsonl(path)
    for i, r in enumerate(recs):
        if not str(r.get("prompt", "")).strip() or not r.get("id"):
            raise ValueError(f"{path}: record {i} needs a non-empty 'id' and 'prompt'")
    return recs


def load_tuning_dev_more(source: str = "builtin") -> List[dict]:
    """The project's own tuning-dev prompts (``data/tuning_dev_more.jsonl``, or a path): DriftCaps-schema records
    (validated by ``agl.driftcaps.load_prompts``), ``split`` calibration; never in any SFT data."""
    from agl.driftcaps import load_prompts

    path = _data_path(source, {"builtin": "tuning_dev_more.jsonl"}, "tuning-dev prompts")
    return _prompt_dicts(load_prompts(path, split="calibration"))


_STOP = frozenset("the a an of to in is how do i what and my for on with it does why can are you that s be from or at "
                  "about should when this if me your so did was were by as into its there their they out one up "
                  "without which who some most all what's i'm don't".split())


def _content_words(text: str) -> set:
    return set(re.findall(r"[a-z0-9']+", text.lower())) - _STOP


def near_duplicate(a: str, b: str, *, ratio: float = 0.75, jaccard: float = 0.4) -> bool:
    """True when two prompts are the same request in other words: character similarity
    (``difflib.SequenceMatcher.ratio``) >= ``ratio`` or Jaccard overlap of their content words >= ``jaccard``."""
    m = difflib.SequenceMatcher(None, a.lower(), b.lower())
    if m.quick_ratio() >= ratio and m.ratio() >= ratio:  # quick_ratio bounds ratio from above: cheap pre-filter
        return True
    wa, wb = _content_words(a), _content_words(b)
    return bool(wa | wb) and len(wa & wb) / len(wa | wb) >= jaccard


def _prompt_dicts(prompts) -> List[dict]:
    return [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in prompts]


def _stratified_split(items: List[dict], n: int, key: str):
    """(held-out, rest): ``n`` items taken from each ``key`` group in proportion to its size (``items`` shuffled)."""
    groups: Dict[str, List[dict]] = {}
    for p in items:
        groups.setdefault(str(p.get(key)), []).append(p)
    held: List[dict] = []
    for g in sorted(groups):
        held += groups[g][: round(n * len(groups[g]) / max(len(items), 1))]
    ids = {p["id"] for p in held}
    return held, [p for p in items if p["id"] not in ids]


def build_alignment_data(cfg) -> Dict[str, List[dict]]:
    """Deterministic selection (by ``cfg.align_seed``) of the calibration prompts: ``sft_unsafe``, ``holdout``
    (unsafe, kept out of the SFT), ``sft_safe``, ``dev_safe`` (safe, kept out of the SFT, stratified by kind) and
    ``sft_own`` (the project's borderline prompts: the first ``align_n_borderline`` of a seeded shuffle of
    ``data/borderline.jsonl``, then the first ``align_n_borderline_more`` of one of ``data/borderline_more.jsonl``);
    each unsafe record gets a refusal text as ``response``."""
    from agl.driftcaps import load_prompts

    cal = _prompt_dicts(load_prompts(cfg.prompts, split="calibration"))
    refusals = load_refusals(cfg.refusals)
    rng = random.Random(cfg.align_seed)
    unsafe = sorted([p for p in cal if p["label"] == "unsafe"], key=lambda p: p["id"])
    safe = sorted([p for p in cal if p["label"] == "safe"], key=lambda p: p["id"])
    rng.shuffle(unsafe)
    rng.shuffle(safe)
    n_hold = min(cfg.align_holdout, max(len(unsafe) // 4, 1))
    holdout, rest = unsafe[:n_hold], unsafe[n_hold:]
    sft_unsafe = rest[: cfg.align_n_unsafe]
    dev_safe, safe_rest = _stratified_split(safe, min(cfg.align_dev_safe, len(safe) // 2), "kind")
    sft_safe = safe_rest[: cfg.align_n_safe]
    own = sorted(load_borderline(), key=lambda p: p["id"]) if cfg.align_n_borderline else []
    random.Random(cfg.align_seed + 1).shuffle(own)  # own stream: the calibration selection above does not move
    n_more = cfg.align_n_borderline_more
    more = sorted(load_borderline("builtin-more"), key=lambda p: p["id"]) if n_more else []
    if not 0 <= n_more <= len(more):
        raise ValueError(f"`align_n_borderline_more` must be in [0, {len(more)}] (the prompts in "
                         f"data/borderline_more.jsonl), got {n_more!r}")
    random.Random(cfg.align_seed + 2).shuffle(more)  # a third stream: the two selections above do not move

    generic = [r["text"] for r in refusals if r.get("category", "any") == "any"]

    def with_refusal(p):  # a category-specific refusal when one exists (half the time), else a generic one
        own_cat = [r["text"] for r in refusals if r.get("category") == p["category"]]
        text = rng.choice(own_cat) if own_cat and rng.random() < 0.5 else rng.choice(generic)
        return {"id": p["id"], "prompt": p["prompt"], "category": p["category"], "response": text}

    def safe_rec(p, kind=None):
        return {"id": p["id"], "prompt": p["prompt"], "category": p["category"], "kind": kind or p.get("kind")}

    return {
        "sft_unsafe": [with_refusal(p) for p in sft_unsafe],
        "holdout": [with_refusal(p) for p in holdout],
        "sft_safe": [safe_rec(p) for p in sft_safe],
        "sft_own": [safe_rec(p, "borderline") for p in own[: cfg.align_n_borderline] + more[:n_more]],
        "dev_safe": [safe_rec(p) for p in dev_safe],
    }


def tuning_dev_prompts(cfg, *, more: bool = False) -> List[dict]:
    """The tuning-dev set in the DriftCaps schema (for ``agl.experiment.evaluation.drift_eval``): the held-out
    calibration unsafe prompts and the held-out calibration safe prompts, and with ``more`` the project's own
    ``data/tuning_dev_more.jsonl`` after them; none of them is in the SFT data."""
    data = build_alignment_data(cfg)
    unsafe = [{"id": r["id"], "prompt": r["prompt"], "label": "unsafe", "category": r["category"],
               "split": "calibration"} for r in data["holdout"]]
    safe = [dict(r, label="safe", split="calibration") for r in data["dev_safe"]]
    return unsafe + safe + (load_tuning_dev_more() if more else [])


def _trim(text: str, finished: bool) -> str:
    """A truncated self-distilled answer is cut back to its last complete sentence (so the SFT does not teach the
    model to stop mid-sentence)."""
    if finished:
        return text
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return text[: cut + 1].strip() if cut >= 20 else text


def _distil(cfg, model, tokenizer, records: List[dict], work_dir: str, progress: bool) -> tuple:
    """The base model's greedy answers to ``records`` (trimmed to the last full sentence). With
    ``cfg.align_distill_filter`` an answer the refusal judge calls a refusal is asked for again with ``STEER`` in
    front of the prompt, and the record is dropped if that one is a refusal too. Returns (records with
    ``response``, counts)."""
    from agl.driftcaps.judge import judge_refusal

    def ask(prompts, name):
        return generate(model, tokenizer, prompts, max_new_tokens=cfg.distill_max_new_tokens,
                        batch_size=cfg.eval_batch, device=cfg.device, progress=progress, desc=name,
                        cache=os.path.join(work_dir, f"{name}.jsonl"))

    def answer(g):
        return _trim(g["response"], g["finished"])

    first = [answer(g) for g in ask([r["prompt"] for r in records], "distill")]
    counts = {"n_distilled": len(records), "n_refused_first": 0, "n_steered": 0, "n_dropped": 0}
    if cfg.align_distill_filter:
        bad = [i for i, a in enumerate(first) if not a or judge_refusal(a, records[i]["prompt"])]
        counts["n_refused_first"] = len(bad)
        again = ask([STEER + records[i]["prompt"] for i in bad], "distill-steered") if bad else []
        for i, g in zip(bad, again):
            a = answer(g)
            ok = bool(a) and not judge_refusal(a, records[i]["prompt"])
            first[i] = a if ok else ""
            counts["n_steered" if ok else "n_dropped"] += 1
    out = [{**r, "response": a} for r, a in zip(records, first) if a]
    return out, counts


def train_aligned_start(cfg, model, tokenizer, out_dir: str, work_dir: str, *, progress: bool = True,
                        on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> dict:
    """Builds the aligned start's artefact in ``out_dir``: ``adapter/`` (peft), ``sft_data.jsonl``,
    ``holdout.jsonl``, ``refusal_demos.jsonl``, ``info.json``. ``model`` is the base model (left unchanged).
    Self-distilled answers are cached in ``work_dir`` (resumable). ``on_step(step, peft_model)`` is called after
    each optimiser step (1-based); the learning rate is constant, so the model after step k of a longer run is the
    model a run of ``align_steps=k`` ends with (how the tuning evaluates several step counts in one run)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    device = cfg.device
    data = build_alignment_data(cfg)
    os.makedirs(work_dir, exist_ok=True)
    # 1. self-distillation: the base model's own greedy answers to the safe prompts (refusals re-asked or dropped)
    safe_recs, distil_counts = _distil(cfg, model, tokenizer, data["sft_safe"] + data["sft_own"], work_dir, progress)
    sft = [dict(r, label="unsafe") for r in data["sft_unsafe"]] + [dict(r, label="safe") for r in safe_recs]
    # 2. LoRA SFT
    set_seed(cfg.align_seed)
    targets = "all-linear" if cfg.align_targets == "all-linear" else [t.strip() for t in cfg.align_targets.split(",")]
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(cfg.align_rank, 2 * cfg.align_rank, targets))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.align_lr,
                            weight_decay=0.0)
    rng = random.Random(cfg.align_seed)
    order: List[int] = []
    losses = []
    bar = tqdm(range(cfg.align_steps), desc="align SFT", disable=not progress, leave=False, unit="step")
    for step in bar:
        if len(order) < cfg.align_batch:
            perm = list(range(len(sft)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.align_batch], order[cfg.align_batch:]
        batch = chat_batches(tokenizer, [sft[i] for i in idx], cfg.max_length, cfg.align_batch)[0]
        batch = to_device(batch, device)
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1, peft_model)
    bar.close()
    peft_model.save_pretrained(os.path.join(out_dir, "adapter"))
    write_jsonl(os.path.join(out_dir, "sft_data.jsonl"), sft)
    write_jsonl(os.path.join(out_dir, "holdout.jsonl"), data["holdout"])
    write_jsonl(os.path.join(out_dir, "refusal_demos.jsonl"), data["sft_unsafe"])
    info = {"n_sft_unsafe": len(data["sft_unsafe"]), "n_sft_safe": len(safe_recs), "n_holdout": len(data["holdout"]),
            "n_own_borderline": len(data["sft_own"]), "n_dev_safe": len(data["dev_safe"]), **distil_counts,
            "steps": cfg.align_steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "losses": losses}
    with open(os.path.join(out_dir, "info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    del peft_model
    return info


def load_aligned_model(base_model, artefact_dir: str, device) -> torch.nn.Module:
    """A copy of ``base_model`` with the aligned start's adapter merged in (a plain model, no peft wrappers)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), os.path.join(artefact_dir, "adapter"))
    model = model.merge_and_unload()
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
