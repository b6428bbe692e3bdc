"""The core layer: the operator and its site record, its band arithmetic, channel layouts and exact streaming
moments.

Imports only torch and the package's small base (``_utils``, ``_compile``); every other layer builds on it.
"""

from .band import StraightThrough, in_band, sparsify
from .layout import LAYOUTS, broadcast_channel, channel_dim, infer_layout
from .moments import Moments
from .operator import (
    ATTACK_MODES,
    CENTERINGS,
    DEFAULT_SHARPNESS,
    GRADIENTS,
    TRAIN_STATISTICS,
    MeanSparse,
    check_alpha,
    check_centering,
    check_momentum,
    check_sharpness,
    operators,
)
from .site import ACTIVATION_KINDS, SITE_KINDS, SiteInfo

__all__ = [
    "ACTIVATION_KINDS",
    "SITE_KINDS",
    "SiteInfo",
    "CENTERINGS",
    "ATTACK_MODES",
    "DEFAULT_SHARPNESS",
    "GRADIENTS",
    "TRAIN_STATISTICS",
    "LAYOUTS",
    "MeanSparse",
    "Moments",
    "StraightThrough",
    "broadcast_channel",
    "channel_dim",
    "check_alpha",
    "check_sharpness",
    "check_centering",
    "check_momentum",
    "in_band",
    "infer_layout",
    "operators",
    "sparsify",
]
