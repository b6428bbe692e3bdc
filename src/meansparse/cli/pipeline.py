"""``meansparse demo`` and ``meansparse sweep``: the calibrate -> α sweep (-> honest evaluation) pipeline."""

from __future__ import annotations

import argparse
from typing import Any

from ..pipeline import HONEST_ATTACKS, PipelineConfig, run, run_sweep
from ..search import DEFAULT_SEARCH_ATTACKS
from ..zoo.spec import SPEC_HELP
from .common import (
    HelpFormatter,
    add_class_mismatch_arg,
    add_model_spec_args,
    add_path_args,
    add_preset_arg,
    add_split_args,
    add_stream_args,
    add_threads_arg,
    check_device,
    comma_list,
    parse_alphas,
    parse_eps,
    parse_options,
    positive_int,
    preset_of,
    resolve_preprocessing,
    seed_int,
    set_threads,
)

__all__ = ["add_pipeline_args", "add_demo_parser", "add_sweep_parser", "pipeline_config", "run_demo",
           "run_sweep_command"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1] (0.005 = half a point), got {text}")
    return value


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The options ``demo`` and ``sweep`` share (they run the same first half of the pipeline)."""
    p.add_argument("--data", default="digits",
                   help="digits (embedded default) | cifar10-jpg | cifar10 | path to an image folder or tar "
                        "archive ([split/]class/image; streamed)")
    p.add_argument("--data-root", default=None,
                   help="where the data set lives (default: the data set's own default location)")
    p.add_argument("--model", default=None, help=f"the model: {SPEC_HELP}; default: train a small CNN on digits")
    add_model_spec_args(p)
    add_preset_arg(p)
    p.add_argument("--eps", type=parse_eps, default=None, help="e.g. 8/255; default 8/255 (CIFAR), 0.1 (digits)")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model")
    p.add_argument("--alphas", default=None, help="comma-separated α grid, default 0,0.05,...,0.4")
    p.add_argument("--clean-budget", type=_fraction, default=0.005,
                   help="max clean-accuracy drop (fraction) for a feasible α")
    p.add_argument("--n-holdout", type=positive_int, default=300,
                   help="held-out training images the α sweep runs on (clean accuracy on all of them)")
    p.add_argument("--n-sweep-robust", type=positive_int, default=200,
                   help="robust accuracy of the α sweep on the first N held-out images")
    p.add_argument("--calibration-batches", type=positive_int, default=None,
                   help="calibrate on this many batches only (default: the whole fitting split)")
    p.add_argument("--train-epochs", type=positive_int, default=30, help="epochs of the embedded digits model")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size of calibration and attacks")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the splits, the test sample and the attacks")
    p.add_argument("--sweep-attacks", default=None,
                   help="comma-separated attacks of the α sweep; the first is the plain one "
                        f"(default {','.join(DEFAULT_SEARCH_ATTACKS)})")
    p.add_argument("--option", action="append", metavar="ATTACK.NAME=VALUE",
                   help="override an attack default, e.g. apgd-ce.steps=20 (repeatable; default: each attack's "
                        "standard budget)")
    add_threads_arg(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the models run")
    add_path_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    add_stream_args(p)
    add_class_mismatch_arg(p)
    add_split_args(p)
    p.add_argument("--out", required=True, help="report directory")


def _add_test_args(p: argparse.ArgumentParser, hidden: bool = False) -> None:
    """``--n-test`` and ``--attacks``: the before/after evaluation on the test split (``demo``; ``sweep``
    accepts them, ``hidden`` from its help, only to refuse them, since it never touches the test split)."""
    n_test = ("test images of the before/after evaluation (default: the whole test split: 450 digits, but 10,000 "
              "CIFAR-10 images; standard AutoAttack alone costs seconds per image on a CPU for the width-16 "
              "ResNet-18 (docs/benchmarks.md, 'Evaluation overhead'), so the default attacks on both models "
              "take days there; start with 500)")
    attacks = ("comma-separated attacks of the before/after evaluation, run on both models alike "
               f"(default: {','.join(HONEST_ATTACKS)})")
    p.add_argument("--n-test", type=positive_int, default=None, help=argparse.SUPPRESS if hidden else n_test)
    p.add_argument("--attacks", default=None, help=argparse.SUPPRESS if hidden else attacks)


def _add_pipeline_parser(subparsers: argparse._SubParsersAction, name: str, help: str,
                         func: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, formatter_class=HelpFormatter)
    add_pipeline_args(p)
    _add_test_args(p, hidden=name == "sweep")
    p.set_defaults(func=func)
    return p


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``demo`` sub-command."""
    return _add_pipeline_parser(subparsers, "demo", "the main job: calibrate, sweep α on held-out data, evaluate "
                                "honestly", run_demo)


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``sweep`` sub-command."""
    return _add_pipeline_parser(subparsers, "sweep", "calibrate once and sweep α on held-out data (no test-set "
                                "evaluation)", run_sweep_command)


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The :class:`~meansparse.pipeline.PipelineConfig` of parsed ``demo`` / ``sweep`` arguments."""
    set_threads(args.threads)
    check_device(args.device)
    cfg = PipelineConfig(data=args.data, data_root=args.data_root, model=args.model, eps=args.eps, norm=args.norm,
                         clean_budget=args.clean_budget, n_holdout=args.n_holdout,
                         n_sweep_robust=args.n_sweep_robust, n_test=args.n_test,
                         attack_options=parse_options(args.option) or None,
                         calibration_batches=args.calibration_batches,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                         train_epochs=args.train_epochs, device=args.device, path=args.path,
                         dataset=args.dataset, threat_model=args.threat_model, weights=args.weights,
                         pretrained=args.pretrained, preset=preset_of(args),
                         workers=args.workers, preprocessing=resolve_preprocessing(args, args.model),
                         train_split=args.train_split, test_split=args.test_split,
                         allow_class_mismatch=args.allow_class_mismatch)
    if args.alphas is not None:
        cfg.alphas = tuple(parse_alphas(args.alphas))
    if args.attacks is not None:
        cfg.attacks = tuple(comma_list(args.attacks))
    if args.sweep_attacks is not None:
        cfg.sweep_attacks = tuple(comma_list(args.sweep_attacks))
    return cfg


def run_demo(args: argparse.Namespace) -> int:
    """``meansparse demo``: the whole pipeline, report under ``args.out``."""
    run(pipeline_config(args), args.out)
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    """``meansparse sweep``: calibrate and sweep α, save the state with the chosen α under ``args.out``."""
    given = [flag for flag, value in (("--attacks", args.attacks), ("--n-test", args.n_test)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for demo's test-set "
                         "evaluation; sweep never touches the test split (the α sweep's attacks are "
                         "--sweep-attacks, its images --n-holdout / --n-sweep-robust)")
    run_sweep(pipeline_config(args), args.out)
    return 0
