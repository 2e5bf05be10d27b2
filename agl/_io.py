"""File I/O used everywhere in ``agl``: atomic writes and JSON Lines.

An atomic write goes to a temporary file in the target's own folder, is flushed and fsync'ed, then ``os.replace``d
over the target: a reader (or an interrupted run) sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Tuple, Union

__all__ = [
    "atomic_output", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_png", "iter_jsonl", "read_jsonl", "write_jsonl", "json_default",
]

PathLike = Union[str, os.PathLike]

# mkstemp creates files 0600; an atomic write should give the mode a plain open() would (0666 less the umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that wants a file name (``safetensors.save_file``, ...).

    On a normal exit the file gets the mode a plain ``open()`` would give it (0666 less the umask), is fsync'ed and
    ``os.replace``d over ``path``; on an exception it is removed and ``path`` keeps its old content. Parent folders
    are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        yield Path(tmp)
        # after the writer: some (safetensors.save_file) replace the file with a new 0600 one instead of writing
        # into it, so the mode is set on whatever file is there now
        os.chmod(tmp, 0o666 & ~_UMASK)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_png(path: PathLike, fig, **savefig_kw: Any) -> None:
    """Write a matplotlib figure ``fig`` to ``path`` as a PNG atomically (``savefig_kw``: e.g. ``dpi``)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    atomic_write_bytes(path, buf.getvalue())


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and tensors become Python numbers/lists, objects with
    ``to_dict()`` their dict, sets sorted lists, paths strings."""
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):  # result objects (reports, fits, configs) serialise as their dict
        return o.to_dict()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def iter_jsonl(path: PathLike, *, missing_ok: bool = False,
               tolerate_torn_tail: bool = False) -> Iterator[Tuple[int, dict]]:
    """``(line number, record)`` of each JSON object in a JSON Lines file, read lazily (blank lines skipped), so a
    caller that validates a schema can name the line of a bad record.

    ``missing_ok``: a missing file reads as no records. ``tolerate_torn_tail``: a last line cut by an interruption
    (an append-only cache) is dropped instead of raising. A line that is not JSON, or not a JSON object, anywhere
    else raises a ValueError that names the file and line.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                if tolerate_torn_tail and not fh.read().strip():
                    return
                raise ValueError(f"{path}:{i}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object per line, got {type(rec).__name__}")
            yield i, rec


def read_jsonl(path: PathLike, *, missing_ok: bool = False, tolerate_torn_tail: bool = False) -> List[dict]:
    """The records of a JSON Lines file: :func:`iter_jsonl` without the line numbers."""
    return [rec for _, rec in iter_jsonl(path, missing_ok=missing_ok, tolerate_torn_tail=tolerate_torn_tail)]


def write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """Write ``records`` as JSON Lines to ``path`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in records))
