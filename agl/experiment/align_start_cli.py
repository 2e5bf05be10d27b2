"""``agl align-start``: the experiment's aligned start as a plain model directory (see
:func:`agl.experiment.export.export_aligned_start`)."""
from __future__ import annotations

import os

from agl.experiment.cli import _set_value

__all__ = ["register"]


def _run(args) -> int:
    from agl.errors import CLIError
    from agl.experiment.export import export_aligned_start
    from agl.experiment.cli import _user_errors, config_from_args
    from agl.experiment.config import demo_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = config_from_args(args, base=demo_config())
    try:
        res = export_aligned_start(args.dest, cfg, cache=args.cache, force=args.force, progress=not args.no_progress)
    except (ValueError, *_user_errors()) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    how = ("built in " if res["built"] else "reused from ") + res["stage"]
    if res["exported"]:
        print(f"aligned start ({how}) saved to {res['out']}/ in {res['seconds']:.0f}s; load it with "
              f"agl.models.load_causal_lm({res['out']!r}) or pass --model {res['out']} to agl fisher / driftcaps")
    else:
        print(f"{res['out']}/ already holds this aligned start (stage {res['hash']}); --force writes it again")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align-start", help="save the experiment's aligned start (the offline model given safety SFT) as a model "
                            "directory",
        description="Saves the aligned start of `agl experiment` / `agl demo` (LoRA SFT on refusal demonstrations "
                    "and self-distilled safe answers, merged into the weights) as a plain Hugging Face model "
                    "directory, with the tokenizer and refusal_demos.jsonl (JSONL {\"prompt\", \"response\"}, data "
                    "for `agl fisher`). The SFT is the pipeline's cached stage in --cache: reused when `agl demo` "
                    "already built it there, else built there first (5-8 min on 2 CPU cores) and reused by "
                    "`agl demo` later.")
    p.add_argument("--out", dest="dest", required=True, metavar="DIR",
                   help="the model directory to write (new, empty, or an earlier export)")
    p.add_argument("--cache", metavar="DIR", help="the pipeline directory holding the cached stage (default: "
                   "runs/demo, the one `agl demo` uses; `agl experiment --out DIR` shares it)")
    p.add_argument("--config", metavar="FILE", help="an experiment config file (JSON or TOML); only the aligned "
                   "start's fields (align_*, model, dtype, prompts, refusals, max_length, ...) matter here")
    p.add_argument("--model", metavar="SPEC", help="base model: 'smollm2-135m-instruct' (offline default), a local HF "
                   "directory or a .gguf file")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where to train (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", type=_set_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field (JSON value), e.g. --set align_steps=60; repeatable")
    p.add_argument("--force", action="store_true", help="write --out again even if it holds this aligned start")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
