"""Provenance of a result: which code, on which machine, under which load, when.

Every result file ``agl`` or its benchmarks write carries ``provenance()`` under the key ``"provenance"``:

    {"git_commit": "<40 hex>" | None, "git_dirty": bool | None, "source_digest": "<16 hex>",
     "build": {"git_commit", "git_dirty", "csrc_digest", "stale": bool | None},
     "machine": {"cpu": "AMD EPYC ...", "cores": 2, "gpu": "NVIDIA H200" | None},
     "load_avg": [1m, 5m, 15m], "torch": "2.14.1", "python": "3.11.7", "date": "2026-11-30T02:10:00+00:00"}

``git_dirty`` is True when tracked files differ from the commit or an untracked (not ignored) file sits under
``agl/`` or ``csrc/`` (setup.py globs ``csrc/*.cpp``, so a new source file is built in before it is committed).
Other untracked files (caches, outputs) and the committed result folders (``bench/results/``, ``docs/results/``) are
ignored: a benchmark that appends to its results file does not make the code it measures "dirty" for the next run.

``source_digest`` is a sha256 (16 hex digits) of the package source as it is on disk (``agl/**/*.py`` and every file
under ``csrc/``, paths and bytes), so two dirty trees of one commit are told apart. ``build`` is what setup.py
recorded in ``agl/_build_info.py`` when it built the extension; ``stale`` is True when ``csrc/`` has changed since
(a benchmark would time an old library under a new commit), None when unknown (no build info, no ``csrc/``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["provenance", "git_state", "source_digest", "code_state", "build_state", "cpu_name", "gpu_name",
           "same_code"]

_REPO = Path(__file__).resolve().parent.parent
RESULT_DIRS = ("bench/results", "docs/results")  # data, not code: ignored by ``git_dirty``
SOURCE_DIRS = ("agl", "csrc")  # the code the package runs: untracked files here count as dirty
_GENERATED = {"agl/_build_info.py"}  # written by the build (it holds a commit): not source


def _git(args: List[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(repo: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of ``repo`` (default: this package's checkout); None where git cannot tell
    (an installed wheel, no git)."""
    cwd = Path(repo) if repo is not None else _REPO
    head = _git(["rev-parse", "HEAD"], cwd)
    if head is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=all", "--", ".", *(f":!{p}" for p in RESULT_DIRS)], cwd)
    return {"git_commit": head.strip(), "git_dirty": None if status is None else _dirty(status)}


def _dirty(porcelain: str) -> bool:
    """A changed tracked file anywhere, or an untracked one under SOURCE_DIRS (``git status --porcelain`` lines are
    ``XY path``, ``?? path`` for untracked; paths are relative to the repository root)."""
    for line in porcelain.splitlines():
        if not line.strip():
            continue
        if not line.startswith("??"):
            return True
        path = line[3:].strip('"')
        if any(path == d or path.startswith(d + "/") for d in SOURCE_DIRS) and path not in _GENERATED:
            return True
    return False


def source_digest(repo: Optional[os.PathLike] = None, dirs=SOURCE_DIRS) -> Optional[str]:
    """sha256 (16 hex) of every source file under ``dirs`` of ``repo`` (``*.py`` under ``agl``, any file under
    ``csrc``; caches and the generated build info left out), by relative path and bytes; None when none exists."""
    root = Path(repo) if repo is not None else _REPO
    h, n = hashlib.sha256(), 0
    for d in dirs:
        files = (root / d).rglob("*.py" if d == "agl" else "*")
        for p in sorted(f for f in files if f.is_file() and "__pycache__" not in f.parts):
            rel = p.relative_to(root).as_posix()
            if rel in _GENERATED or p.suffix in (".so", ".pyc", ".o"):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
            n += 1
    return h.hexdigest()[:16] if n else None


def code_state(repo: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``{"git_commit", "git_dirty", "source_digest"}``: which code ran (what a cached artefact records)."""
    return {**git_state(repo), "source_digest": source_digest(repo)}


def build_state(repo: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """What setup.py recorded about the extension's build (``agl/_build_info.py``) and whether ``csrc/`` changed
    since: ``{"git_commit", "git_dirty", "csrc_digest", "stale"}`` (None where unknown)."""
    try:
        info = importlib.import_module("agl._build_info")
    except ImportError:
        info = None
    built = getattr(info, "CSRC_DIGEST", None)
    now = source_digest(repo, ("csrc",))
    return {"git_commit": getattr(info, "GIT_COMMIT", None), "git_dirty": getattr(info, "GIT_DIRTY", None),
            "csrc_digest": built, "stale": None if built is None or now is None else built != now}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), falling back to ``platform``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> Optional[str]:
    """The name of CUDA device 0, or None without a usable GPU (never initialises CUDA when torch says none)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" for provenance
        pass
    return None


def provenance(repo: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """The provenance record described in the module docstring (call it at the *start* of a run: ``load_avg`` is
    the load the run started under)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = None
    return {
        **code_state(repo),
        "build": build_state(repo),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu_name()},
        "load_avg": load,
        "torch": torch_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def same_code(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """True when two provenance records name the same clean commit (rows that may replace each other)."""
    return (a.get("git_commit") is not None and a.get("git_commit") == b.get("git_commit")
            and a.get("git_dirty") is False and b.get("git_dirty") is False)
