"""The ``agl`` command line. Each subcommand lives in its own module, which defines
``register(subparsers)``: it adds its parser and sets ``func`` (a callable taking the parsed args, returning an
exit code). Modules are imported lazily so ``agl --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from agl.errors import CLIError

# subcommand -> module defining register(subparsers)
_COMMANDS = {
    "fisher": "agl.fisher_cli",
    "driftcaps": "agl.driftcaps.cli",
    "experiment": "agl.experiment.cli",
    "demo": "agl.experiment.demo_cli",
    "align-start": "agl.experiment.align_start_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agl", description="AlignGuard-LoRA: alignment-preserving LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # this subcommand is not part of this build
                continue
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"agl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"agl {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
