"""Argument types and options that several ``meansparse`` sub-commands share, defined once so that the same
option reads and behaves the same in every command."""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from typing import Any

import torch

__all__ = [
    "FUSE_HELP",
    "parse_eps",
    "parse_options",
    "comma_list",
    "add_checkpoint_arg",
    "add_data_args",
    "add_device_arg",
    "add_threads_arg",
    "set_threads",
    "PREPROCESSING_CHOICES",
    "add_stream_args",
    "add_split_args",
    "resolve_preprocessing",
    "open_data",
    "data_loader",
    "as_xy",
]

#: ``--fuse`` of ``evaluate``, ``demo`` and ``sweep``
FUSE_HELP = "fuse each operator with its activation (and BN/add producer): same numbers, faster on CPU"


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
    """``--checkpoint`` (alias ``--model``): a checkpoint written by ``meansparse train``."""
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="model checkpoint written by `meansparse train` (.safetensors + .json)")


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


#: ``--preprocessing``: RobustBench's names (robustbench.data.PREPROCESSINGS), "none" and "auto"
PREPROCESSING_CHOICES = ("auto", "none", "Res256Crop224", "BicubicRes256Crop224", "Crop288", "Res224")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """``--workers N`` and ``--preprocessing NAME``: how a ``--data PATH`` (an image folder or a tar archive,
    streamed one image at a time) is decoded.  The named data sets are in memory and ignore ``--workers``."""
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding a streamed --data PATH (0: in the main process)")
    p.add_argument("--preprocessing", default="auto", choices=PREPROCESSING_CHOICES,
                   help="RobustBench preprocessing of a streamed --data PATH. auto (default): the checkpoint's "
                        "recorded 'preprocessing', else none = ToTensor only, right for 32x32 CIFAR-style "
                        "images; an ImageNet model needs its own (ms.zoo.preprocessing(name, 'imagenet'), e.g. "
                        "BicubicRes256Crop224)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    """``--train-split`` / ``--test-split`` of ``demo`` and ``sweep`` (an ImageNet tree's test split is val)."""
    p.add_argument("--train-split", default="train", help="split of a --data PATH to calibrate and sweep on")
    p.add_argument("--test-split", default="test", help="split of a --data PATH to evaluate on (e.g. val)")


def resolve_preprocessing(args: argparse.Namespace, checkpoint: str | None = None) -> str | None:
    """The preprocessing name ``--preprocessing`` asks for: ``auto`` is the checkpoint config's
    ``preprocessing`` field for a streamed path, else None (``ToTensor`` only)."""
    value = getattr(args, "preprocessing", "auto") or "auto"
    if value == "none":
        return None
    if value != "auto":
        return value
    from ..data import DATASETS

    if checkpoint is None or getattr(args, "data", None) in DATASETS:
        return None
    from ..models import read_config

    try:
        recorded = read_config(checkpoint).get("preprocessing")
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, str) else None


def open_data(args: argparse.Namespace, split: str, checkpoint: str | None = None) -> Any:
    """``--data`` for ``split``: a named data set in memory, or a path streamed with ``--preprocessing``."""
    from ..data import open_dataset

    return open_dataset(args.data, split, root=args.data_root, preprocessing=resolve_preprocessing(args, checkpoint))


def data_loader(args: argparse.Namespace, data: Any, batch_size: int) -> Any:
    """Batches of ``data`` for calibration: in memory as before, a stream through ``--workers`` processes."""
    from ..data import loader

    return loader(data, batch_size, getattr(args, "workers", 0) or 0)


def as_xy(data: Any) -> tuple[Any, Any]:
    """``evaluate``'s ``x, y``: float images and labels of an in-memory set, or the stream itself and None."""
    from ..data import ImageSet

    return (data.float(), data.labels) if isinstance(data, ImageSet) else (data, None)
