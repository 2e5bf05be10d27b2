"""Cached, resumable stages.

A stage builds one artefact directory. It builds it in a temporary sibling directory, writes a ``manifest.json``
last (the stage name, its config key and hash, the sha256 and size of every file), then swaps it into place with
``os.replace``. A later run skips the stage when the directory's manifest has the same hash and every file still
matches its checksum; a missing, half-written, corrupt or mismatched artefact is reported and rebuilt, never
silently reused. Ctrl-C at any point leaves either the old artefact or the new one (plus a temporary directory that
the next run removes), so re-running the same command continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from agl._io import atomic_write_json
from agl.experiment.config import stable_hash

__all__ = ["Stage", "StageResult", "file_sha256", "check_artefact"]

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
            manifest = {"stage": self.name, "hash": self.hash, "key": self.key, "files": files,
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
