"""The aligned start (stage 1 of the pipeline) for users: merged into the base weights and saved as a plain model
directory, from the pipeline's cached stage (``agl align-start`` is this module's command line)."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

__all__ = ["export_aligned_start", "EXPORT_MARKER"]

# written last into an exported aligned start: which stage it came from (an export is reused only for the same one)
EXPORT_MARKER = "aligned_start.json"


def export_aligned_start(out, cfg=None, *, cache: Optional[str] = None, model_factory: Optional[Callable] = None,
                         force: bool = False, progress: bool = True,
                         log: Optional[Callable[[str], None]] = None) -> dict:
    """The experiment's aligned start as a plain Hugging Face model directory ``out``: the base model with the
    aligned start's SFT adapter merged into its weights and the tokenizer (``agl.models.load_causal_lm(out)``
    loads it like any model), plus ``refusal_demos.jsonl`` (its SFT refusal demonstrations, ``{"prompt",
    "response"}``: data for ``agl fisher``), ``holdout.jsonl`` (held-out refusal demos) and ``aligned_start.json``.

    The adapter is the pipeline's cached ``aligned_start`` stage under ``cache`` (default ``cfg.out``; ``cfg``
    default :func:`agl.experiment.config.demo_config`, whose ``out`` is ``runs/demo``): reused when ``agl demo`` or
    ``agl experiment`` already built it there with the same settings (only the stage-1 fields and the model count),
    else built there first (5-8 min on 2 CPU cores for the offline model) and then reused by those commands.
    An ``out`` holding an export of the same stage is kept as it is unless ``force``; an ``out`` that exists and is
    not an export must be empty. The directory is assembled next to ``out`` and renamed into place.

    Returns ``{"out", "stage": the stage's directory, "hash", "built": stage built now, "exported": out written
    now, "seconds"}``.
    """
    import dataclasses
    import shutil
    import time
    from pathlib import Path

    from agl._io import atomic_write_json
    from agl.experiment.config import STAGE_FIELDS, demo_config
    from agl.experiment.pipeline import Context, _builder  # the pipeline's own stage builder: one recipe
    from agl.experiment.plan import stage_plan
    from agl.models import save_plain

    t0 = time.time()
    cfg = cfg if cfg is not None else demo_config()
    if cache is not None:
        cfg = dataclasses.replace(cfg, out=str(cache))
    out = Path(out)
    stage = stage_plan(cfg)["aligned_start"]
    result = {"out": str(out), "stage": stage.path, "hash": stage.hash, "built": False, "exported": False}
    marker = out / EXPORT_MARKER
    previous = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    if previous is not None and previous.get("hash") == stage.hash and not force:
        return {**result, "seconds": time.time() - t0}
    if out.exists() and previous is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export_aligned_start: `out` {out} exists and is neither empty nor an exported aligned "
                         "start; pass a new directory")
    ctx = Context(cfg, model_factory, progress, log)
    ctx.stages = {"aligned_start": stage}
    result["built"] = stage.run(_builder(ctx, "aligned_start")).built
    model, tok = ctx.aligned()
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_plain(model, tmp, tok)
        for name in ("refusal_demos.jsonl", "holdout.jsonl"):
            shutil.copyfile(os.path.join(stage.path, name), tmp / name)
        with open(os.path.join(stage.path, "info.json"), encoding="utf-8") as fh:
            info = {k: v for k, v in json.load(fh).items() if k != "losses"}
        atomic_write_json(tmp / EXPORT_MARKER, {
            "format": "agl.aligned_start", "hash": stage.hash, "model": cfg.model, "source": stage.path,
            "fields": cfg.key(STAGE_FIELDS["aligned_start"]), "info": info})
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "exported": True, "seconds": time.time() - t0}
