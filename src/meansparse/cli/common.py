"""Argument types and options that several ``meansparse`` sub-commands share, defined once so that the same
option reads and behaves the same in every command."""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from typing import Any

import torch

from ..zoo.spec import SPEC_HELP, load_model_spec

__all__ = [
    "FUSE_HELP",
    "add_fuse_args",
    "parse_eps",
    "parse_options",
    "comma_list",
    "add_checkpoint_arg",
    "add_model_spec_args",
    "add_preset_arg",
    "preset_of",
    "load_model_arg",
    "parse_bool",
    "add_data_args",
    "add_device_arg",
    "add_threads_arg",
    "set_threads",
]

#: ``--fuse`` of ``evaluate``, ``demo`` and ``sweep``
FUSE_HELP = "fuse each operator with its activation (and BN/add producer): same numbers, faster on CPU"


def add_fuse_args(p: argparse.ArgumentParser) -> None:
    """``--fuse`` / ``--no-fuse``; neither: fused when that pays off (meansparse.accel.auto)."""
    p.add_argument("--fuse", dest="fuse", action="store_true", default=None,
                   help=FUSE_HELP + " (default: when torch.compile works and the job is long enough to pay for "
                                    "compiling; the report says which ran and why)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="always run the eager operator")


def parse_eps(text: str) -> float:
    """'8/255', '0.031' or '2e-2' -> float (fractions keep the usual CIFAR notation exact)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"bad eps {text!r}: use a number or a fraction such as 8/255") from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"eps must be > 0, got {text}")
    return value


def parse_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """['apgd-ce.steps=20', 'adaptive.lam=10'] -> {'apgd-ce': {'steps': 20}, 'adaptive': {'lam': 10}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        attack, dot, option = key.rpartition(".")
        if not sep or not dot or not attack or not option:
            raise ValueError(f"bad --option {item!r}: use ATTACK.NAME=VALUE, e.g. apgd-ce.steps=20")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(attack, {})[option] = value
    return out


def comma_list(text: str) -> list[str]:
    """'apgd-ce, square,' -> ['apgd-ce', 'square'] (blanks dropped)."""
    return [a.strip() for a in text.split(",") if a.strip()]


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (alias ``--model``): a model spec (:mod:`meansparse.zoo.spec`), and its options."""
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, help=f"the model: {SPEC_HELP}")
    add_model_spec_args(p)


def parse_bool(text: str) -> bool:
    """'true'/'false' (also yes/no, 1/0) for options such as ``--pretrained false``."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


PRESET_CHOICES = ("auto", "dm_wrn", "rawrn", "swin", "convnext", "generic", "none")


def add_model_spec_args(p: argparse.ArgumentParser) -> None:
    """What a model spec may need: the RobustBench data set and threat model, weights of a ``python:`` model,
    random weights for offline runs."""
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "imagenet"],
                   help="RobustBench data set of a robustbench: model (default cifar10)")
    p.add_argument("--threat-model", default="Linf", choices=["Linf", "L2", "corruptions"],
                   help="RobustBench threat model of a robustbench: model (default Linf)")
    p.add_argument("--weights", default=None,
                   help="weights of a python: model: safetensors, or a torch file read with weights_only=True "
                        "(a state_dict / model_state_dict entry is understood)")
    p.add_argument("--pretrained", type=parse_bool, default=True,
                   help="false: random weights for robustbench:/timm:/python: models, nothing downloaded "
                        "(default true)")


def add_preset_arg(p: argparse.ArgumentParser) -> None:
    """``--preset``: the placement ``prepare`` uses (see meansparse.placement.presets)."""
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                   help="MeanSparse placement: auto (detected from robustbench / timm classes, else before every "
                        "activation), a family, or none (before every activation) (default auto)")


def preset_of(args: argparse.Namespace) -> str | None:
    """The ``preset=`` argument of ``prepare`` for ``--preset`` (None for "none")."""
    preset = getattr(args, "preset", "none")
    return None if preset == "none" else preset


def load_model_arg(args: argparse.Namespace, spec: str, device: str | torch.device) -> Any:
    """The model ``spec`` names, with the spec options in ``args`` (see :func:`add_model_spec_args`)."""
    return load_model_spec(spec, dataset=args.dataset, threat_model=args.threat_model, weights=args.weights,
                           pretrained=args.pretrained, device=device)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data`` (default digits) and ``--data-root``, as :func:`meansparse.data.load_dataset` takes them."""
    p.add_argument("--data", default="digits", help="data set name or path (see meansparse.data.load_dataset)")
    p.add_argument("--data-root", default=None)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` defaulting to CUDA when available (the per-rank device under torchrun)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (torch CPU threads); None or 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the run (default: torch's own choice)."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
