"""``meansparse.zoo.load``: RobustBench ids, timm names and meansparse checkpoints as [0, 1]-input models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..models import Normalized, checkpoint_paths
from ..models import load as load_checkpoint
from .imports import import_robustbench, import_timm
from .reference import import_reference, reference_family

__all__ = ["load"]


def _default_model_dir() -> Path:
    root = Path(os.environ.get("MEANSPARSE_CACHE", Path.home() / ".cache" / "meansparse"))
    return root / "robustbench"


def _is_checkpoint(name: str) -> bool:
    if not name or any(c in name for c in "\n\0"):
        return False
    weights, meta = checkpoint_paths(name)
    return weights.exists() and meta.exists()


def _robustbench_entry(name: str, dataset: str, threat_model: str) -> dict:
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (KeyError, ValueError):
        known = {f"{d.value} {t.value}" for d, by_threat in model_dicts.items() for t in by_threat}
        raise KeyError(
            f"robustbench has no {dataset} {threat_model} models; known: {', '.join(sorted(known))}"
        ) from None
    if name not in models:
        close = [k for k in models if name.split("_")[0].lower() in k.lower()][:5]
        raise KeyError(
            f"{name!r} is not a robustbench {dataset} {threat_model} model" + (f"; similar: {close}" if close else "")
        )
    return models[name]


def _load_robustbench(
    name: str, dataset: str, threat_model: str, pretrained: bool, model_dir: str | os.PathLike | None
) -> nn.Module:
    entry = _robustbench_entry(name, dataset, threat_model)
    if not pretrained:  # the architecture only (random weights), as robustbench builds it before loading
        model = entry["model"]().eval()
    else:
        from robustbench.utils import load_model

        directory = Path(model_dir) if model_dir is not None else _default_model_dir()
        model = load_model(model_name=name, model_dir=str(directory), dataset=dataset, threat_model=threat_model)
    # the authors' own MeanSparse models (Amini2024MeanSparse_*): their operators become ours
    return import_reference(model.eval()) if reference_family(model) is not None else model.eval()


def _load_timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    timm = import_timm()
    net = timm.create_model(name, pretrained=pretrained, **kwargs)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        raise ValueError(f"timm model {name!r} has no mean/std in its pretrained_cfg; wrap it yourself")
    return Normalized(net, tuple(float(v) for v in mean), tuple(float(v) for v in std)).eval()


def load(
    name: str | os.PathLike,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    *,
    source: str = "auto",
    pretrained: bool = True,
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """A zoo model in eval mode taking [0, 1] inputs, ready for ``meansparse.prepare(model, preset="auto")``.

    ``source``: ``"robustbench"`` (``name`` is a RobustBench id for ``dataset`` = cifar10 / cifar100 /
    imagenet and ``threat_model`` = Linf / L2 / corruptions; weights cached under ``model_dir``, default
    ``$MEANSPARSE_CACHE/robustbench``), ``"timm"`` (``timm.create_model(name, pretrained=..., **kwargs)``
    wrapped with the model's input normalization), ``"checkpoint"`` (a :func:`meansparse.models.load`
    path), or ``"auto"``: a checkpoint if the path exists, a timm model if timm knows the name, else
    RobustBench.  ``pretrained=False`` builds the architecture with random weights and downloads nothing.
    The authors' own MeanSparse models (``Amini2024MeanSparse_*``) come back as the base architecture prepared
    with their statistics and thresholds (:func:`meansparse.zoo.import_reference`).
    """
    if source not in ("auto", "robustbench", "timm", "checkpoint"):
        raise ValueError(f"source must be 'auto', 'robustbench', 'timm' or 'checkpoint', got {source!r}")
    name = os.fspath(name)
    if source == "auto":
        if _is_checkpoint(name):
            source = "checkpoint"
        elif importlib.util.find_spec("timm") is not None and import_timm().is_model(name):
            source = "timm"
        else:
            source = "robustbench"
    if source != "timm" and kwargs:
        raise TypeError(f"extra keyword arguments {sorted(kwargs)} only apply to source='timm'")
    if source == "checkpoint":
        model = load_checkpoint(name, device=device)
    elif source == "timm":
        model = _load_timm(name, pretrained, **kwargs)
    else:
        model = _load_robustbench(name, dataset, threat_model, pretrained, model_dir)
    return model.to(device).eval()
