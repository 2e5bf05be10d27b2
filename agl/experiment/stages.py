"""Cached, resumable stages.

A stage builds one artefact directory. It builds it in a temporary sibling directory, writes a ``manifest.json``
last (the stage name, its config key and hash, the sha256 and size of every file, and the code that built it:
``"code": agl._provenance.code_state()``, i.e. commit, dirty flag and source digest), then swaps it into place with
``os.replace``. A later run skips the stage when the directory's manifest has the same hash and every file still
matches its checksum; a missing, half-written, corrupt or mismatched artefact is reported and rebuilt, never
silently reused. Ctrl-C at any point leaves either the old artefact or the new one (plus a temporary directory that
the next run removes), so re-running the same command continues where it stopped.

The code is recorded, not keyed: a new commit reuses the artefacts of the old one (keys hold what the config asks
for; a code change that changes an artefact bumps a version in the key, like ``EVAL_VERSION``). ``code_versions``
reads the records back, so a report says which code versions it combines and warns when there is more than one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional

from agl._io import atomic_write_json
from agl.experiment.config import stable_hash

__all__ = ["Stage", "StageResult", "file_sha256", "check_artefact", "code_versions"]

MANIFEST = "manifest.json"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _code() -> tuple:
    """The code this process runs, taken once (at its first stage): the modules were imported from it, so a later
    edit on disk does not change what this process builds with."""
    from agl._provenance import code_state

    return tuple(code_state().items())


def code_versions(paths: Dict[str, str]) -> Dict[str, Any]:
    """Which code built the artefacts ``paths`` (stage name -> directory), from their manifests:
    ``{"versions": [{"git_commit", "git_dirty", "source_digest", "stages": [names]}, ...], "commits": [...],
    "unrecorded": [stage names whose manifest predates the record], "warning": str | None}``.
    Warns (``UserWarning``) when the artefacts come from more than one commit or source digest."""
    groups: Dict[tuple, List[str]] = {}
    unrecorded = []
    for name in sorted(paths):
        mpath = os.path.join(paths[name], MANIFEST)
        if not os.path.exists(mpath):
            continue
        with open(mpath, encoding="utf-8") as fh:
            code = json.load(fh).get("code")
        if code is None:
            unrecorded.append(name)
            continue
        groups.setdefault(tuple(code.get(k) for k in ("git_commit", "git_dirty", "source_digest")), []).append(name)
    versions = [{"git_commit": c, "git_dirty": d, "source_digest": s, "stages": names}
                for (c, d, s), names in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    commits = sorted({v["git_commit"] or "unknown" for v in versions})
    warning = None
    if len(versions) > 1:
        warning = (f"the artefacts were built by {len(versions)} code versions (commits {', '.join(c[:7] for c in commits)}"
                   f"{'; dirty trees differ by source digest' if len(commits) < len(versions) else ''}): "
                   "results may mix code versions; rerun with a fresh `out` to build them with one")
        warnings.warn(warning, UserWarning, stacklevel=2)
    return {"versions": versions, "commits": commits, "unrecorded": unrecorded, "warning": warning}


def _list_files(root: str) -> List[str]:
    out = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            rel = os.path.relpath(os.path.join(dp, fn), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def check_artefact(path: str, digest: str) -> Optional[str]:
    """None when ``path`` holds a complete artefact with hash ``digest``; otherwise why not (one line)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return "missing"
    if not os.path.exists(mpath):
        return "incomplete (no manifest)"
    try:
        with open(mpath, encoding="utf-8") as fh:
            man = json.load(fh)
    except (OSError, ValueError) as exc:
        return f"corrupt manifest ({exc.__class__.__name__})"
    if man.get("hash") != digest:
        return f"config changed (hash {man.get('hash')} != {digest})"
    for rel, info in (man.get("files") or {}).items():
        fp = os.path.join(path, rel)
        if not os.path.exists(fp):
            return f"file missing: {rel}"
        if os.path.getsize(fp) != info.get("size"):
            return f"file corrupt (size): {rel}"
        if file_sha256(fp) != info.get("sha256"):
            return f"file corrupt (checksum): {rel}"
    return None


@dataclass
class StageResult:
    path: str
    built: bool  # False when reused from cache
    seconds: float
    reason: str  # why it was (re)built, or "cached"


class Stage:
    """One cached stage: ``Stage(root, name, key).run(build)`` where ``build(tmp_dir)`` writes the artefact's
    files into ``tmp_dir``. ``key`` (JSON-able) determines the hash; include the hashes of upstream stages."""

    def __init__(self, root: str, name: str, key: Dict[str, Any], *, log: Callable[[str], None] = None):
        self.root = root
        self.name = name
        self.key = key
        self.hash = stable_hash({"stage": name, **key})
        self.path = os.path.join(root, name)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def status(self) -> Optional[str]:
        return check_artefact(self.path, self.hash)

    def run(self, build: Callable[[str], None], *, force: bool = False) -> StageResult:
        t0 = time.time()
        why = "forced" if force else self.status()
        if why is None:
            return StageResult(self.path, False, 0.0, "cached")
        if why != "missing":
            self.log(f"[{self.name}] artefact at {self.path} is {why}: rebuilding")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(self.path)
        for stale in os.listdir(parent):  # leftovers of interrupted runs
            if stale.startswith(f".{base}.tmp-") or stale.startswith(f".{base}.old-"):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
        os.makedirs(tmp)
        try:
            build(tmp)
            files = {rel: {"size": os.path.getsize(os.path.join(tmp, rel)),
                           "sha256": file_sha256(os.path.join(tmp, rel))} for rel in _list_files(tmp)}
            manifest = {"stage": self.name, "hash": self.hash, "key": self.key, "files": files, "code": dict(_code()),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 2)}
            atomic_write_json(os.path.join(tmp, MANIFEST), manifest)
            if os.path.exists(self.path):
                old = os.path.join(parent, f".{base}.old-{os.getpid()}")
                os.replace(self.path, old)
                os.replace(tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StageResult(self.path, True, time.time() - t0, why)
