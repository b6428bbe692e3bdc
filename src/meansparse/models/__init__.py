"""Model registry, architectures and checkpoints (`ms.models.load(path)`)."""

from .activations import ACTIVATIONS, PSiLU, PSSiLU, make_activation
from .registry import (
    NORMALIZATION,
    Normalized,
    checkpoint_paths,
    create_model,
    list_models,
    load,
    read_config,
    register_model,
    save_checkpoint,
)

__all__ = [
    "ACTIVATIONS",
    "NORMALIZATION",
    "Normalized",
    "PSSiLU",
    "PSiLU",
    "checkpoint_paths",
    "create_model",
    "list_models",
    "load",
    "make_activation",
    "read_config",
    "register_model",
    "save_checkpoint",
]
