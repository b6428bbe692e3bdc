"""``meansparse train`` / ``meansparse finetune``: (adversarially) train a registered architecture, or
fine-tune an existing model, into a resumable run folder, with MeanSparse operators in the loop on request.

    meansparse train --model resnet18 --data cifar10-jpg --meansparse 0.3 --alpha-schedule linear:5 --out runs/ms
    meansparse finetune --model checkpoints/cifar10-resnet18-relu-pgd/best --data cifar10-jpg --epochs 10 \\
        --meansparse 0.3 --alpha-schedule linear:3 --out runs/ft-ms     # without --meansparse: the control
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from ..core import check_momentum
from ..models import checkpoint_paths, list_models, make_activation, read_config
from ..placement import parse_alpha_schedule
from ..training import TrainConfig, train
from ..zoo import parse_model_spec
from ..zoo.spec import SPEC_HELP
from .common import (
    HelpFormatter,
    add_model_spec_args,
    add_threads_arg,
    check_regexes,
    non_negative_float,
    parse_eps,
    positive_float,
    positive_int,
    preset_of,
    seed_int,
    set_threads,
    writable_dir,
)

__all__ = ["add_train_parser", "add_finetune_parser", "run_train", "run_finetune"]


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command."""
    p = subparsers.add_parser("train", help="train a (robust) model and write a safetensors checkpoint",
                              description=__doc__, formatter_class=HelpFormatter)
    p.set_defaults(func=run_train)
    p.add_argument("--model", default="resnet18", help="registry name (see `meansparse models`)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="base width (ResNet-18: 64 = standard; default: the architecture's own)")
    p.add_argument("--activation", default="gelu", help="activation of the network (relu, gelu, silu, ...)")
    p.add_argument("--data", default="cifar10-jpg", help="digits | cifar10-jpg | cifar10 | cifar100 | path")
    _add_run_args(p, epochs=10, lr=0.2, schedule="cyclic")
    return p


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``finetune`` sub-command."""
    p = subparsers.add_parser("finetune", help="fine-tune an existing (robust) model, with MeanSparse in the loop "
                              "(--meansparse) or without (the matched control)", description=__doc__,
                              formatter_class=HelpFormatter)
    p.set_defaults(func=run_finetune)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, help=f"the model: {SPEC_HELP}")
    add_model_spec_args(p)
    p.add_argument("--data", default=None, help="data set to fine-tune on (default: the one the checkpoint "
                   "records; cifar10-jpg for a robustbench: cifar10 model)")
    _add_run_args(p, epochs=5, lr=0.01, schedule="piecewise")
    return p


def _add_run_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, schedule: str) -> None:
    """The arguments ``train`` and ``finetune`` share: data, attack, optimisation, MeanSparse, run folder."""
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
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    p.add_argument("--schedule", default=schedule, choices=["cyclic", "piecewise"], help="learning-rate schedule")
    p.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    p.add_argument("--n-holdout", type=positive_int, default=1000,
                   help="held-out training images that choose the best epoch (at most a fifth of the split)")
    p.add_argument("--eval-n", type=positive_int, default=500, help="held-out images evaluated after each epoch")
    p.add_argument("--eval-steps", type=positive_int, default=10, help="attack steps of the held-out selection")
    p.add_argument("--selection", default=None, choices=["pgd", "worst"],
                   help="best epoch by held-out PGD accuracy, or by the worst case of APGD-CE, BPDA-APGD-CE and "
                        "sg-apgd-margin "
                        "(default: worst for finetune and for --meansparse, else pgd)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split, the initialisation and the batches")
    _add_meansparse_args(p)
    add_threads_arg(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run folder (epoch checkpoints; best.safetensors/json)")


def _add_meansparse_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MeanSparse in the loop")
    g.add_argument("--meansparse", type=non_negative_float, default=None, metavar="ALPHA",
                   help="operators before every activation, trained with this α (default: none)")
    g.add_argument("--alpha-schedule", default="constant",
                   help="α over training: constant, linear:EPOCHS or cosine:EPOCHS (warm-up from 0)")
    g.add_argument("--ms-momentum", default="0.1",
                   help="the statistics' exponential-filter momentum in (0, 1], or 'cumulative'")
    g.add_argument("--ms-statistics", default="running", choices=["running", "batch"],
                   help="what train mode sparsifies with: the running statistics or the batch's")
    g.add_argument("--band-gradient", default="exact", choices=["exact", "straight_through"],
                   help="the band's gradient in the training step (exact: zero inside the band)")
    g.add_argument("--inner-gradient", default="straight_through", choices=["exact", "straight_through", "surrogate"],
                   help="the band's gradient in the inner attack (exact shows the masking effect; surrogate: the "
                        "soft threshold's, as the sg-* attacks)")
    g.add_argument("--preset", default="auto",
                   choices=["auto", "dm_wrn", "rawrn", "swin", "convnext", "generic", "none"],
                   help="MeanSparse placement: auto (detected from robustbench / timm classes, else before every "
                        "activation), a family, or none (before every activation)")
    g.add_argument("--include", action="append", default=None,
                   help="site regex to keep (repeatable; default: every site)")
    g.add_argument("--exclude", action="append", default=None, help="site regex to drop (repeatable; default: none)")


def _momentum(text: str) -> float | None:
    if text == "cumulative":
        return None
    try:
        return check_momentum(float(text))
    except ValueError:
        raise ValueError(f"--ms-momentum must be a number in (0, 1] or 'cumulative', got {text!r}") from None


def _config(args: argparse.Namespace, **model: Any) -> TrainConfig:
    """The run's configuration, every argument checked (nothing loaded yet)."""
    check_regexes(args.include, "--include")
    check_regexes(args.exclude, "--exclude")
    kind, warmup = parse_alpha_schedule(args.alpha_schedule)
    if args.meansparse is None and (kind != "constant" or args.include or args.exclude):
        raise ValueError("--alpha-schedule, --include and --exclude need --meansparse ALPHA")
    selection = args.selection or ("worst" if args.meansparse is not None or "init" in model else "pgd")
    cfg = TrainConfig(**model, data_root=args.data_root, method=args.method, norm=args.norm, eps=args.eps,
                      steps=args.steps, step_size=args.step_size, trades_beta=args.trades_beta, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, augment=not args.no_augment,
                      n_holdout=args.n_holdout, eval_n=args.eval_n, eval_steps=args.eval_steps, seed=args.seed,
                      meansparse=args.meansparse, alpha_schedule=kind, alpha_warmup=warmup,
                      ms_momentum=_momentum(args.ms_momentum), ms_statistics=args.ms_statistics,
                      ms_gradient=args.band_gradient, inner_gradient=args.inner_gradient, preset=preset_of(args),
                      include=args.include or [], exclude=args.exclude or [], selection=selection)
    cfg.validate()
    writable_dir(args.out)
    return cfg


def _run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    command = "meansparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    best = train(cfg, args.out, resume=not args.no_resume, command=command, progress=not args.no_progress)
    print(json.dumps({"best_checkpoint": str(best)}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Train as ``args`` says; prints the best checkpoint's path as JSON."""
    set_threads(args.threads)
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}: registered are {', '.join(list_models())}")
    make_activation(args.activation)  # an unknown name fails now, not after loading the data
    kwargs = {"activation": args.activation}
    if args.width is not None:
        kwargs["width"] = args.width
    return _run(_config(args, model=args.model, model_kwargs=kwargs, dataset=args.data), args)


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the model ``args.model`` names; prints the best checkpoint's path as JSON."""
    set_threads(args.threads)
    spec = parse_model_spec(args.model)
    if spec.kind == "checkpoint" and not all(f.exists() for f in checkpoint_paths(spec.name)):
        raise ValueError(f"--model {args.model}: no checkpoint there (a .safetensors + .json pair written by "
                         f"`meansparse train`), and not a model spec ({SPEC_HELP})")
    options = {"dataset": args.dataset, "threat_model": args.threat_model, "pretrained": args.pretrained,
               "weights": args.weights}
    cfg = _config(args, model=str(spec), model_kwargs={}, dataset=_finetune_data(args, spec), init=args.model,
                  init_options=options)
    return _run(cfg, args)


def _finetune_data(args: argparse.Namespace, spec: Any) -> str:
    """``--data``, else what the checkpoint records (cifar10-jpg for a robustbench: cifar10 model)."""
    if args.data:
        return args.data
    if spec.kind == "checkpoint" and checkpoint_paths(spec.name)[1].exists():
        recorded = read_config(spec.name).get("dataset")
        if recorded:
            return str(recorded)
    if spec.kind == "robustbench" and args.dataset == "cifar10":
        return "cifar10-jpg"
    raise ValueError(f"{args.model} records no data set: pass --data (e.g. cifar10-jpg or digits)")
