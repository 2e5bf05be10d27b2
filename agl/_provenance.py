"""Provenance of a result: which code, on which machine, under which load, when.

Every result file ``agl`` or its benchmarks write carries ``provenance()`` under the key ``"provenance"``:

    {"git_commit": "<40 hex>" | None, "git_dirty": bool | None,
     "machine": {"cpu": "AMD EPYC ...", "cores": 2, "gpu": "NVIDIA H200" | None},
     "load_avg": [1m, 5m, 15m], "torch": "2.14.1", "python": "3.11.7", "date": "2026-11-30T02:10:00+00:00"}

``git_dirty`` is True when tracked files differ from the commit. Untracked files (caches, outputs) and the committed
result folders (``bench/results/``, ``docs/results/``) are ignored: a benchmark that appends to its results file
does not make the code it measures "dirty" for the next run.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["provenance", "git_state", "cpu_name", "gpu_name", "same_code"]

_REPO = Path(__file__).resolve().parent.parent
RESULT_DIRS = ("bench/results", "docs/results")  # data, not code: ignored by ``git_dirty``


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
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in RESULT_DIRS)], cwd)
    return {"git_commit": head.strip(), "git_dirty": None if status is None else bool(status.strip())}


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
        **git_state(repo),
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
