"""The placement layer: where operators go in a model, and how to take them out again.

One registry of activations, adds and layout rules (:mod:`.registry`), the presets of known architecture
families (:mod:`.presets`), two insertion strategies (:mod:`.fx_strategy`, :mod:`.module_strategy`), the
record ``prepare`` leaves for ``remove``/``save``/``load`` (:mod:`.record`), and the site-level settings
(:mod:`.sites`).  Depends on :mod:`meansparse.core` only.
"""

from .prepare import FxPrepared, fx_class, mode_forwards, prepare, prepare_from_config, remove
from .presets import PRESETS, detect_preset, register_family_activations, resolve_preset
from .record import PreparedRecord, find_prepared, get_record
from .registry import ActivationSpec, register_activation
from .schedule import SCHEDULES, AlphaSchedule, parse_alpha_schedule
from .sites import Site, gradient_mode, learn_statistics, set_alpha, sites, straight_through
from .wrappers import MeanSparseActivation, MeanSparseOutput

__all__ = [
    "PRESETS",
    "SCHEDULES",
    "AlphaSchedule",
    "learn_statistics",
    "parse_alpha_schedule",
    "ActivationSpec",
    "FxPrepared",
    "MeanSparseActivation",
    "MeanSparseOutput",
    "PreparedRecord",
    "Site",
    "detect_preset",
    "find_prepared",
    "fx_class",
    "mode_forwards",
    "get_record",
    "prepare",
    "prepare_from_config",
    "register_activation",
    "register_family_activations",
    "remove",
    "resolve_preset",
    "set_alpha",
    "sites",
    "gradient_mode",
    "straight_through",
]
