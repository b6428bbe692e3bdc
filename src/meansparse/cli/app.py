"""`meansparse` command line: train, calibrate, evaluate, sweep, demo."""

from __future__ import annotations

import argparse
import os
import sys

from ..models import list_models
from .calibrate import add_calibrate_parser
from .evaluate import add_evaluate_parser
from .pipeline import add_demo_parser, add_sweep_parser
from .train import add_train_parser

__all__ = ["build_parser", "main"]


def _run_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``meansparse`` parser with every sub-command (each sets ``func``, which runs it)."""
    parser = argparse.ArgumentParser(prog="meansparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    sub.add_parser("models", help="list registered architectures").set_defaults(func=_run_models)
    add_demo_parser(sub)
    add_sweep_parser(sub)
    add_calibrate_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input (ValueError, missing files) ends with a one-line message and exit code 2
    (``MEANSPARSE_DEBUG=1`` re-raises it with the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MEANSPARSE_DEBUG"):
            raise
        print(f"meansparse {args.command}: error: {e}", file=sys.stderr)  # a sub-command is required
        return 2
