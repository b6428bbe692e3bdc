"""``meansparse train``: (adversarially) train a registered architecture into a resumable run folder."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..training import TrainConfig, train
from .common import add_threads_arg, set_threads

__all__ = ["add_train_parser", "run_train"]


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command."""
    p = subparsers.add_parser("train", help="train a (robust) model and write a safetensors checkpoint")
    p.set_defaults(func=run_train)
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
    add_threads_arg(p)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--out", required=True, help="run folder (epoch checkpoints; best.safetensors/json)")
    return p


def run_train(args: argparse.Namespace) -> int:
    """Train as ``args`` says; prints the best checkpoint's path as JSON."""
    set_threads(args.threads)
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
