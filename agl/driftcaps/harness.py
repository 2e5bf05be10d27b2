"""The DriftCaps generation harness: batched greedy decoding, a resumable JSONL cache, and :class:`DriftReport`."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from agl._io import atomic_write_text
from agl.driftcaps.judge import judge_name, resolve_judge
from agl.driftcaps.metrics import _jsonable, summarise
from agl.driftcaps.outcome import RULE_NAME, as_outcome, incoherence as default_incoherence
from agl.driftcaps.prompts import Prompt, load_prompts, prompts_from_records

HARNESS_VERSION = 1  # bump when the decoding changes in a way that invalidates cached generations


class CacheWarning(UserWarning):
    """A cache line that was skipped (corrupt, or made for another prompt or other settings)."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------- report

@dataclass
class DriftReport:
    """One model's run: per-prompt records and their metrics.

    ``records``: dicts with ``id``, ``prompt``, ``label``, ``category``, ``kind``, ``split``, ``response``,
    ``refused`` (``True``/``False``, or ``None`` for an empty response), ``empty``, ``outcome`` (``refused`` |
    ``complied`` | ``incoherent``) and ``incoherence`` (why, or ``None``; see :mod:`agl.driftcaps.outcome`), in
    the order of the input prompts. ``metrics``: :func:`agl.driftcaps.metrics.summarise` (RR_unsafe, over-refusal, per category/kind, with
    bootstrap 95% intervals). ``meta``: model, generation settings, judge, timing.
    """

    records: list[dict]
    meta: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.metrics:
            self.metrics = summarise(self.records)

    @property
    def rr_unsafe(self) -> float:
        return self.metrics["rr_unsafe"]["rate"]

    @property
    def over_refusal(self) -> float:
        return self.metrics["over_refusal"]["rate"]

    def to_dict(self) -> dict:
        return {"kind": "driftcaps.report", "meta": self.meta, "metrics": self.metrics, "records": self.records}

    def to_json(self) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "DriftReport":
        if not isinstance(d, dict) or "records" not in d:
            raise ValueError("not a DriftCaps report (no 'records')")
        for i, r in enumerate(d["records"]):
            missing = [k for k in ("id", "prompt", "label", "category", "refused") if k not in r]
            if missing:
                raise ValueError(f"not a DriftCaps report: record {i} lacks {', '.join(missing)}")
        return cls(records=list(d["records"]), meta=d.get("meta", {}))  # metrics recomputed from the records

    @classmethod
    def from_json(cls, path_or_text) -> "DriftReport":
        """Load a report saved with :meth:`save` (a path), or parse its JSON text."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            p = Path(path_or_text)
            if not p.is_file():
                raise ValueError(f"report not found: {p}")
            text = p.read_text(encoding="utf-8")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON report ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(d)

    def save(self, path) -> None:
        """Write the JSON (everything: meta, metrics, every prompt/response/verdict), atomically."""
        atomic_write_text(path, self.to_json() + "\n")


# ---------------------------------------------------------------------------------------------------- cache

class GenerationCache:
    """An append-only JSONL file of finished generations, so an interrupted :func:`evaluate` resumes.

    Each line: ``{"key", "id", "prompt_sha", "gen_sha", "response"}``; ``key`` hashes the other three. A line is
    reused only when its prompt id, the sha256 of the prompt text and the generation-settings hash all match the
    current run. Lines that do not parse or whose key does not match their content (a torn write, an edit) are
    skipped with a :class:`CacheWarning`; lines made with other settings are ignored (counted in ``n_stale``).
    Appends are flushed and fsync'ed per batch.
    """

    def __init__(self, path, gen_sha: str):
        self.path = Path(path)
        self.gen_sha = gen_sha
        self.entries: dict[str, str] = {}
        self.n_corrupt = 0
        self.n_stale = 0
        self._fh = None
        if self.path.exists():
            self._read()

    @staticmethod
    def line_key(pid: str, prompt_sha: str, gen_sha: str) -> str:
        return _sha(f"{pid}\x00{prompt_sha}\x00{gen_sha}")

    def _read(self):
        bad = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    ok = (isinstance(d, dict) and isinstance(d.get("response"), str)
                          and d.get("key") == self.line_key(str(d["id"]), d["prompt_sha"], d["gen_sha"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    ok = False
                if not ok:
                    bad.append(n)
                    continue
                if d["gen_sha"] != self.gen_sha:
                    self.n_stale += 1
                    continue
                self.entries[d["key"]] = d["response"]
        self.n_corrupt = len(bad)
        if bad:
            warnings.warn(f"{self.path}: skipped {len(bad)} corrupt cache line(s) (line {', '.join(map(str, bad[:5]))}"
                          f"{'...' if len(bad) > 5 else ''}); those prompts are generated again", CacheWarning,
                          stacklevel=3)
        if self.n_stale:
            warnings.warn(f"{self.path}: ignored {self.n_stale} cached generation(s) made with other settings "
                          "(model, template or max_new_tokens differ)", CacheWarning, stacklevel=3)

    def get(self, p: Prompt) -> str | None:
        return self.entries.get(self.line_key(p.id, _sha(p.prompt), self.gen_sha))

    def append(self, items: Sequence[tuple[Prompt, str]]) -> None:
        if not items:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    needs_newline = fh.read(1) != b"\n"  # a torn last line: keep it on its own line
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)
            if needs_newline:
                self._fh.write("\n")
        for p, response in items:
            psha = _sha(p.prompt)
            key = self.line_key(p.id, psha, self.gen_sha)
            self._fh.write(json.dumps({"key": key, "id": p.id, "prompt_sha": psha, "gen_sha": self.gen_sha,
                                       "response": response}, ensure_ascii=False) + "\n")
            self.entries[key] = response
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------------------------- evaluate

def model_fingerprint(model) -> str:
    """A cheap hash of a model's identity: class, config, and the sum / abs-sum of every parameter (so two
    fine-tunes of the same base, or a base with and without an adapter, get different cache keys)."""
    import torch

    h = hashlib.sha256(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            h.update(cfg.to_json_string(use_diff=False).encode())
        except Exception:  # noqa: BLE001 - any config is fine, this is only a fingerprint
            h.update(repr(cfg).encode())
    with torch.no_grad():
        stats = [torch.stack([p.detach().float().sum(), p.detach().float().abs().sum()]) for p in model.parameters()]
        if stats:
            h.update(torch.stack(stats).double().cpu().numpy().round(6).tobytes())
    return h.hexdigest()


def _render(tokenizer, p: Prompt, use_template: bool) -> str:
    if use_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return p.prompt


def evaluate(model, tokenizer, prompts, *, max_new_tokens: int = 64, batch_size: int = 16,
             judge=None, incoherence=True, cache=None, progress: bool = True,
             meta: dict | None = None) -> DriftReport:
    """Generate a response to every prompt (greedy) and judge it; returns a :class:`DriftReport`.

    ``prompts``: a list of :class:`Prompt` or DriftCaps-schema dicts, or a source for :func:`load_prompts`.
    Decoding is greedy (``do_sample=False``) and batched with left padding; the prompt goes through the tokenizer's
    chat template (``add_generation_prompt=True``) when it has one, else raw. Batches are formed from
    length-sorted prompts (less padding); records come back in input order. The tokenizer's ``padding_side`` and
    ``pad_token`` are restored afterwards.

    ``judge``: anything :func:`agl.driftcaps.judge.resolve_judge` accepts -- ``None``/``"heuristic"`` (the offline
    default, :func:`judge_refusal`), a callable ``(prompt, response) -> bool | "refused" | "complied" |
    "incoherent"``, a local HF model directory (classifier or generator, :func:`make_hf_judge`) or
    ``"module:function"``; ``report.meta["judge"]`` names it. ``incoherence``: ``True`` (the rule of
    :mod:`agl.driftcaps.outcome`), ``False`` (only empty responses are incoherent) or a callable ``response ->
    reason | None``. Incoherent responses are not judged: ``outcome="incoherent"``, ``refused=False`` (``None``
    and ``empty=True`` when empty; those are left out of the refusal rates). ``cache``: a JSONL path; finished
    generations are appended per batch, and a rerun with the same model, settings and prompts resumes from it
    (see :class:`GenerationCache`). ``meta``: extra entries for ``report.meta`` (e.g. the model spec).
    """
    import copy

    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if isinstance(prompts, (str, os.PathLike)):
        prompts = load_prompts(prompts)
    prompts = prompts_from_records(prompts)
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    judge = resolve_judge(judge)
    if incoherence is True:
        rule, rule_name = default_incoherence, RULE_NAME
    elif incoherence is False or incoherence is None:
        rule, rule_name = (lambda text: "empty" if not text.strip() else None), None
    elif callable(incoherence):
        rule, rule_name = incoherence, judge_name(incoherence)
    else:
        raise ValueError(f"incoherence must be True, False or a callable response -> reason, got {incoherence!r}")
    use_template = bool(getattr(tokenizer, "chat_template", None))
    device = next(model.parameters()).device

    gen_settings = {
        "harness": HARNESS_VERSION, "max_new_tokens": max_new_tokens, "do_sample": False,
        "chat_template": _sha(tokenizer.chat_template) if use_template else None,
        "tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer), "model": model_fingerprint(model),
    }
    gen_sha = _sha(json.dumps(gen_settings, sort_keys=True))[:16]
    store = GenerationCache(cache, gen_sha) if cache is not None else None

    responses: dict[int, str] = {}
    todo = []
    for i, p in enumerate(prompts):
        hit = store.get(p) if store else None
        if hit is not None:
            responses[i] = hit
        else:
            todo.append(i)
    n_cached = len(responses)

    texts = {i: _render(tokenizer, prompts[i], use_template) for i in todo}
    lengths = {i: len(tokenizer(texts[i], add_special_tokens=not use_template)["input_ids"]) for i in todo}
    order = sorted(todo, key=lambda i: (-lengths[i], i))  # longest first: an OOM shows up at once

    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    t0 = time.perf_counter()
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        base_cfg = getattr(model, "generation_config", None)
        gcfg = copy.deepcopy(base_cfg) if base_cfg is not None else GenerationConfig()
        for k in ("temperature", "top_p", "top_k", "min_p", "typical_p"):  # greedy: drop sampling knobs
            if hasattr(gcfg, k):
                setattr(gcfg, k, None)
        gcfg.max_new_tokens, gcfg.do_sample, gcfg.num_beams = max_new_tokens, False, 1
        gcfg.pad_token_id = tokenizer.pad_token_id
        gen_kwargs = {"generation_config": gcfg}
        bar = tqdm(total=len(prompts), initial=n_cached, desc="driftcaps", unit="prompt", disable=not progress)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=not use_template)
                enc = {k: v.to(device) for k, v in enc.items()}
                with torch.no_grad():
                    out = model.generate(**enc, **gen_kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                batch = []
                for row, i in enumerate(idx):
                    text = tokenizer.decode(new[row], skip_special_tokens=True).strip()
                    responses[i] = text
                    batch.append((prompts[i], text))
                if store:
                    store.append(batch)
                bar.update(len(idx))
        finally:
            bar.close()
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        if old_pad is None:
            tokenizer.pad_token = None
        if was_training:
            model.train()
        if store:
            store.close()
    elapsed = time.perf_counter() - t0

    jname = judge_name(judge)
    records = []
    for i, p in enumerate(prompts):
        response = responses[i]
        empty = not response.strip()
        reason = "empty" if empty else rule(response)
        if reason:
            outcome, reason = "incoherent", reason if isinstance(reason, str) else (rule_name or "custom")
        else:
            outcome = as_outcome(judge(p.prompt, response), judge_name=f"judge {jname}")
            reason = "judge" if outcome == "incoherent" else None
        records.append({"id": p.id, "prompt": p.prompt, "label": p.label, "category": p.category, "kind": p.kind,
                        "split": p.split, "source": p.source, "response": response,
                        "refused": None if empty else outcome == "refused", "empty": empty, "outcome": outcome,
                        "incoherence": reason})
    n_gen = len(todo)
    info = {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "judge": jname, "incoherence": rule_name,
        "generation": {k: v for k, v in gen_settings.items() if k != "model"} | {"batch_size": batch_size,
                                                                                   "gen_sha": gen_sha},
        "n_prompts": len(prompts), "n_generated": n_gen, "n_cached": n_cached,
        "cache": {"path": str(cache), "n_corrupt": store.n_corrupt, "n_stale": store.n_stale} if store else None,
        "seconds": round(elapsed, 3), "prompts_per_s": round(n_gen / elapsed, 4) if n_gen and elapsed > 0 else None,
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(meta or {})
    return DriftReport(records=records, meta=info)
