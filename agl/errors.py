"""Errors shared by the command-line subcommands.

A module of its own so a subcommand (``agl.fisher_cli``, ``agl.driftcaps.cli``, ...) can raise ``CLIError``
without importing ``agl.cli``, which imports the subcommands: no import cycle, and ``python -m agl.cli`` catches
the same class the subcommands raise.
"""
from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user error (bad argument, missing file, ...): ``agl`` prints it as one line, without a traceback, and
    exits with status 2."""
