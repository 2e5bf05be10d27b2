"""``agl demo``: the experiment pipeline, small (one seed, LoRA vs AGL, an eval subset), sized for a 2-core CPU."""
from __future__ import annotations

import os

from agl.experiment.cli import _user_errors, add_common_options, config_from_args, print_summary

__all__ = ["register"]


def _run(args) -> int:
    from agl.cli import CLIError
    from agl.experiment.config import demo_config
    from agl.experiment.pipeline import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = config_from_args(args, base=demo_config())
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA GPU is visible to torch")
    print(f"agl demo: {cfg.model}, methods {cfg.methods}, seed {cfg.seeds}, {cfg.steps} steps, output {cfg.out}/ "
          "(cached: a re-run reuses finished stages)", flush=True)
    try:
        result = run_pipeline(cfg, progress=not args.no_progress)
    except _user_errors() as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    print_summary(result)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="a small end-to-end run: LoRA vs AGL on the offline model (about 15 min on 2 CPU cores)",
        description="The `agl experiment` pipeline, small: one seed, LoRA vs AGL, a subset of the DriftCaps eval "
                    "prompts. Prints a table at the end; the first run also builds the aligned start (cached in "
                    "--out for later runs). Same options as `agl experiment`.")
    add_common_options(p)
    p.set_defaults(func=_run)
