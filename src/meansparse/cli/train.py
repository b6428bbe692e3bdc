"""``meansparse train``: (adversarially) train a registered architecture into a resumable run folder."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..models import list_models, make_activation
from ..training import TrainConfig, train
from .common import (
    HelpFormatter,
    add_threads_arg,
    non_negative_float,
    parse_eps,
    positive_float,
    positive_int,
    seed_int,
    set_threads,
    writable_dir,
)

__all__ = ["add_train_parser", "run_train"]


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command."""
    p = subparsers.add_parser("train", help="train a (robust) model and write a safetensors checkpoint",
                              formatter_class=HelpFormatter)
    p.set_defaults(func=run_train)
    p.add_argument("--model", default="resnet18", help="registry name (see `meansparse models`)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="base width (ResNet-18: 64 = standard; default: the architecture's own)")
    p.add_argument("--activation", default="gelu", help="activation of the network (relu, gelu, silu, ...)")
    p.add_argument("--data", default="cifar10-jpg", help="digits | cifar10-jpg | cifar10 | cifar100 | path")
    p.add_argument("--data-root", default=None,
                   help="where the data set lives (default: the data set's own default location)")
    p.add_argument("--method", default="pgd", choices=["pgd", "trades", "fgsm-rs", "standard"],
                   help="training method")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model of adversarial training")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="attack budget while training; default 8/255")
    p.add_argument("--steps", type=positive_int, default=2, help="attack steps per training batch")
    p.add_argument("--step-size", type=parse_eps, default=None,
                   help="attack step size (default: 2.5·eps/steps for PGD, eps/4 for TRADES, 1.25·eps for FGSM-RS)")
    p.add_argument("--trades-beta", type=non_negative_float, default=6.0, help="TRADES' weight of the robust loss")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=0.2, help="peak learning rate")
    p.add_argument("--schedule", default="cyclic", choices=["cyclic", "piecewise"], help="learning-rate schedule")
    p.add_argument("--n-holdout", type=positive_int, default=1000,
                   help="held-out training images that choose the best epoch (at most a fifth of the split)")
    p.add_argument("--eval-n", type=positive_int, default=500, help="held-out images evaluated after each epoch")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split, the initialisation and the batches")
    add_threads_arg(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    p.add_argument("--out", required=True, help="run folder (epoch checkpoints; best.safetensors/json)")
    return p


def run_train(args: argparse.Namespace) -> int:
    """Train as ``args`` says; prints the best checkpoint's path as JSON."""
    set_threads(args.threads)
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}: registered are {', '.join(list_models())}")
    make_activation(args.activation)  # an unknown name fails now, not after loading the data
    writable_dir(args.out)
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
