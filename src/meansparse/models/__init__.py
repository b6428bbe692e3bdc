"""Model registry, architectures and checkpoints (`ms.models.load(path)`)."""

from .activations import ACTIVATIONS, PSiLU, PSSiLU, make_activation
from .registry import (
    DATA_SHAPES,
    HASH_KEY,
    NORMALIZATION,
    Normalized,
    check_input_shape,
    checkpoint_paths,
    create_model,
    input_channels,
    list_models,
    load,
    read_config,
    read_weights,
    register_model,
    save_checkpoint,
    state_dict_mismatch,
    weights_sha256,
)

__all__ = [
    "ACTIVATIONS",
    "DATA_SHAPES",
    "HASH_KEY",
    "NORMALIZATION",
    "Normalized",
    "PSSiLU",
    "PSiLU",
    "check_input_shape",
    "checkpoint_paths",
    "create_model",
    "input_channels",
    "list_models",
    "state_dict_mismatch",
    "load",
    "make_activation",
    "read_config",
    "read_weights",
    "register_model",
    "save_checkpoint",
    "weights_sha256",
]
