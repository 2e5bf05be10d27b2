"""Prompt loaders: the built-in DriftCaps set, and the public AdvBench / HarmBench / XSTest files.

Every loader returns a list of :class:`Prompt`. Formats are detected from the file itself (extension and CSV
header), never from the file name, so renamed copies still load:

* ``.jsonl`` in the DriftCaps schema: ``id``, ``prompt``, ``label`` (``unsafe`` | ``safe``), ``category``,
  ``split`` (``calibration`` | ``eval``) and, for safe prompts, ``kind`` (``plain`` | ``borderline``).
* AdvBench ``harmful_behaviors.csv``: one instruction per row, with or without a ``goal,target`` header.
  All unsafe, category ``advbench``.
* HarmBench behaviours CSV (``Behavior,FunctionalCategory,SemanticCategory,...,BehaviorID``): unsafe, category =
  ``SemanticCategory``, id = ``BehaviorID``. Only ``standard`` behaviours by default (``harmbench_functional``);
  contextual ones are rendered as ``context + "\\n\\n---\\n\\n" + behaviour`` as HarmBench does.
* XSTest ``xstest_prompts.csv`` (``id,prompt,type,label,...``): label from the file, category = ``type``; its safe
  prompts are all deliberately risky-sounding, so their ``kind`` is ``borderline``.

External sets have no calibration/eval split: all their prompts are ``split="eval"``.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from agl._io import iter_jsonl

LABELS = ("unsafe", "safe")
SPLITS = ("calibration", "eval")
KINDS = ("plain", "borderline")
BUILTIN = "builtin"


class PromptFormatError(ValueError):
    """A prompt source that is missing, unreadable or in no known format (message is one line)."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt. ``kind`` is ``plain``/``borderline`` for safe prompts, ``None`` for unsafe ones."""

    id: str
    prompt: str
    label: str
    category: str
    split: str = "eval"
    kind: str | None = None
    source: str = "driftcaps"

    def to_dict(self) -> dict:
        return asdict(self)


def builtin_path() -> Path:
    """Path of the built-in prompt file (package data ``agl/driftcaps/data/prompts.jsonl``)."""
    return Path(str(resources.files("agl.driftcaps") / "data" / "prompts.jsonl"))


def load_prompts(source: str | os.PathLike | None = None, *, split: str | None = None,
                 harmbench_functional: Sequence[str] = ("standard",)) -> list[Prompt]:
    """Load prompts from ``source``: ``None``/``"builtin"`` (the DriftCaps set), or a path to a DriftCaps JSONL, an
    AdvBench CSV, a HarmBench behaviours CSV or an XSTest prompts CSV (auto-detected, see the module docstring).

    ``split``: ``"calibration"``, ``"eval"`` or ``None``/``"all"`` (every prompt). ``harmbench_functional``: which
    HarmBench ``FunctionalCategory`` values to keep. Raises :class:`PromptFormatError` (a ``ValueError``) with a
    one-line message for a missing file, an unknown format, a malformed row, or a split that selects nothing.
    """
    if split is not None and split != "all" and split not in SPLITS:
        raise PromptFormatError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)} or 'all'")
    if source is None or str(source) == BUILTIN:
        path = builtin_path()
        if not path.is_file():
            raise PromptFormatError(f"the built-in prompt set is missing ({path}); reinstall agl")
        prompts = _load_jsonl(path, source_name="driftcaps")
    else:
        path = Path(source)
        if not path.exists():
            raise PromptFormatError(f"prompt file not found: {path}")
        if not path.is_file():
            raise PromptFormatError(f"prompt source is not a file: {path}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            prompts = _load_jsonl(path, source_name=path.stem)
        elif suffix in (".csv", ".tsv", ".txt"):
            prompts = _load_csv(path, harmbench_functional=tuple(harmbench_functional))
        else:
            raise PromptFormatError(f"unknown prompt format for {path}: expected .jsonl (DriftCaps schema) or an "
                                    "AdvBench / HarmBench / XSTest .csv")
    if split not in (None, "all"):
        prompts = [p for p in prompts if p.split == split]
        if not prompts:
            raise PromptFormatError(f"no prompts with split={split!r} in {source or BUILTIN}"
                                    + ("" if split == "eval" else " (external sets only have an 'eval' split)"))
    if not prompts:
        raise PromptFormatError(f"no prompts in {source or BUILTIN}")
    _check_unique(prompts, source or BUILTIN)
    return prompts


def prompts_from_records(records: Iterable[dict | Prompt]) -> list[Prompt]:
    """Normalise a list of :class:`Prompt` or dicts in the DriftCaps schema (validated) into ``Prompt`` objects."""
    out = []
    for i, r in enumerate(records):
        if isinstance(r, Prompt):
            out.append(r)
        elif isinstance(r, dict):
            out.append(_prompt_from_dict(r, where=f"prompt #{i}"))
        else:
            raise TypeError(f"prompt #{i}: expected a Prompt or a dict, got {type(r).__name__}")
    _check_unique(out, "the prompt list")
    return out


# --------------------------------------------------------------------------------------------------- internals

def _check_unique(prompts: Sequence[Prompt], where) -> None:
    seen = set()
    for p in prompts:
        if p.id in seen:
            raise PromptFormatError(f"duplicate prompt id {p.id!r} in {where}")
        seen.add(p.id)


def _prompt_from_dict(d: dict, *, where: str, source_name: str = "driftcaps") -> Prompt:
    missing = [k for k in ("id", "prompt", "label", "category") if k not in d]
    if missing:
        raise PromptFormatError(f"{where}: missing field(s) {', '.join(missing)} (DriftCaps schema: id, prompt, "
                                "label, category, split, kind)")
    label = d["label"]
    if label not in LABELS:
        raise PromptFormatError(f"{where}: label must be 'unsafe' or 'safe', got {label!r}")
    split = d.get("split", "eval")
    if split not in SPLITS:
        raise PromptFormatError(f"{where}: split must be 'calibration' or 'eval', got {split!r}")
    kind = d.get("kind")
    if label == "safe":
        kind = kind or "plain"
        if kind not in KINDS:
            raise PromptFormatError(f"{where}: kind must be 'plain' or 'borderline', got {kind!r}")
    else:
        kind = None
    text = d["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise PromptFormatError(f"{where}: empty prompt")
    return Prompt(id=str(d["id"]), prompt=text, label=label, category=str(d["category"]), split=split, kind=kind,
                  source=str(d.get("source", source_name)))


def _load_jsonl(path: Path, *, source_name: str) -> list[Prompt]:
    try:
        return [_prompt_from_dict(d, where=f"{path}:{n}", source_name=source_name) for n, d in iter_jsonl(path)]
    except PromptFormatError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFormatError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:  # a line that is not a JSON object (iter_jsonl names file and line)
        raise PromptFormatError(str(exc)) from None


_HARMBENCH_COLS = {"behavior", "functionalcategory", "semanticcategory", "behaviorid"}
_XSTEST_COLS = {"id", "prompt", "type", "label"}


def _load_csv(path: Path, *, harmbench_functional: tuple[str, ...]) -> list[Prompt]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFormatError(f"cannot read {path}: {exc}") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise PromptFormatError(f"{path}: not a readable CSV ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise PromptFormatError(f"{path}: empty file")
    header = [c.strip().lower() for c in rows[0]]
    if _HARMBENCH_COLS <= set(header):
        return _harmbench(path, header, rows[1:], harmbench_functional)
    if _XSTEST_COLS <= set(header):
        return _xstest(path, header, rows[1:])
    if header[:1] == ["goal"]:  # AdvBench with its original goal,target header
        return _advbench(rows[1:])
    if all(len(r) == 1 for r in rows):  # the headerless one-column AdvBench copy
        return _advbench(rows)
    raise PromptFormatError(f"unknown CSV format in {path}: expected AdvBench (goal[,target]), HarmBench "
                            "(Behavior,FunctionalCategory,SemanticCategory,...,BehaviorID) or XSTest "
                            f"(id,prompt,type,label,...) columns; got {','.join(rows[0])[:120]}")


def _advbench(rows) -> list[Prompt]:
    return [Prompt(id=f"advbench-{i:03d}", prompt=r[0].strip(), label="unsafe", category="advbench", source="advbench")
            for i, r in enumerate(rows) if r[0].strip()]


def _harmbench(path, header, rows, functional) -> list[Prompt]:
    col = {name: header.index(name) for name in header}
    ctx = col.get("contextstring")
    out = []
    for n, r in enumerate(rows, 2):
        if len(r) < len(header):
            raise PromptFormatError(f"{path}: row {n} has {len(r)} columns, expected {len(header)}")
        fc = r[col["functionalcategory"]].strip()
        if functional and fc not in functional:
            continue
        text = r[col["behavior"]].strip()
        if ctx is not None and r[ctx].strip():
            text = f"{r[ctx].strip()}\n\n---\n\n{text}"
        out.append(Prompt(id=r[col["behaviorid"]].strip(), prompt=text, label="unsafe",
                          category=r[col["semanticcategory"]].strip() or "harmbench", source="harmbench"))
    return out


def _xstest(path, header, rows) -> list[Prompt]:
    col = {name: header.index(name) for name in header}
    out = []
    for n, r in enumerate(rows, 2):
        if len(r) < len(header):
            raise PromptFormatError(f"{path}: row {n} has {len(r)} columns, expected {len(header)}")
        label = r[col["label"]].strip().lower()
        if label not in LABELS:
            raise PromptFormatError(f"{path}: row {n}: label must be safe or unsafe, got {label!r}")
        out.append(Prompt(id=f"xstest-{r[col['id']].strip()}", prompt=r[col["prompt"]].strip(), label=label,
                          category=r[col["type"]].strip(), kind="borderline" if label == "safe" else None,
                          source="xstest"))
    return out


SAMPLE_MODES = ("stratified", "first")


def sample_prompts(prompts: Sequence[Prompt], n: int, *, mode: str = "stratified", seed: int = 0) -> list[Prompt]:
    """``n`` of ``prompts`` for a quick run, in their input order.

    ``mode="stratified"`` (default): unsafe and safe prompts in proportion to their counts (largest remainder, at
    least one of each when ``n >= 2`` and both exist), and within each label the categories as evenly as possible
    (round-robin over the categories in a seeded order, a seeded shuffle inside each), so 12 prompts of the
    built-in set cover 12 categories instead of the first one. Deterministic for a given ``seed``.
    ``mode="first"``: the first ``n`` (the old behaviour). ``n >= len(prompts)`` returns them all.
    """
    import random

    if mode not in SAMPLE_MODES:
        raise ValueError(f"mode must be one of {', '.join(SAMPLE_MODES)}, got {mode!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    prompts = list(prompts)
    if n >= len(prompts) or mode == "first":
        return prompts[:n]
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_label.setdefault(p.label, []).append(i)
    labels = sorted(by_label)
    share = {lab: n * len(by_label[lab]) / len(prompts) for lab in labels}
    quota = {lab: int(share[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda lab: (quota[lab] > 0, -(share[lab] - quota[lab]), lab)):
        if sum(quota.values()) < n:  # labels with none yet first, then the largest remainders
            quota[lab] += 1
    picked: list[int] = []
    for lab in labels:
        cats: dict[str, list[int]] = {}
        for i in by_label[lab]:
            cats.setdefault(prompts[i].category, []).append(i)
        order = sorted(cats)
        rng.shuffle(order)
        for c in order:
            rng.shuffle(cats[c])
        take = 0
        while take < quota[lab]:
            for c in order:
                if cats[c] and take < quota[lab]:
                    picked.append(cats[c].pop())
                    take += 1
    return [prompts[i] for i in sorted(picked)]
