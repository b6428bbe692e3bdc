"""One registry for architectures, the input-normalization wrapper and safetensors checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._utils import tensors_sha256
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


#: image shapes (C, H, W) of the named data sets
DATA_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar10-jpg": (3, 32, 32), "cifar100": (3, 32, 32)}


def input_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: its normalization layer's (:class:`Normalized`, or any top-level
    ``mean`` buffer of shape (1, C, 1, 1)), else its first 2-D convolution's; None if unknown."""
    mean = getattr(model, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.ndim == 4:
        return int(mean.shape[1])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def check_input_shape(model: nn.Module, config: dict[str, Any] | None, shape: tuple[int, ...], source: str,
                      checkpoint: str = "the model") -> None:
    """A ValueError when images of ``shape`` (C, H, W) from ``source`` do not fit the model: other channels
    than it expects (broadcasting would silently run a 3-channel model on 1-channel images), or another
    shape than the data set recorded in its checkpoint ``config`` (``input_shape``, else the shape of the
    recorded ``dataset``)."""
    shape = tuple(int(v) for v in shape)
    channels = input_channels(model)
    if channels is not None and len(shape) == 3 and shape[0] != channels:
        raise ValueError(f"{checkpoint} expects {channels}-channel images but {source} has {shape[0]}-channel "
                         f"{shape[1]}x{shape[2]} images; use the data set the model was trained on")
    config = config or {}
    expected = config.get("input_shape") or DATA_SHAPES.get(str(config.get("dataset")))
    if expected is not None and tuple(expected) != shape:
        raise ValueError(f"{checkpoint} was trained on {config.get('dataset', 'images')} of shape {tuple(expected)} "
                         f"but {source} has images of shape {shape}")


def probe_model(model: torch.nn.Module, x: torch.Tensor, spec: str, source: str) -> int:
    """Run the model twice on ``x`` in eval mode and return its number of logits; a ValueError when its
    forward fails, returns something else than one logits row per image, or is not deterministic (active
    dropout or other randomness: every attack and every statistic would measure noise)."""
    was = model.training
    model.eval()
    try:
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        with torch.no_grad():
            try:
                first, second = model(x.to(device)), model(x.to(device))
            except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                raise ValueError(f"{spec}: the model's forward fails on images of {source} "
                                 f"({type(e).__name__}: {_first_line(e)})") from e
    finally:
        model.train(was)
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"{spec}: the model returns a {type(first).__name__}, not a logits tensor; wrap it so "
                         "that forward returns the (N, classes) logits")
    if first.ndim != 2 or first.shape[0] != x.shape[0] or not first.is_floating_point():
        raise ValueError(f"{spec}: the model returns a {first.dtype} tensor of shape {tuple(first.shape)} for "
                         f"{x.shape[0]} images; expected float logits of shape ({x.shape[0]}, classes)")
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5, equal_nan=True):  # GPU kernels: float noise only
        raise ValueError(f"{spec}: the model is not deterministic in eval mode (two forward passes on the same "
                         "images differ: an active dropout or other randomness?); attacks and calibration need "
                         "a deterministic model")
    return int(first.shape[1])


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


#: what to do about data whose classes are not the model's
CLASS_ADVICE = ("labels are class positions (sorted folder names), so they would be scored against the wrong "
                "logits; give the data set the model was trained on (missing classes can be empty folders)")


def class_mismatch(data: Any, data_label: str, logits: int, recorded: list[str] | None, model_label: str
                   ) -> str | None:
    """What is wrong when the classes of ``data`` (its ``classes`` names, else ``num_classes``) are not the
    model's: another number than its ``logits``, or other names than the ``recorded`` ones; None if they fit."""
    classes = [str(c) for c in (getattr(data, "classes", None) or [])]
    count = len(classes) or int(getattr(data, "num_classes", 0) or 0)
    if count and count != logits:
        return f"{data_label} has {count} classes ({_names(classes)}) but {model_label} has {logits} logits"
    if recorded and classes and [str(c) for c in recorded] != classes:
        return f"{data_label} has the classes {_names(classes)} but {model_label} was trained on {_names(recorded)}"
    return None


def _names(classes: list[Any], shown: int = 4) -> str:
    """A few class names, and how many more."""
    if not classes:
        return "unnamed"
    return ", ".join(map(str, classes[:shown])) + (f", … {len(classes) - shown} more" if len(classes) > shown else "")


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, config)`` files of a checkpoint path given with or without its suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


#: key of the checkpoint JSON holding the sha256 of the weights (:func:`weights_sha256`)
HASH_KEY = "weights_sha256"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors (sorted by name: names, dtypes, shapes, bytes)."""
    return tensors_sha256(sorted(state.items()))


def save_checkpoint(model: nn.Module, path: str | Path, config: dict[str, Any]) -> Path:
    """Weights as safetensors + a JSON config that rebuilds the architecture (never a pickle); the config
    records the sha256 of the weights, which :func:`load` verifies."""
    if "model" not in config or "model_kwargs" not in config:
        raise ValueError("checkpoint config needs 'model' (registry name) and 'model_kwargs'")
    weights, meta = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    meta.write_text(json.dumps({**config, HASH_KEY: weights_sha256(state)}, indent=2, sort_keys=True) + "\n")
    return weights


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON config; a ValueError naming the file when it is not a JSON object."""
    meta = checkpoint_paths(path)[1]
    try:
        config = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta}: not a valid checkpoint config (JSON: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{meta}: not a valid checkpoint config (a JSON object is expected)")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ValueError naming the file when it is empty, truncated,
    corrupt or not safetensors at all (e.g. a pickle: nothing is ever unpickled)."""
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         "is it truncated, or a pickle (torch.save)?") from None


def state_dict_mismatch(e: RuntimeError, shown: int = 3) -> str:
    """``load_state_dict``'s error in one complete line: each kind of problem (missing keys, unexpected keys,
    shape mismatches) with its first few entries and how many more, never cut off mid-sentence."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    if not lines:
        return str(e).strip()
    parts, sizes = [], []
    for line in lines:
        head, sep, rest = line.partition(": ")
        if head.startswith(("Missing key", "Unexpected key")) and sep:
            keys = [k.strip().strip('"') for k in rest.rstrip(".").split(", ") if k.strip()]
            more = f" … {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{head.lower()}: {', '.join(keys[:shown])}{more}")
        elif line.startswith("size mismatch"):
            sizes.append(line.rstrip("."))
        else:
            parts.append(line.rstrip("."))
    if sizes:
        more = f" (… {len(sizes) - shown} more size mismatches)" if len(sizes) > shown else ""
        parts.append("; ".join(sizes[:shown]) + more)
    return "; ".join(parts)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `save_checkpoint` output: eval mode, inputs in [0, 1]. A recorded weights hash
    is verified (checkpoints written before hashes were recorded load unverified)."""
    weights, meta = checkpoint_paths(path)
    if not weights.exists() or not meta.exists():
        raise FileNotFoundError(f"checkpoint needs both {weights} and {meta}")
    config = read_config(path)
    for key in ("model", "model_kwargs"):
        if key not in config:
            raise ValueError(f"{meta}: checkpoint config has no {key!r} key (the registry name and its "
                             "arguments that rebuild the architecture)")
    if not isinstance(config["model_kwargs"], dict):
        raise ValueError(f"{meta}: 'model_kwargs' must be a JSON object")
    try:
        model = create_model(config["model"], **config["model_kwargs"])
    except TypeError as e:
        raise ValueError(f"{meta}: cannot build {config['model']!r} from its model_kwargs ({e})") from None
    state = read_weights(weights)
    recorded = config.get(HASH_KEY)
    if recorded is not None and weights_sha256(state) != recorded:
        raise ValueError(f"{weights}: the weights' sha256 does not match the one recorded in {meta.name}: the "
                         "file is corrupted or was replaced")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit the architecture in {meta.name} ({config['model']}, "
                         f"{config['model_kwargs']}): {state_dict_mismatch(e)}") from None
    return model.to(device).eval()
