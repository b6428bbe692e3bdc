"""`meansparse` command line: train, finetune, calibrate, evaluate, sweep, demo."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..models import list_models
from .calibrate import add_calibrate_parser
from .evaluate import add_evaluate_parser
from .pipeline import add_demo_parser, add_sweep_parser
from .train import add_finetune_parser, add_train_parser

__all__ = ["build_parser", "main"]


def _run_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``meansparse`` parser with every sub-command (each sets ``func``, which runs it)."""
    parser = argparse.ArgumentParser(prog="meansparse", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (anywhere on the command line; or MEANSPARSE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_finetune_parser(sub)
    sub.add_parser("models", help="list registered architectures").set_defaults(func=_run_models)
    add_demo_parser(sub)
    add_sweep_parser(sub)
    add_calibrate_parser(sub)
    add_evaluate_parser(sub)
    return parser


#: exit code of a run stopped by Ctrl-C: 2, like every other way a run ends without its result
INTERRUPTED = 2
#: what a rerun of each command does after an interruption
_RESUMES = {"evaluate": "interrupted; rerun the same command to resume",
            "demo": "interrupted; rerun the same command to resume",
            "sweep": "interrupted; rerun the same command to resume",
            "train": "interrupted; rerun the same command to resume after the last finished epoch",
            "finetune": "interrupted; rerun the same command to resume after the last finished epoch",
            "calibrate": "interrupted; rerun the same command to resume (the batches done so far are kept "
                         "in <--out>.partial; under torchrun the pass starts over)"}


#: the exceptions a user's input causes in the ordinary course (a bad value, a file, a missing extra): their
#: message alone is the error line; anything else is named by its type too
_USER_ERRORS = (ValueError, OSError, ImportError)


def _one_line(e: BaseException) -> str:
    """The exception as one line (several lines joined; an OSError with its file; a DataLoader worker's error
    as the worker's own message, without the traceback the DataLoader wraps it in)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and "DataLoader worker" in lines[0] and any(ln.startswith("Original Traceback") for ln in lines):
        lines = [lines[-1].removeprefix(f"{type(e).__name__}: ")]
    return " ".join(lines) or type(e).__name__


def _debug(argv: list[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted anywhere, before or after the sub-command), and whether it was
    there or ``MEANSPARSE_DEBUG`` is set."""
    args = list(sys.argv[1:] if argv is None else argv)
    given = "--debug" in args
    return [a for a in args if a != "--debug"], given or bool(os.environ.get("MEANSPARSE_DEBUG"))


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error (bad value, missing or unreadable file, unavailable device, missing extra,
    a user's model that fails) ends with one line ``meansparse <command>: error: ...`` on stderr and exit code
    2 (an error of another type than ValueError / OSError / ImportError is named by its type); Ctrl-C with one
    line saying how to resume and exit code 2 as well. ``--debug`` or ``MEANSPARSE_DEBUG=1`` re-raises with the
    traceback."""
    argv, debug = _debug(argv)
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        text = _one_line(message) if isinstance(message, Exception) else str(message)
        print(f"meansparse {args.command}: warning: {text}", file=sys.stderr if file is None else file)

    shown = warnings.showwarning
    warnings.showwarning = one_line_warning  # a warning is one line too, not the source line that raised it
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nmeansparse {args.command}: {_RESUMES.get(args.command, 'interrupted')}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every error ends as one line; --debug shows the traceback
        if debug:
            raise
        text = _one_line(e) if isinstance(e, _USER_ERRORS) else (f"{type(e).__name__}: {_one_line(e)} (--debug "
                                                                 "shows the traceback)")
        print(f"meansparse {args.command}: error: {text}", file=sys.stderr)  # a sub-command is required
        return 2
    finally:
        warnings.showwarning = shown
