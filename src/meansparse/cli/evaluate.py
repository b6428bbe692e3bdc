"""``meansparse evaluate``: robustness report (report.json + report.md) for a checkpoint on a data set.

Resumable by default: per-batch results go to ``OUT/state.json``, so rerunning a killed command continues
where it stopped.  Every argument (attacks and their options, device, the output folder's writability, the
data's fit to the model) is checked before the first attack runs.  ``--data PATH`` (an image folder or a tar
archive) is streamed: each batch is decoded when it is needed (``--workers N`` processes), with
``--preprocessing`` (RobustBench's names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._utils import WriteError, atomic_path, writing
from ..core import operators
from ..data import SPLIT_NAMES, as_xy
from ..distributed import is_main, launch
from ..evaluation import ATTACK_NAMES, DEFAULT_ATTACKS, EvaluationSpec
from ..evaluation.adversarial import INDEX_FILE as ADVERSARIAL_INDEX
from ..evaluation.adversarial import TENSOR_FILE as ADVERSARIAL_TENSOR
from ..evaluation.ladder import Ladder
from ..evaluation.spec import mode_of
from ..fastpath import evaluate
from ..placement import set_alpha
from ..serialization import load as load_state
from ..zoo.spec import parse_model_spec
from .common import (
    add_checkpoint_arg,
    add_class_mismatch_arg,
    add_data_args,
    add_device_arg,
    add_path_args,
    add_stream_args,
    check_attacks,
    check_data_fits,
    check_device,
    check_not_input,
    checkpoint_config,
    clamp_count,
    comma_list,
    command_parser,
    data_name,
    load_model_arg,
    notice,
    open_data,
    parse_eps,
    parse_options,
    positive_int,
    resolve_preprocessing,
    seed_int,
    writable_dir,
    writable_file,
)

__all__ = ["add_evaluate_parser", "evaluation_spec", "run_evaluate", "OUTPUT_FILES"]

#: the files evaluate writes into --out (besides the resume file)
OUTPUT_FILES = ("report.json", "report.md", ADVERSARIAL_TENSOR, ADVERSARIAL_INDEX)


def ladder_factors(text: str) -> tuple[int, ...]:
    """An argparse type: the ladder's budget factors, e.g. ``2,4,8`` (increasing integers >= 2)."""
    try:
        factors = tuple(int(f) for f in comma_list(text))
        Ladder(factors=factors)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be increasing integers >= 2 separated by commas (e.g. 2,4,8), "
                                         f"got {text!r}") from None
    return factors


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command."""
    p = command_parser(subparsers, "evaluate", __doc__,
                       "worst-case robust accuracy over plain, MeanSparse-aware (surrogate, BPDA), transfer and "
                       "Square attacks, with a budget ladder")
    add_checkpoint_arg(p)
    p.add_argument("--meansparse", default=None,
                   help="MeanSparse state file (meansparse.save) to apply on top of the checkpoint (default: none, "
                        "the checkpoint alone)")
    p.add_argument("--no-strict", action="store_true",
                   help="load a --meansparse state even if it was calibrated on another base model or its sites' "
                        "activations differ (a warning instead of an error)")
    p.add_argument("--alpha", type=float, default=None,
                   help="set every operator's alpha (after --meansparse; default: as stored in the state)")
    add_data_args(p)
    add_stream_args(p)
    add_class_mismatch_arg(p)
    p.add_argument("--split", default="test", choices=SPLIT_NAMES,
                   help="split to evaluate on")
    p.add_argument("--n-examples", type=positive_int, default=1000,
                   help="N examples drawn at random (--seed) from the split; more than the split holds is clamped")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="e.g. 8/255 (Linf) or 0.5 (L2); default 8/255")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help=f"comma-separated, run in this order; valid: {', '.join(ATTACK_NAMES)}")
    p.add_argument("--option", action="append", metavar="ATTACK.NAME=VALUE",
                   help="override an attack default, e.g. apgd-ce.steps=20 or adaptive.lam=10 (repeatable; default: "
                        "each attack's standard budget)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--individual", dest="individual", action="store_true", default=None,
                      help="every attack sees every clean-correct example (default up to 1000 examples)")
    mode.add_argument("--cascade", dest="individual", action="store_false",
                      help="each attack only sees examples still robust (AutoAttack style, cheaper; default above "
                           "1000 examples)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per attacked batch")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sample and of every attack batch")
    add_device_arg(p)
    add_path_args(p)
    p.add_argument("--sanity", action="store_true", help="also run the eps/budget sanity checks")
    rungs = p.add_mutually_exclusive_group()
    rungs.add_argument("--single-rung", action="store_true",
                       help="no budget ladder: run the attacks once (by default the BPDA, surrogate and adaptive "
                            "attacks are repeated with 2x then 4x their budget on the examples still robust until "
                            "the worst case converges)")
    rungs.add_argument("--ladder", type=ladder_factors, default=None, metavar="FACTORS",
                       help="the ladder's budget factors, increasing integers >= 2 (default 2,4); e.g. 2,4,8 climbs "
                            "one rung more where 2,4 did not converge, reusing the rungs in --state")
    p.add_argument("--no-indicators", action="store_true", help="skip the attack-failure indicators")
    p.add_argument("--save-adversarial", action="store_true",
                   help="write OUT/adversarial.pt (the per-example worst-case adversarial images, clean where "
                        "unbroken: RobustBench's external-evaluation format) and OUT/adversarial.json (split "
                        "indices, the attack that broke each example)")
    p.add_argument("--state", default=None, help="resume file (default OUT/state.json)")
    p.add_argument("--no-resume", action="store_true", help="do not read or write a resume file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.set_defaults(func=run_evaluate)
    return p


def _load_model(args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """(base model, model to evaluate: base + MeanSparse state + α)."""
    base = load_model_arg(args, args.checkpoint, device)
    model = base
    if args.meansparse and operators(base):
        raise ValueError(f"{args.checkpoint} comes with its MeanSparse operators (a model trained with them); "
                         "evaluate it without --meansparse (--alpha still sets α)")
    if args.meansparse:
        model = load_state(base, args.meansparse, strict=not args.no_strict)
    if args.alpha is not None:
        set_alpha(model, args.alpha)
    model = model.to(device).eval()
    return base, model


def _load_data(args: argparse.Namespace, name: str) -> tuple[Any, list[int], int]:
    """The sampled examples (in memory, or a stream for a --data PATH), their indices in the split, and the
    split's size."""
    full = open_data(args, args.split, args.checkpoint, name=name)
    n = clamp_count(args.n_examples, len(full), "--n-examples", f"the {name} {args.split} split", "evaluate")
    indices = full.sample_indices(n, seed=args.seed)
    return full.subset(indices), indices.tolist(), len(full)


def _check_args(args: argparse.Namespace, main: bool) -> Path | None:
    """Everything that can be checked before loading anything: device, attacks and options, the output
    folder and the resume file (a probe write), --alpha. Returns the resume file."""
    check_device(args.device)
    parse_model_spec(args.checkpoint)  # a malformed spec fails here, before the output folder is made
    options = parse_options(args.option)
    check_attacks(comma_list(args.attacks), options, norm=args.norm, eps=args.eps)
    if args.alpha is not None and not (args.alpha >= 0 and args.alpha != float("inf")):
        raise ValueError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    out = writable_dir(args.out) if main else Path(args.out)
    state = None if args.no_resume else Path(args.state) if args.state else out / "state.json"
    outputs = [out / f for f in OUTPUT_FILES]
    for path in outputs + ([state] if state is not None else []):
        check_not_input(path, args, "--state" if path == state else "--out")
    if state is not None and any(_same_path(state, o) for o in outputs):
        raise ValueError(f"--state {state} is one of the files evaluate writes into --out ({', '.join(OUTPUT_FILES)}"
                         "): the report would overwrite the resume file; choose another path")
    if state is not None and main:
        writable_file(state, "--state")
    return state


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args`` and write OUT/report.json and OUT/report.md.

    Under ``torchrun`` every rank evaluates a share of the batches (see ``evaluate``) and rank 0 writes the
    state file and the report, which is identical to a single-process run's."""
    check_device(args.device)
    with launch(args.device) as device:
        return _run_evaluate(args, device, is_main())


def _run_evaluate(args: argparse.Namespace, device: str, main: bool) -> int:
    out = Path(args.out)
    state = _check_args(args, main)
    base, model = _load_model(args, device)
    config = checkpoint_config(args.checkpoint)
    name = data_name(args, config)
    data, indices, available = _load_data(args, name)
    check_data_fits(base, data, name, config, args.checkpoint, args)
    if args.data is None and main:
        notice("evaluate", f"--data {name} (the data set recorded in {args.checkpoint})")
    x, y = as_xy(data)
    with _kept_on_write_error(state):
        report = _run(args, model, x, y, state, out, device, main)
    _describe_run(args, report, model, name, data, available, streamed=y is None)
    if not main:
        return 0
    with _kept_on_write_error(state, report):
        _write_outputs(args, report, out, name, indices)
    for w in report.warnings:
        print(f"meansparse evaluate: warning: {w}", file=sys.stderr)
    print(json.dumps({"clean_accuracy": report.clean_accuracy, "worst_case_accuracy": report.worst_case_accuracy,
                      "robust_accuracy": report.robust_accuracy, "warnings": len(report.warnings),
                      "report": str(out / "report.json")}))
    return 0


def evaluation_spec(args: argparse.Namespace, device: str) -> EvaluationSpec:
    """The :class:`~meansparse.evaluation.EvaluationSpec` of parsed ``evaluate`` arguments."""
    return EvaluationSpec(norm=args.norm, eps=args.eps, attacks=tuple(comma_list(args.attacks)),
                          attack_options=parse_options(args.option), mode=mode_of(args.individual),
                          ladder=_ladder(args), indicators=not args.no_indicators, sanity=args.sanity,
                          seed=args.seed, batch_size=args.batch_size, workers=args.workers, device=device,
                          path=args.path)


def _ladder(args: argparse.Namespace) -> Ladder | bool:
    """The spec's ``ladder`` from --single-rung / --ladder."""
    if args.single_rung:
        return False
    return Ladder(factors=args.ladder) if args.ladder else True


def _run(args: argparse.Namespace, model: Any, x: Any, y: Any, state: Path | None, out: Path, device: str,
         main: bool) -> Any:
    """The evaluation itself (``ms.evaluate``: the fast path when it pays off)."""
    return evaluate(model, x, y, evaluation_spec(args, device), state_path=state, progress=not args.no_progress,
                    adversarial_dir=out if args.save_adversarial else None,
                    announce=lambda d: main and print(f"meansparse evaluate: {d.description}: {d.reason}",
                                                      file=sys.stderr))


def _describe_run(args: argparse.Namespace, report: Any, model: Any, name: str, data: Any, available: int, *,
                  streamed: bool) -> None:
    """What the report says about the command: checkpoint, state, α, data set, split and sample."""
    report.metadata["command"] = {"checkpoint": str(args.checkpoint), "meansparse": args.meansparse,
                                  "alpha": args.alpha, "data": name, "split": args.split,
                                  "alphas": sorted({op.alpha_value for op in operators(model)})}
    if streamed:  # what the images went through matters
        report.metadata["command"]["preprocessing"] = resolve_preprocessing(args, args.checkpoint)
    report.metadata["data"] = {"name": name, "split": args.split, "n": len(data), "of": available,
                               "seed": args.seed}


def _write_outputs(args: argparse.Namespace, report: Any, out: Path, name: str, indices: list[int]) -> None:
    """report.json, report.md and, with --save-adversarial, the split indices in adversarial.json."""
    if args.save_adversarial:  # name the examples by their index in the split, as RobustBench does
        record = json.loads((out / ADVERSARIAL_INDEX).read_text())
        record.update(data=name, split=args.split, split_indices=indices)
        with writing(out / ADVERSARIAL_INDEX):
            (out / ADVERSARIAL_INDEX).write_text(json.dumps(record) + "\n")
    for file, text in (("report.json", report.to_json()), ("report.md", report.to_markdown())):
        with writing(out / file), atomic_path(out / file) as tmp:
            tmp.write_text(text + "\n")


@contextmanager
def _kept_on_write_error(state: Path | None, report: Any = None) -> Iterator[None]:
    """A failed write (a full disk) says what was kept: the resumable state (a rerun attacks nothing again),
    else the report saved in the temporary folder."""
    try:
        yield
    except WriteError as e:
        if state is not None:
            kept = (f"every attacked batch is kept in {state}: free space and rerun the same command (nothing is "
                    "attacked again)")
        elif report is not None:
            kept = _save_elsewhere(report)
        else:
            kept = "--no-resume kept nothing: rerun without it to keep each finished batch"
        raise WriteError(e.errno, f"{e.strerror}; {kept}") from e


def _save_elsewhere(report: Any) -> str:
    """The report written to the temporary folder instead; says where (or that this failed too)."""
    spare = Path(tempfile.gettempdir()) / f"meansparse-{os.getpid()}-report.json"
    try:
        with writing(spare):
            spare.write_text(report.to_json() + "\n")
    except WriteError as e:
        return f"writing the report to {spare} failed too ({e.strerror})"
    return f"the report is written to {spare} instead"
