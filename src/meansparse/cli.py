"""`meansparse` command line: train, calibrate, evaluate, sweep, demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from .evaluation.cli import FUSE_HELP, parse_eps, parse_options


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a (robust) model and write a safetensors checkpoint")
    p.add_argument("--model", default="resnet18", help="registry name (see `meansparse models`)")
    p.add_argument("--width", type=int, default=None, help="base width (ResNet-18: 64 = standard)")
    p.add_argument("--activation", default="gelu")
    p.add_argument("--data", default="cifar10-jpg", help="digits | cifar10-jpg | cifar10 | cifar100 | path")
    p.add_argument("--data-root", default=None)
    p.add_argument("--method", default="pgd", choices=["pgd", "trades", "fgsm-rs", "standard"])
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--steps", type=int, default=2, help="attack steps per training batch")
    p.add_argument("--step-size", type=float, default=None)
    p.add_argument("--trades-beta", type=float, default=6.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--schedule", default="cyclic", choices=["cyclic", "piecewise"])
    p.add_argument("--n-holdout", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--out", required=True, help="run folder (epoch checkpoints; best.safetensors/json)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"activation": args.activation}
    if args.width is not None:
        kwargs["width"] = args.width
    cfg = TrainConfig(model=args.model, model_kwargs=kwargs, dataset=args.data, data_root=args.data_root,
                      method=args.method, norm=args.norm, eps=args.eps, steps=args.steps,
                      step_size=args.step_size, trades_beta=args.trades_beta, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                      n_holdout=args.n_holdout, eval_n=args.eval_n, seed=args.seed)
    command = "meansparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    best = train(cfg, args.out, resume=not args.no_resume, command=command)
    print(json.dumps({"best_checkpoint": str(best)}))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered architectures")
    p.set_defaults(func=lambda a: print("\n".join(__import__("meansparse.models", fromlist=["x"]).list_models()))
                   or 0)


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits (embedded default) | cifar10-jpg | cifar10 | path")
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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the models run")
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", required=True, help="report directory")


def _pipeline_config(args: argparse.Namespace):
    from .pipeline import PipelineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PipelineConfig(data=args.data, data_root=args.data_root, model=args.model, eps=args.eps, norm=args.norm,
                         clean_budget=args.clean_budget, n_holdout=args.n_holdout,
                         n_sweep_robust=args.n_sweep_robust, n_test=args.n_test,
                         attack_options=parse_options(args.option) or None,
                         calibration_batches=args.calibration_batches,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                         train_epochs=args.train_epochs, device=args.device, fuse=args.fuse)
    if args.alphas:
        cfg.alphas = tuple(float(a) for a in args.alphas.split(","))
    if args.attacks:
        cfg.attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if args.sweep_attacks:
        cfg.sweep_attacks = tuple(a.strip() for a in args.sweep_attacks.split(",") if a.strip())
    return cfg


def _run_demo(args: argparse.Namespace) -> int:
    from .pipeline import run

    run(_pipeline_config(args), args.out)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .pipeline import run_sweep

    run_sweep(_pipeline_config(args), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meansparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_models(sub)
    demo = sub.add_parser("demo", help="the main job: calibrate, sweep α on held-out data, evaluate honestly")
    _add_pipeline_args(demo)
    demo.set_defaults(func=_run_demo)
    sweep = sub.add_parser("sweep", help="calibrate once and sweep α on held-out data (no test-set evaluation)")
    _add_pipeline_args(sweep)
    sweep.set_defaults(func=_run_sweep)
    from .calibration_cli import add_calibrate_parser

    add_calibrate_parser(sub)
    try:
        from .evaluation.cli import add_evaluate_parser
    except ImportError:  # evaluation extra not importable: the other commands still work
        pass
    else:
        add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input (ValueError, missing files) ends with a one-line message and exit code 2
    (``MEANSPARSE_DEBUG=1`` re-raises it with the traceback)."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MEANSPARSE_DEBUG"):
            raise
        print(f"meansparse {args.command}: error: {e}", file=sys.stderr)  # a sub-command is required
        return 2


if __name__ == "__main__":
    sys.exit(main())
