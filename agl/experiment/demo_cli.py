"""``agl demo``: the experiment pipeline, small (one seed, LoRA vs AGL, an eval subset), sized for a 2-core CPU."""
from __future__ import annotations

from agl.experiment.cli import add_common_options, run_from_args

__all__ = ["register"]


def _run(args) -> int:
    from agl.experiment.config import demo_config

    return run_from_args(
        args, base=demo_config(),
        banner="agl demo: {cfg.model}, methods {cfg.methods}, seed {cfg.seeds}, {cfg.steps} steps, output {cfg.out}/ "
               "(cached: a re-run reuses finished stages)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="a small end-to-end run: LoRA vs AGL on the offline model (about 15 min on 2 CPU cores)",
        description="The `agl experiment` pipeline, small: one seed, LoRA vs AGL, a subset of the DriftCaps eval "
                    "prompts. Prints a table at the end; the first run also builds the aligned start (cached in "
                    "--out for later runs). Same options as `agl experiment`.")
    add_common_options(p)
    p.set_defaults(func=_run)
