"""``meansparse demo`` and ``meansparse sweep``: the calibrate -> α sweep (-> honest evaluation) pipeline."""

from __future__ import annotations

import argparse

from ..pipeline import PipelineConfig, run, run_sweep
from .common import (
    FUSE_HELP,
    add_split_args,
    add_stream_args,
    add_threads_arg,
    comma_list,
    parse_eps,
    parse_options,
    resolve_preprocessing,
    set_threads,
)

__all__ = ["add_pipeline_args", "add_demo_parser", "add_sweep_parser", "pipeline_config", "run_demo",
           "run_sweep_command"]


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The options ``demo`` and ``sweep`` share (they run the same first half of the pipeline)."""
    p.add_argument("--data", default="digits",
                   help="digits (embedded default) | cifar10-jpg | cifar10 | path to an image folder or tar "
                        "archive ([split/]class/image; streamed)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default=None, help="checkpoint (safetensors + json); default: train on digits")
    p.add_argument("--eps", type=parse_eps, default=None, help="e.g. 8/255; default 8/255 (CIFAR), 0.1 (digits)")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--alphas", default=None, help="comma-separated α grid, default 0,0.05,...,0.4")
    p.add_argument("--clean-budget", type=float, default=0.005, help="max clean-accuracy drop (fraction)")
    p.add_argument("--n-holdout", type=int, default=300)
    p.add_argument("--n-sweep-robust", type=int, default=200)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--attacks", default=None,
                   help="comma-separated attacks for the before/after evaluation (default: "
                        "aa,bpda-apgd-ce,bpda-apgd-t,transfer,square)")
    p.add_argument("--sweep-attacks", default=None,
                   help="comma-separated attacks of the α sweep; the first is the plain one "
                        "(default apgd-ce,bpda-apgd-ce)")
    p.add_argument("--option", action="append", metavar="ATTACK.NAME=VALUE",
                   help="override an attack default, e.g. apgd-ce.steps=20 (repeatable)")
    p.add_argument("--calibration-batches", type=int, default=None)
    p.add_argument("--train-epochs", type=int, default=30, help="epochs of the embedded digits model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the models run")
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("--quiet", action="store_true")
    add_stream_args(p)
    add_split_args(p)
    p.add_argument("--out", required=True, help="report directory")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``demo`` sub-command."""
    p = subparsers.add_parser("demo", help="the main job: calibrate, sweep α on held-out data, evaluate honestly")
    add_pipeline_args(p)
    p.set_defaults(func=run_demo)
    return p


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``sweep`` sub-command."""
    p = subparsers.add_parser("sweep", help="calibrate once and sweep α on held-out data (no test-set evaluation)")
    add_pipeline_args(p)
    p.set_defaults(func=run_sweep_command)
    return p


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The :class:`~meansparse.pipeline.PipelineConfig` of parsed ``demo`` / ``sweep`` arguments."""
    set_threads(args.threads)
    cfg = PipelineConfig(data=args.data, data_root=args.data_root, model=args.model, eps=args.eps, norm=args.norm,
                         clean_budget=args.clean_budget, n_holdout=args.n_holdout,
                         n_sweep_robust=args.n_sweep_robust, n_test=args.n_test,
                         attack_options=parse_options(args.option) or None,
                         calibration_batches=args.calibration_batches,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                         train_epochs=args.train_epochs, device=args.device, fuse=args.fuse,
                         workers=args.workers, preprocessing=resolve_preprocessing(args, args.model),
                         train_split=args.train_split, test_split=args.test_split)
    if args.alphas:
        cfg.alphas = tuple(float(a) for a in args.alphas.split(","))
    if args.attacks:
        cfg.attacks = tuple(comma_list(args.attacks))
    if args.sweep_attacks:
        cfg.sweep_attacks = tuple(comma_list(args.sweep_attacks))
    return cfg


def run_demo(args: argparse.Namespace) -> int:
    """``meansparse demo``: the whole pipeline, report under ``args.out``."""
    run(pipeline_config(args), args.out)
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    """``meansparse sweep``: calibrate and sweep α, save the state with the chosen α under ``args.out``."""
    run_sweep(pipeline_config(args), args.out)
    return 0
