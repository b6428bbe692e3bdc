"""Placements of known architecture families (``prepare(model, preset=...)``), reproduced from the MeanSparse
reference code (robustbench ``model_zoo/architectures/Meansparse_*.py`` and ``sparsified_model.py``):

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

Families are recognised by class name and defining module, so neither robustbench nor timm is imported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from .registry import register_activation

__all__ = ["PRESETS", "detect_preset", "resolve_preset", "register_family_activations"]

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
    for m in model.modules():
        if type(m).__name__ == "Swish" and type(m).__module__.startswith("robustbench."):
            register_activation(type(m))
