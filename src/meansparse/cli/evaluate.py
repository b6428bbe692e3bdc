"""``meansparse evaluate``: robustness report (report.json + report.md) for a checkpoint on a data set.

Resumable by default: per-batch results go to ``OUT/state.json``, so rerunning a killed command continues
where it stopped.  ``--data PATH`` (an image folder or a tar archive) is streamed: each batch is decoded when
it is needed (``--workers N`` processes), with ``--preprocessing`` (RobustBench's names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..accel import fuse
from ..core import operators
from ..distributed import is_main, launch
from ..evaluation import ATTACK_NAMES, DEFAULT_ATTACKS, evaluate
from ..models import load as load_checkpoint
from ..placement import set_alpha
from ..serialization import load as load_state
from .common import (
    FUSE_HELP,
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_stream_args,
    as_xy,
    comma_list,
    open_data,
    parse_eps,
    parse_options,
    resolve_preprocessing,
)

__all__ = ["add_evaluate_parser", "run_evaluate"]


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command."""
    p = subparsers.add_parser(
        "evaluate", help="worst-case robust accuracy over AutoAttack, BPDA, transfer, Square, adaptive attacks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arg(p)
    p.add_argument("--meansparse", default=None,
                   help="MeanSparse state file (meansparse.save) to apply on top of the checkpoint")
    p.add_argument("--alpha", type=float, default=None, help="set every operator's alpha (after --meansparse)")
    add_data_args(p)
    add_stream_args(p)
    p.add_argument("--split", default="test", choices=["train", "test", "val"])
    p.add_argument("--n-examples", type=int, default=1000, help="N examples drawn at random (--seed) from the split")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="e.g. 8/255 (Linf) or 0.5 (L2)")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help=f"comma-separated, run in this order; valid: {', '.join(ATTACK_NAMES)}")
    p.add_argument("--option", action="append", metavar="ATTACK.NAME=VALUE",
                   help="override an attack default, e.g. apgd-ce.steps=20 or adaptive.lam=10 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--individual", dest="individual", action="store_true", default=None,
                      help="every attack sees every clean-correct example (default up to 1000 examples)")
    mode.add_argument("--cascade", dest="individual", action="store_false",
                      help="each attack only sees examples still robust (AutoAttack style, cheaper)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("--sanity", action="store_true", help="also run the eps/budget sanity checks")
    p.add_argument("--state", default=None, help="resume file (default OUT/state.json)")
    p.add_argument("--no-resume", action="store_true", help="do not read or write a resume file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.set_defaults(func=run_evaluate)
    return p


def _load_model(args: argparse.Namespace, device: str) -> Any:
    model = load_checkpoint(args.checkpoint, device=device)
    if args.meansparse:
        model = load_state(model, args.meansparse)
    if args.alpha is not None:
        set_alpha(model, args.alpha)
    model = model.to(device).eval()
    return fuse(model) if args.fuse and operators(model) else model


def _load_data(args: argparse.Namespace) -> tuple[Any, Any]:
    data = open_data(args, args.split, args.checkpoint).sample(args.n_examples, seed=args.seed)
    return as_xy(data)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args`` and write OUT/report.json and OUT/report.md.

    Under ``torchrun`` every rank evaluates a share of the batches (see ``evaluate``) and rank 0 writes the
    state file and the report, which is identical to a single-process run's."""
    with launch(args.device) as device:
        return _run_evaluate(args, device, is_main())


def _run_evaluate(args: argparse.Namespace, device: str, main: bool) -> int:
    out = Path(args.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    attacks = comma_list(args.attacks)
    model = _load_model(args, device)
    x, y = _load_data(args)
    state = None if args.no_resume else Path(args.state) if args.state else out / "state.json"
    report = evaluate(model, x, y, norm=args.norm, eps=args.eps, attacks=attacks, batch_size=args.batch_size,
                      seed=args.seed, state_path=state, progress=not args.no_progress, device=device,
                      individual=args.individual, attack_options=parse_options(args.option), sanity=args.sanity,
                      workers=args.workers)
    report.metadata["command"] = {"checkpoint": str(args.checkpoint), "meansparse": args.meansparse,
                                  "alpha": args.alpha, "data": args.data, "split": args.split}
    if y is None:  # streamed: what the images went through matters
        report.metadata["command"]["preprocessing"] = resolve_preprocessing(args, args.checkpoint)
    if not main:
        return 0
    (out / "report.json").write_text(report.to_json() + "\n")
    (out / "report.md").write_text(report.to_markdown() + "\n")
    print(json.dumps({"clean_accuracy": report.clean_accuracy, "worst_case_accuracy": report.worst_case_accuracy,
                      "robust_accuracy": report.robust_accuracy, "warnings": len(report.warnings),
                      "report": str(out / "report.json")}))
    return 0
