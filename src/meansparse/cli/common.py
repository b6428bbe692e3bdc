"""Argument types and options that several ``meansparse`` sub-commands share, defined once so that the same
option reads and behaves the same in every command."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .._utils import resolve_device
from .._utils import writable_dir as _writable_dir
from ..data import first_images
from ..evaluation import PATHS, check_attack_names
from ..evaluation.validation import check_options_used
from ..models import CLASS_ADVICE, check_input_shape, checkpoint_paths, class_mismatch, probe_model, read_config
from ..zoo.spec import SPEC_HELP, load_model_spec

__all__ = [
    "PATH_HELP",
    "HelpFormatter",
    "add_path_args",
    "parse_eps",
    "parse_options",
    "positive_int",
    "positive_float",
    "non_negative_float",
    "seed_int",
    "non_negative_int",
    "comma_list",
    "parse_alphas",
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
    "check_attacks",
    "check_device",
    "check_regexes",
    "writable_dir",
    "writable_file",
    "input_paths",
    "check_not_input",
    "clamp_count",
    "check_data_fits",
    "check_classes",
    "add_class_mismatch_arg",
    "checkpoint_config",
    "notice",
    "data_name",
    "command_parser",
    "PREPROCESSING_CHOICES",
    "add_stream_args",
    "add_split_args",
    "resolve_preprocessing",
    "open_data",
    "data_loader",
]

#: ``--path`` of ``evaluate``, ``demo`` and ``sweep``: how the model runs (``EvaluationSpec.path``)
PATH_HELP = ("execution path: auto (fused kernels on the CPU, the whole model compiled on CUDA, when torch.compile "
             "works and the job is long enough to pay for compiling; the report says which ran and why), eager "
             "(the operator as written), fused (each operator fused with its activation and BN/add producer: same "
             "numbers, faster on the CPU) or compiled (the whole model under one torch.compile: numbers agree to "
             "float rounding)")


def add_path_args(p: argparse.ArgumentParser) -> None:
    """``--path auto|eager|fused|compiled`` (default auto), with ``--fuse`` (= ``--path fused``) and
    ``--no-fuse`` (= ``--path eager``) kept as its aliases; the parsed value is ``args.path``."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--path", dest="path", choices=PATHS, default="auto", help=PATH_HELP)
    group.add_argument("--fuse", dest="path", action="store_const", const="fused", help="same as --path fused")
    group.add_argument("--no-fuse", dest="path", action="store_const", const="eager", help="same as --path eager")


def parse_eps(text: str) -> float:
    """'8/255', '0.031' or '2e-2' -> float (fractions keep the usual CIFAR notation exact)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"bad eps {text!r}: use a number or a fraction such as 8/255") from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"eps must be > 0, got {text}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default (unless the help already says
    what the default is, or the option is a flag or required)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or any(action.default is v for v in (None, False))
                or action.default == argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (``--workers``, ``--holdout``)."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (counts, sizes, steps); '-5' or '0' is an error, never 'all but 5'."""
    return _int_at_least(text, 1, "a positive integer")


#: seeds torch.Generator.manual_seed takes without overflow, whatever the platform
SEED_LIMIT = 2**63


def seed_int(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**63) (a larger one overflows torch's generator)."""
    value = _int_at_least(text, 0, "an integer >= 0")
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**63 = {SEED_LIMIT}, got {text}")
    return value


def _float_at_least(text: str, low: float, strict: bool) -> float:
    """A finite float above ``low`` (``strict``) or at least ``low``, or argparse's error naming the bound."""
    bound = f"a number {'>' if strict else '>='} {low:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}") from None
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise argparse.ArgumentTypeError(f"must be a finite {bound.removeprefix('a ')}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate: nan or inf would train nothing, silently)."""
    return _float_at_least(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a loss weight)."""
    return _float_at_least(text, 0.0, strict=False)


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


def parse_alphas(text: str) -> list[float]:
    """'0,0.1, 0.2' -> [0.0, 0.1, 0.2]; every α must be a finite number >= 0."""
    values = []
    for item in comma_list(text):
        try:
            a = float(item)
        except ValueError:
            raise ValueError(f"bad --alphas entry {item!r}: use comma-separated numbers >= 0, "
                             "e.g. 0,0.1,0.2") from None
        if not math.isfinite(a) or a < 0:
            raise ValueError(f"bad --alphas entry {item!r}: every α must be a finite number >= 0")
        values.append(a)
    if not values:
        raise ValueError(f"--alphas {text!r} holds no value: use comma-separated numbers >= 0, e.g. 0,0.1,0.2")
    return values


def check_attacks(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None, *, norm: str = "Linf",
                  eps: float = 8 / 255, flag: str = "--attacks") -> None:
    """Every attack name and ``--option`` checked now (nothing runs; see
    :func:`meansparse.evaluation.check_attack_names`), before any data is loaded or any model trained."""
    check_attack_names(names, options, norm=norm, eps=eps, what=flag)
    check_options_used(options, list(names), flag)


def check_device(name: str | None) -> str | None:
    """``--device`` checked now (a bad name, or CUDA on a machine without it, is a one-line error)."""
    if name is not None:
        resolve_device(name)
    return name


def check_regexes(patterns: Sequence[str] | None, flag: str) -> None:
    """Every pattern compiles (``--include`` / ``--exclude``)."""
    for p in patterns or ():
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad {flag} regular expression {p!r}: {e}") from None


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder and prove it writable with a probe write, before any work starts."""
    return _writable_dir(path, f"{flag} folder")


def writable_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file that can be written at the end: not a folder, its folder creatable and writable, the
    file itself writable if it exists."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give a file name, e.g. {out / 'meansparse.safetensors'}")
    _writable_dir(out.parent, f"the folder of {flag}")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag} {out} exists and is not writable")
    return out


def input_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The files a command reads, by the option that names them: the checkpoint's weights and JSON (or a
    ``python:`` model's source file), ``--weights``, ``--meansparse`` and a ``--data`` / ``--data-root`` path."""
    from ..zoo.spec import parse_model_spec

    found: dict[str, Path] = {}
    spec_text = getattr(args, "checkpoint", None) or getattr(args, "model", None)
    if spec_text:
        try:
            spec = parse_model_spec(spec_text)
        except ValueError:
            spec = None
        if spec is not None and spec.kind == "checkpoint":
            weights, config = checkpoint_paths(spec.name)
            found.update({"--model (weights)": weights, "--model (config)": config})
        elif spec is not None and spec.kind == "python":
            found["--model (source)"] = Path(spec.name)
    for flag in ("weights", "meansparse", "data", "data_root"):
        value = getattr(args, flag, None)
        if value and Path(value).exists():
            found["--" + flag.replace("_", "-")] = Path(value)
    return found


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file (a link or another spelling included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_not_input(out: str | os.PathLike, args: argparse.Namespace, flag: str = "--out") -> None:
    """A ValueError when an output path is a file the command reads: writing it would overwrite
    the model's weights, the data or the state the command loads."""
    for source, path in input_paths(args).items():
        if _same(Path(out), path):
            raise ValueError(f"{flag} {out} is {source} {path}, an input of this command: writing it would "
                             "overwrite it; choose another path")


def notice(command: str, text: str) -> None:
    """One informational line on stderr (not an error): ``meansparse <command>: note: ...``."""
    print(f"meansparse {command}: note: {text}", file=sys.stderr)


def clamp_count(n: int | None, available: int, flag: str, what: str, command: str, say: bool = True) -> int | None:
    """``n`` (None = all); larger than ``available`` is clamped to it with a notice (when ``say``)."""
    if n is not None and n > available:
        if say:
            notice(command, f"{flag} {n} is more than the {available} images in {what}; using all {available}")
        return available
    return n


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a checkpoint (its data set, input shape ...), or {} for a model that has none."""
    return read_config(path) if checkpoint_paths(path)[1].exists() else {}


#: the classes of a robustbench:<id> model by its --dataset, where RobustBench's order is known by name
KNOWN_CLASSES = {"cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]}


def check_data_fits(model: torch.nn.Module, data: Any, data_name: str, config: Mapping[str, Any] | None,
                    checkpoint: str | os.PathLike, args: argparse.Namespace | None = None) -> None:
    """The images of ``--data`` (in memory or streamed: its first images) fit the model (see
    :func:`meansparse.models.check_input_shape`), the model runs on them and gives the same logits twice, and
    the data's classes are the model's (:func:`check_classes`)."""
    x = first_images(data, 2)
    check_input_shape(model, config, tuple(x.shape[1:]), f"--data {data_name}", str(checkpoint))
    logits = probe_model(model, x, str(checkpoint), f"--data {data_name}")
    if args is not None:
        check_classes(data, data_name, logits, config, args)


def check_classes(data: Any, data_name: str, logits: int, config: Mapping[str, Any] | None,
                  args: argparse.Namespace) -> None:
    """The data's classes are the model's (:func:`meansparse.models.class_mismatch`; a robustbench CIFAR-10
    model's classes are known): an error, or with ``--allow-class-mismatch`` a warning naming both sides."""
    recorded = (config or {}).get("classes")
    if recorded is None and str(args.checkpoint).startswith("robustbench:"):
        recorded = KNOWN_CLASSES.get(getattr(args, "dataset", ""))
    problem = class_mismatch(data, f"--data {data_name}", logits, recorded, str(args.checkpoint))
    if problem is None:
        return
    if getattr(args, "allow_class_mismatch", False):
        warnings.warn(f"{problem}; labels are class positions, so scores may be against the wrong logits "
                      "(--allow-class-mismatch)", stacklevel=2)
        return
    raise ValueError(f"{problem}: {CLASS_ADVICE}, or pass --allow-class-mismatch to go on with a warning")


def add_class_mismatch_arg(p: argparse.ArgumentParser) -> None:
    """``--allow-class-mismatch``: classes of --data that are not the model's warn instead of failing."""
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="go on (with a warning naming both sides) when --data's classes differ from the model's "
                        "(their number of logits, or the classes its checkpoint recorded)")


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
                        "(a state_dict / model_state_dict entry is understood; default: none)")
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
    """``--data`` (default: the data set recorded in the checkpoint) and ``--data-root``, as
    :func:`meansparse.data.load_dataset` takes them."""
    p.add_argument("--data", default=None,
                   help="data set name or path (see meansparse.data.load_dataset); default: the data set recorded "
                        "in the checkpoint")
    p.add_argument("--data-root", default=None,
                   help="where the data set lives (a .tar.gz or folder; default: the data set's own default, "
                        "e.g. $MEANSPARSE_CIFAR10_JPG or ../shared/data for cifar10-jpg)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` defaulting to CUDA when available (the per-rank device under torchrun)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available, else cpu)")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (torch CPU threads); None keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the run (default: torch's own choice)."""
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own choice)")


#: ``--preprocessing``: RobustBench's names (robustbench.data.PREPROCESSINGS), "none" and "auto"
PREPROCESSING_CHOICES = ("auto", "none", "Res256Crop224", "BicubicRes256Crop224", "Crop288", "Res224")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """``--workers N`` and ``--preprocessing NAME``: how a ``--data PATH`` (an image folder or a tar archive,
    streamed one image at a time) is decoded.  The named data sets are in memory and ignore ``--workers``."""
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes decoding a streamed --data PATH (default 0: in the main "
                        "process)")
    p.add_argument("--preprocessing", default="auto", choices=PREPROCESSING_CHOICES,
                   help="RobustBench preprocessing of a streamed --data PATH. auto (default): RobustBench's own "
                        "choice for a robustbench:<id> model, else the checkpoint's recorded 'preprocessing', else "
                        "none = ToTensor only, right for 32x32 CIFAR-style "
                        "images; an ImageNet model needs its own (ms.zoo.preprocessing(name, 'imagenet'), e.g. "
                        "BicubicRes256Crop224)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    """``--train-split`` / ``--test-split`` of ``demo`` and ``sweep`` (an ImageNet tree's test split is val)."""
    p.add_argument("--train-split", default="train", help="split of a --data PATH to calibrate and sweep on")
    p.add_argument("--test-split", default="test", help="split of a --data PATH to evaluate on (e.g. val)")


def resolve_preprocessing(args: argparse.Namespace, checkpoint: str | None = None) -> Any:
    """The preprocessing ``--preprocessing`` asks for: ``auto`` is, for a streamed path, RobustBench's own
    choice for a ``robustbench:<id>`` model (what RobustBench feeds it), else the checkpoint config's
    ``preprocessing`` field, else None (``ToTensor`` only)."""
    value = getattr(args, "preprocessing", "auto") or "auto"
    if value == "none":
        return None
    if value != "auto":
        return value
    from ..data import DATASETS

    if checkpoint is None or getattr(args, "data", None) in DATASETS:
        return None
    if str(checkpoint).startswith("robustbench:"):
        from ..zoo import preprocessing

        return preprocessing(str(checkpoint).removeprefix("robustbench:"), getattr(args, "dataset", "cifar10"),
                             getattr(args, "threat_model", "Linf"))
    from ..models import read_config

    try:
        recorded = read_config(checkpoint).get("preprocessing")
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, str) else None


def open_data(args: argparse.Namespace, split: str, checkpoint: str | None = None, name: str | None = None) -> Any:
    """``--data`` (or ``name``) for ``split``: a named data set in memory, or a path streamed with
    ``--preprocessing``."""
    from ..data import open_dataset

    return open_dataset(name or args.data, split, root=args.data_root,
                        preprocessing=resolve_preprocessing(args, checkpoint))


def data_loader(args: argparse.Namespace, data: Any, batch_size: int) -> Any:
    """Batches of ``data`` for calibration: in memory as before, a stream through ``--workers`` processes."""
    from ..data import loader

    return loader(data, batch_size, getattr(args, "workers", 0) or 0)


def data_name(args: argparse.Namespace, config: dict[str, Any]) -> str:
    """``--data``, else the data set recorded in the checkpoint (CIFAR-10 for a robustbench:<id> of
    ``--dataset cifar10``); a ValueError if there is neither."""
    if args.data:
        return args.data
    recorded = config.get("dataset")
    if not recorded and str(args.checkpoint).startswith("robustbench:") and args.dataset == "cifar10":
        recorded = "cifar10-jpg"
    if not recorded:
        raise ValueError(f"{args.checkpoint} records no data set: pass --data (e.g. cifar10-jpg or digits)")
    return str(recorded)


def command_parser(subparsers: argparse._SubParsersAction, name: str, doc: str | None, help: str
                   ) -> argparse.ArgumentParser:
    """A sub-command's parser: one-line ``help``, the module's docstring as description, defaults shown."""
    return subparsers.add_parser(name, help=help, description=doc, formatter_class=HelpFormatter)
