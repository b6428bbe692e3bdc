"""One registry for architectures, the input-normalization wrapper and safetensors checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .resnet import preact_resnet18, resnet18
from .small import SmallCNN
from .wideresnet import WideResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Per-dataset normalization constants (inputs stay in [0, 1]; the model normalizes).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.5,), (0.5,)),
    "none": None,
}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class Normalized(nn.Module):
    """(x - mean) / std in front of a network, so the model takes [0, 1] inputs (RobustBench convention)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def create_model(name: str, *, num_classes: int = 10, activation: str = "relu", width: int | None = None,
                 normalization: str = "cifar10", **kwargs: Any) -> nn.Module:
    """Build a registered architecture with the normalization layer inside; consistent keyword arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: registered are {', '.join(list_models())}")
    if normalization not in NORMALIZATION:
        raise ValueError(f"unknown normalization {normalization!r}: use one of {', '.join(NORMALIZATION)}")
    if width is not None:
        kwargs["width"] = width
    stats = NORMALIZATION[normalization]
    in_channels = len(stats[0]) if stats else kwargs.pop("in_channels", 3)
    net = _REGISTRY[name](num_classes=num_classes, activation=activation, in_channels=in_channels, **kwargs)
    return Normalized(net, *stats) if stats else net


register_model("resnet18")(resnet18)
register_model("preact_resnet18")(preact_resnet18)
register_model("small_cnn")(SmallCNN)


@register_model("wideresnet")
def _wrn(depth: int = 28, widen: int = 10, **kw: Any) -> nn.Module:
    return WideResNet(depth=depth, widen=widen, **kw)


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, config)`` files of a checkpoint path given with or without its suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(model: nn.Module, path: str | Path, config: dict[str, Any]) -> Path:
    """Weights as safetensors + a JSON config that rebuilds the architecture (never a pickle)."""
    if "model" not in config or "model_kwargs" not in config:
        raise ValueError("checkpoint config needs 'model' (registry name) and 'model_kwargs'")
    weights, meta = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    meta.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads(checkpoint_paths(path)[1].read_text())


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `save_checkpoint` output: eval mode, inputs in [0, 1]."""
    weights, meta = checkpoint_paths(path)
    if not weights.exists() or not meta.exists():
        raise FileNotFoundError(f"checkpoint needs both {weights} and {meta}")
    config = json.loads(meta.read_text())
    model = create_model(config["model"], **config["model_kwargs"])
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()
