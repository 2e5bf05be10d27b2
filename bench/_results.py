"""The one place bench scripts write result rows: ``bench/results/*.json``, each a JSON list of rows, every row with
the ``provenance`` of the run that measured it (``agl._provenance.provenance()``, taken at the run's start).

A row's *identity* is the values of the ``key`` fields its script names (``shape``, ``dtype``, ``mode``,
``provider`` …). ``append_rows`` never loses a measurement silently:

* a row replaces an earlier one only when both have the same identity and their provenance names the same
  **clean** commit (``agl._provenance.same_code``): a rerun of the same code;
* rows of another commit, backfilled rows (``git_dirty`` None: unknown) and rows measured on a dirty tree are kept
  beside the new ones, so the file holds one row per (identity, commit) and the commit says which kernel it timed;
* a run on a dirty tree is marked (``git_dirty: true``, a warning on stderr) and replaces nothing, not even its own
  earlier rows: two dirty runs of one commit may have timed different code.

Readers pick the row to report with :func:`pick`: clean rows first, then unknown, then dirty; the newest among them.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agl._io import atomic_write_json  # noqa: E402
from agl._provenance import provenance, same_code  # noqa: E402

__all__ = ["RESULTS", "append_rows", "read_rows", "matching", "pick", "provenance", "describe"]

RESULTS = Path(__file__).resolve().parent / "results"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively; numpy scalars and tensors are left to ``atomic_write_json``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_rows(path: os.PathLike) -> List[Dict[str, Any]]:
    """The rows of a results file ([] when it does not exist). Raises a ValueError naming the file when it is not
    a JSON list of rows that each carry a ``provenance`` object."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of result rows (bench/_results.py format), got "
                         f"{type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("provenance"), dict):
            raise ValueError(f"{path}: row {i} has no `provenance` object; every result row must record one")
    return rows


def _identity(row: Dict[str, Any], key: Sequence[str]) -> str:
    return json.dumps([row.get(k) for k in key], sort_keys=True)


def append_rows(path: os.PathLike, rows: Iterable[Dict[str, Any]], prov: Dict[str, Any], *,
                key: Sequence[str]) -> List[Dict[str, Any]]:
    """Add ``rows`` (each stamped with ``prov``) to the results file ``path`` atomically, under the rules in the
    module docstring; ``key`` names the fields that identify a measurement. Returns the file's rows as written."""
    if not key:
        raise ValueError("append_rows: `key` must name at least one identity field (e.g. ('shape', 'dtype'))")
    if not isinstance(prov, dict) or "git_commit" not in prov:
        raise ValueError("append_rows: `prov` must be a provenance record (agl._provenance.provenance())")
    new = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"append_rows: a row must be a dict, got {type(row).__name__}")
        missing = [k for k in key if k not in row]
        if missing:
            raise ValueError(f"append_rows: row lacks identity field(s) {missing} (key {list(key)})")
        new.append(_finite({**{k: v for k, v in row.items() if k != "provenance"}, "provenance": prov}))
    if prov.get("git_dirty") is not False:
        state = "uncommitted changes" if prov.get("git_dirty") else "no known commit"
        print(f"[bench] {state}: {len(new)} row(s) go to {path} marked git_dirty={prov.get('git_dirty')} and "
              "replace no earlier row", file=sys.stderr)
    replaced = {_identity(r, key) for r in new}
    kept = [r for r in read_rows(path)
            if not (_identity(r, key) in replaced and same_code(r["provenance"], prov))]
    out = kept + new
    atomic_write_json(path, out, indent=1)
    return out


def matching(rows: Iterable[Dict[str, Any]], **fields: Any) -> List[Dict[str, Any]]:
    """The rows whose ``fields`` all equal the given values."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


def _rank(row: Dict[str, Any]):
    p = row["provenance"]  # backfilled rows may lack a date: the day they were committed stands in
    return ({False: 2, None: 1, True: 0}[p.get("git_dirty")], p.get("date") or p.get("added_on") or "")


def pick(rows: Iterable[Dict[str, Any]], **fields: Any) -> Dict[str, Any]:
    """The row to report among those matching ``fields``: clean commit before unknown before dirty, then the newest.
    Raises a LookupError naming the fields when none matches."""
    found = matching(rows, **fields)
    if not found:
        raise LookupError(f"no result row with {fields}")
    return max(found, key=_rank)


def describe(prov: Dict[str, Any]) -> str:
    """One line naming a row's code and machine, e.g. ``commit 4976d4f + uncommitted changes; NVIDIA H200; torch
    2.11.0+cu130; 2026-11-28``. Backfilled rows say so (their commit is the one that added them)."""
    commit = (prov.get("git_commit") or "unknown")[:7]
    dirty = prov.get("git_dirty")
    code = {True: f"{commit} + uncommitted changes", False: commit}.get(dirty, f"{commit}, tree state unknown")
    if prov.get("backfilled"):
        code += " (backfilled)"
    machine = prov.get("machine") or {}
    where = machine.get("gpu") or machine.get("cpu") or "CPU model not recorded"
    if not machine.get("gpu") and machine.get("cores"):
        where += f", {machine['cores']} cores"
    date = (prov.get("date") or "")[:10] or (f"added {prov['added_on'][:10]}" if prov.get("added_on") else "date unknown")
    return f"commit {code}; {where}; torch {prov.get('torch') or 'not recorded'}; {date}"
