"""``meansparse evaluate``: robustness report (report.json + report.md) for a checkpoint on a data set.

Resumable by default: per-batch results go to ``OUT/state.json``, so rerunning a killed command continues
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data import load_dataset
from ..distributed import is_main, launch
from ..evaluation import ATTACK_NAMES, DEFAULT_ATTACKS
from ..evaluation.adversarial import INDEX_FILE as ADVERSARIAL_INDEX
from ..fastpath import evaluate
from ..placement import set_alpha
from ..serialization import load as load_state
from .common import (
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_fuse_args,
    comma_list,
    load_model_arg,
    parse_eps,
    parse_options,
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
    p.add_argument("--split", default="test", choices=["train", "test"])
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
    add_fuse_args(p)
    p.add_argument("--sanity", action="store_true", help="also run the eps/budget sanity checks")
    p.add_argument("--save-adversarial", action="store_true",
                   help="write OUT/adversarial.pt (the per-example worst-case adversarial images, clean where "
                        "unbroken: RobustBench's external-evaluation format) and OUT/adversarial.json (split "
                        "indices, the attack that broke each example)")
    p.add_argument("--state", default=None, help="resume file (default OUT/state.json)")
    p.add_argument("--no-resume", action="store_true", help="do not read or write a resume file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.set_defaults(func=run_evaluate)
    return p


def _load_model(args: argparse.Namespace, device: str) -> Any:
    model = load_model_arg(args, args.checkpoint, device)
    if args.meansparse:
        model = load_state(model, args.meansparse)
    if args.alpha is not None:
        set_alpha(model, args.alpha)
    model = model.to(device).eval()
    return model


def _load_data(args: argparse.Namespace) -> tuple[Any, Any, list[int]]:
    """Images, labels and their indices in the split."""
    split = load_dataset(args.data, args.split, root=args.data_root)
    indices = split.sample_indices(args.n_examples, seed=args.seed)
    data = split.subset(indices)
    return data.float(), data.labels, indices.tolist()


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
    x, y, indices = _load_data(args)
    state = None if args.no_resume else Path(args.state) if args.state else out / "state.json"
    report = evaluate(model, x, y, fuse="auto" if args.fuse is None else args.fuse, norm=args.norm, eps=args.eps,
                      attacks=attacks, batch_size=args.batch_size,
                      seed=args.seed, state_path=state, progress=not args.no_progress, device=device,
                      individual=args.individual, attack_options=parse_options(args.option), sanity=args.sanity,
                      adversarial_dir=out if args.save_adversarial else None,
                      announce=lambda d: main and print(f"meansparse evaluate: {'fused' if d.fuse else 'eager'} "
                                                        f"operator: {d.reason}", file=sys.stderr))
    report.metadata["command"] = {"checkpoint": str(args.checkpoint), "meansparse": args.meansparse,
                                  "alpha": args.alpha, "data": args.data, "split": args.split}
    if not main:
        return 0
    if args.save_adversarial:  # name the examples by their index in the split, as RobustBench does
        record = json.loads((out / ADVERSARIAL_INDEX).read_text())
        record.update(data=args.data, split=args.split, split_indices=indices)
        (out / ADVERSARIAL_INDEX).write_text(json.dumps(record) + "\n")
    (out / "report.json").write_text(report.to_json() + "\n")
    (out / "report.md").write_text(report.to_markdown() + "\n")
    print(json.dumps({"clean_accuracy": report.clean_accuracy, "worst_case_accuracy": report.worst_case_accuracy,
                      "robust_accuracy": report.robust_accuracy, "warnings": len(report.warnings),
                      "report": str(out / "report.json")}))
    return 0
