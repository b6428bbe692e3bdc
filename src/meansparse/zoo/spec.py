"""Model specs: one string names any model the command line can load.

* a project checkpoint path (``checkpoints/cifar10-resnet18-gelu-pgd``, written by ``meansparse train``);
* ``robustbench:<id>`` with a data set (cifar10 / cifar100 / imagenet) and threat model (Linf / L2);
* ``timm:<name>`` (wrapped so it takes [0, 1] inputs);
* ``python:<file.py or module>:<callable>``: the user's own architecture, built by calling ``callable()``,
  with weights from a safetensors file, or a torch file read with ``weights_only=True`` only (a
  ``state_dict`` / ``model_state_dict`` entry inside is understood).

``pretrained=False`` builds random weights (nothing downloaded, for offline tests).  A bad spec raises one
ValueError naming what was wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import HASH_KEY, checkpoint_paths, read_config, state_dict_mismatch, weights_sha256
from ..models import load as load_checkpoint
from ..models import read_weights as read_checkpoint_weights
from ..serialization import load as load_state
from .imports import import_timm
from .loading import load as load_zoo

__all__ = ["ModelSpec", "parse_model_spec", "load_model_spec", "read_weights", "SPEC_HELP"]

KINDS = ("checkpoint", "robustbench", "timm", "python")
SPEC_HELP = ("checkpoint path | robustbench:<id> (with --dataset/--threat-model) | timm:<name> | "
             "python:<file.py or module>:<callable> (with --weights FILE)")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind`` (one of :data:`KINDS`) and what names the model within it."""

    kind: str
    name: str
    callable: str = ""  # python: the factory's name

    def __str__(self) -> str:
        if self.kind == "checkpoint":
            return self.name
        if self.kind == "python":
            return f"python:{self.name}:{self.callable}"
        return f"{self.kind}:{self.name}"


def parse_model_spec(text: str) -> ModelSpec:
    """Parse a model spec (see the module docstring); a ValueError names the problem."""
    text = str(text).strip()
    if not text:
        raise ValueError("empty model spec: give a checkpoint path, robustbench:<id>, timm:<name> or "
                         "python:<file>:<callable>")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("robustbench", "timm"):
        if not rest:
            raise ValueError(f"model spec {text!r} names no model after '{prefix}:'")
        return ModelSpec(prefix, rest)
    if sep and prefix == "python":
        source, sep2, factory = rest.rpartition(":")
        if not sep2 or not source or not factory.isidentifier():
            raise ValueError(f"model spec {text!r}: use python:<file.py or module>:<callable>, e.g. "
                             "python:my_models.py:build")
        return ModelSpec("python", source, factory)
    if sep and prefix.isidentifier() and len(prefix) > 1 and not Path(text).exists():
        raise ValueError(f"model spec {text!r}: unknown prefix {prefix!r}; use robustbench:, timm:, python: or a "
                         "checkpoint path")
    return ModelSpec("checkpoint", text)


def _import_factory(spec: ModelSpec) -> Any:
    source = spec.name
    if source.endswith(".py") or os.sep in source or "/" in source:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"model spec {spec}: file {source!r} does not exist")
        name = f"meansparse_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"model spec {spec}: cannot import {source!r} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as e:
            sys.modules.pop(name, None)
            raise ValueError(f"model spec {spec}: {source!r} is not valid Python (SyntaxError: {e.msg}, line "
                             f"{e.lineno})") from e
        except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import
            sys.modules.pop(name, None)
            raise ValueError(f"model spec {spec}: importing {source!r} fails ({type(e).__name__}: "
                             f"{_first_line(e)})") from e
    else:
        try:
            module = importlib.import_module(source)
        except SyntaxError as e:
            raise ValueError(f"model spec {spec}: module {source!r} is not valid Python (SyntaxError: {e.msg}, "
                             f"line {e.lineno})") from e
        except Exception as e:  # noqa: BLE001 - ImportError, or whatever the module raises at import
            raise ValueError(f"model spec {spec}: cannot import module {source!r} ({type(e).__name__}: "
                             f"{_first_line(e)})") from e
    factory = getattr(module, spec.callable, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec}: {source!r} has no callable {spec.callable!r}")
    return factory


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _build(spec: ModelSpec) -> nn.Module:
    """Call the ``python:`` factory without arguments; its failure (arguments it needs, an exception it
    raises, something else than a module) is a ValueError naming the spec."""
    factory = _import_factory(spec)
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ValueError(f"model spec {spec}: {spec.callable}() is called without arguments but {e}; wrap it in a "
                         "function that takes none") from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise ValueError(f"model spec {spec}: {spec.callable}() fails ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model spec {spec}: {spec.callable}() returned {type(model).__name__}, not an nn.Module")
    return model


def as_float32(model: nn.Module, spec: Any) -> nn.Module:
    """A model whose floating-point weights are float64 / float16 / bfloat16 is cast to float32 with a warning:
    the images, the attacks' arithmetic and the operators' statistics are float32."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        warnings.warn(f"{spec}: weights in {names}; cast to float32 (what meansparse computes in)", stacklevel=2)
        model = model.float()
    return model


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a torch file read with ``weights_only=True`` (never
    unpickling arbitrary objects); a ``state_dict`` / ``model_state_dict`` entry inside is used."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"weights file {str(path)!r} is a folder; give the weights file inside it")
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ValueError(f"weights file {str(path)!r} is not a valid safetensors file ({e})") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled objects are refused by weights_only
        raise ValueError(f"weights file {str(path)!r} cannot be read with weights_only=True (not a plain "
                         f"tensor file; convert it to safetensors): {str(e).splitlines()[0]}") from e
    for key in ("state_dict", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"weights file {str(path)!r} holds no state dict of tensors")
    return data


def _load_trained(path: str, device: str | torch.device) -> nn.Module:
    """A project checkpoint: a registry architecture, or a fine-tuned spec's (its ``init``, rebuilt without
    weights), with the MeanSparse operators a training run recorded beside it (``meansparse_state``)."""
    config = read_config(path)
    init = config.get("init")
    if isinstance(init, dict) and "spec" in init:
        options = {k: v for k, v in init.items() if k in ("dataset", "threat_model")}
        model = load_model_spec(init["spec"], pretrained=False, **options)
        weights_file, meta = checkpoint_paths(path)
        state = read_checkpoint_weights(weights_file)
        if config.get(HASH_KEY) is not None and weights_sha256(state) != config[HASH_KEY]:
            raise ValueError(f"{weights_file}: the weights' sha256 does not match the one recorded in {meta.name}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights_file} does not fit {init['spec']}: {state_dict_mismatch(e)}") from None
    else:
        model = load_checkpoint(path, device=str(device))
    if config.get("meansparse_state"):
        state_file = checkpoint_paths(path)[0].with_name(str(config["meansparse_state"]))
        model = load_state(model.to(device).eval(), state_file)
    return model


def load_model_spec(spec: str | ModelSpec, *, dataset: str = "cifar10", threat_model: str = "Linf",
                    weights: str | os.PathLike | None = None, pretrained: bool = True,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The model a spec names, in eval mode on ``device``, taking [0, 1] NCHW inputs.  ``pretrained=False``
    draws its random weights from a fixed seed, so two commands (calibrate, then evaluate) see the same model."""
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if not pretrained:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _load(spec, dataset, threat_model, weights, pretrained, device)
    return _load(spec, dataset, threat_model, weights, pretrained, device)


def _load(spec: ModelSpec, dataset: str, threat_model: str, weights: str | os.PathLike | None, pretrained: bool,
          device: str | torch.device) -> nn.Module:
    if weights is not None and spec.kind != "python":
        raise ValueError(f"--weights applies to python: model specs, not to {spec}")
    if spec.kind == "checkpoint":
        weights_file, meta = checkpoint_paths(spec.name)
        if not (weights_file.exists() and meta.exists()):
            raise ValueError(f"model {spec.name!r}: no checkpoint {weights_file} + {meta.name}; use a path written "
                             f"by `meansparse train` or a spec ({SPEC_HELP})")
        model = _load_trained(spec.name, device)
    elif spec.kind in ("robustbench", "timm"):
        if spec.kind == "timm" and not import_timm().is_model(spec.name):
            raise ValueError(f"model spec {spec}: timm has no model {spec.name!r}")
        try:
            model = load_zoo(spec.name, dataset, threat_model, source=spec.kind, pretrained=pretrained,
                             device=str(device))
        except KeyError as e:  # robustbench: unknown id / data set / threat model, with the known ones
            raise ValueError(f"model spec {spec}: {e.args[0] if e.args else e}") from e
    else:
        model = _build(spec)
        if weights is not None:
            state = read_weights(weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"weights {str(weights)!r} do not fit {spec}: {state_dict_mismatch(e)}") from None
        elif pretrained:
            raise ValueError(f"model spec {spec} needs --weights FILE (or --pretrained false for random weights)")
    return as_float32(model, spec).to(device).eval()
