"""Model zoo: RobustBench and timm models, and the MeanSparse placements of the reference code.

:func:`load` returns a model in eval mode that takes inputs in [0, 1]:

* a RobustBench id (``"Wang2023Better_WRN-70-16"``, ``"Peng2023Robust"``, ...) through
  ``robustbench.utils.load_model`` (downloads once, then reads its cache; RobustBench models normalize
  inside);
* a timm name (``"convnext_large"``) through ``timm.create_model``, wrapped in
  :class:`meansparse.models.Normalized` with the model's own ``pretrained_cfg`` mean / std;
* a checkpoint written by :func:`meansparse.models.save_checkpoint` (a path).

Placements (``meansparse.prepare(model, preset=...)``), reproduced from the MeanSparse reference code
(robustbench ``model_zoo/architectures/Meansparse_*.py`` and ``sparsified_model.py``):

``dm_wrn``    DeepMind pre-activation WideResNet / PreActResNet (robustbench ``DMWideResNet``,
              ``DMPreActResNet``; SiLU): before every activation, incl. the final one, and after every
              residual add (the reference's ``meansparse_0/1`` before ``relu_0/1``, ``meansparse_2`` after
              the block's ``torch.add``, ``meansparse_end`` before the last activation).
``rawrn``     RobustArch WideResNet (robustbench ``NormalizedWideResNet``, ``Peng2023Robust``): the same,
              except the ReLU inside each Squeeze-and-Excitation block.  Its forward branches on
              ``x.is_cuda``, which torch.fx cannot trace, so this preset uses ``method="modules"`` and needs
              ``example_inputs`` (one probe forward finds the block outputs that are residual adds).
``swin``      timm Swin Transformer: inside each MLP before GELU (NLC, 4C channels) and after ``fc2`` (NLC,
              C), and after each of the block's two residual adds (C channels); nothing inside attention.
``convnext``  timm ConvNeXt: before GELU in each block's MLP (NHWC, 4C channels) and on the residual branch
              before the add, i.e. on the output of the block's ``drop_path`` (NCHW, C channels).
``generic``   before every activation (``prepare``'s default).
``auto``      the family detected from the model's classes (robustbench / timm only), else ``generic``.

timm and robustbench are the ``[zoo]`` extra and are imported only when needed.  Where the installed
torchvision cannot load its C++ operators (a torch / torchvision build mismatch), they are imported through
:mod:`meansparse._torchvision_shim`, which says so with a warning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

__all__ = [
    "load",
    "PRESETS",
    "detect_preset",
    "resolve_preset",
    "register_family_activations",
    "import_timm",
    "import_robustbench",
]

_EXTRA = 'pip install "meansparse[zoo]" (timm, robustbench; install the torchvision build matching your torch first)'

#: prepare() arguments per architecture family (regexes are searched in site / module names).
PRESETS: dict[str, dict[str, Any]] = {
    "generic": {},
    "dm_wrn": {"residual_adds": True},
    "rawrn": {"residual_adds": True, "exclude": [r"(^|\.)se(\.|$)"], "method": "modules"},
    "swin": {"residual_adds": True, "outputs": [r"\.mlp\.fc2$"], "exclude": [r"(^|\.)attn(\.|$)"]},
    "convnext": {"outputs": [r"(^|\.)blocks\.\d+\.drop_path$"]},
}

# family -> (class names, defining modules): only these exact robustbench / timm classes are detected
_FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("dm_wrn", ("DMWideResNet", "DMPreActResNet"), ("robustbench.model_zoo.architectures.dm_wide_resnet",)),
    ("rawrn", ("NormalizedWideResNet",), ("robustbench.model_zoo.architectures.robustarch_wide_resnet",)),
    ("swin", ("SwinTransformer",), ("timm.models.swin_transformer",)),
    ("convnext", ("ConvNeXt",), ("timm.models.convnext",)),
)


# ------------------------------------------------------------------------------------------- imports
def _missing(package: str, error: BaseException) -> ImportError:
    return ImportError(f"meansparse.zoo needs {package} ({error}); install the [zoo] extra: {_EXTRA}")


def import_timm() -> ModuleType:
    """``import timm`` (through the torchvision shim), or an ImportError naming the ``[zoo]`` extra."""
    if importlib.util.find_spec("timm") is None:
        raise _missing("timm", ModuleNotFoundError("No module named 'timm'"))
    from ._torchvision_shim import import_torchvision

    try:
        import_torchvision()
    except ModuleNotFoundError as e:
        raise _missing("torchvision", e) from e
    import timm

    return timm


def import_robustbench() -> ModuleType:
    """``import robustbench`` (with timm), or an ImportError naming the ``[zoo]`` extra.

    robustbench 1.1.1 imports ``autoattack`` (the GitHub package) while depending on ``pyautoattack`` (the
    same code published on PyPI under another name): when only the latter is installed it is registered
    under the name robustbench imports.  ``pkg_resources`` (robustbench's loaders) needs setuptools < 81.
    """
    if importlib.util.find_spec("robustbench") is None:
        raise _missing("robustbench", ModuleNotFoundError("No module named 'robustbench'"))
    import_timm()
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        import robustbench
        import robustbench.utils  # noqa: F401
    except ModuleNotFoundError as e:
        raise _missing(f"robustbench's dependency {e.name!r}", e) from e
    return robustbench


# ------------------------------------------------------------------------------------------- presets
def detect_preset(model: nn.Module) -> str:
    """The placement family of ``model`` from its robustbench / timm classes; ``"generic"`` if none."""
    found = []
    for m in model.modules():
        cls = type(m)
        for family, names, modules in _FAMILIES:
            if cls.__name__ in names and cls.__module__ in modules and family not in found:
                found.append(family)
    if len(found) > 1:
        warnings.warn(
            f"meansparse.zoo.detect_preset: {type(model).__name__} contains several known families {found}; "
            "using the generic placement (pass preset= to choose)",
            stacklevel=2,
        )
        return "generic"
    return found[0] if found else "generic"


def resolve_preset(preset: str, model: nn.Module) -> tuple[str, Mapping[str, Any]]:
    """``(name, prepare arguments)`` for a preset name or ``"auto"``; used by ``prepare(preset=...)``."""
    name = detect_preset(model) if preset == "auto" else preset
    if name not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use 'auto' or one of {', '.join(PRESETS)}")
    register_family_activations(name, model)
    return name, PRESETS[name]


def register_family_activations(preset: str | None, model: nn.Module) -> None:
    """Activation modules of a family that ``prepare`` does not know by default (also run by ``load``).

    Some DeepMind WideResNets use robustbench's own ``Swish`` module (x * sigmoid(x), i.e. SiLU).
    """
    if preset != "dm_wrn":
        return
    from .insertion import register_activation

    for m in model.modules():
        if type(m).__name__ == "Swish" and type(m).__module__.startswith("robustbench."):
            register_activation(type(m))


# ------------------------------------------------------------------------------------------- loading
def _default_model_dir() -> Path:
    root = Path(os.environ.get("MEANSPARSE_CACHE", Path.home() / ".cache" / "meansparse"))
    return root / "robustbench"


def _is_checkpoint(name: str) -> bool:
    from .models.registry import _paths

    if not name or any(c in name for c in "\n\0"):
        return False
    weights, meta = _paths(name)
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
        return entry["model"]().eval()
    from robustbench.utils import load_model

    directory = Path(model_dir) if model_dir is not None else _default_model_dir()
    return load_model(model_name=name, model_dir=str(directory), dataset=dataset, threat_model=threat_model).eval()


def _load_timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    timm = import_timm()
    from .models.registry import Normalized

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
        from .models import load as load_checkpoint

        model = load_checkpoint(name, device=device)
    elif source == "timm":
        model = _load_timm(name, pretrained, **kwargs)
    else:
        model = _load_robustbench(name, dataset, threat_model, pretrained, model_dir)
    return model.to(device).eval()
