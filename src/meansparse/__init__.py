"""MeanSparse: post-training mean-centred feature sparsification for robust classifiers.

Typical use::

    import meansparse as ms
    model = ms.prepare(model)          # operators before every activation, alpha = 0 (no change)
    ms.calibrate(model, train_loader)  # exact per-channel mean/var in one pass
    ms.set_alpha(model, 0.2)
    ms.save(model, "state.safetensors")

This module only gathers the public API; the layers it comes from are described in docs/architecture.md.
"""

from __future__ import annotations

import functools
import inspect

from . import accel as _accel
from . import data, models, zoo
from .accel import fuse, fused_sites, tune_cpu_allocator, unfuse
from .calibration import calibrate
from .core import MeanSparse, Moments, SiteInfo, operators
from .evaluation import EvaluationSpec, Ladder, Report
from .fastpath import evaluate
from .placement import (
    AlphaSchedule,
    MeanSparseActivation,
    Site,
    learn_statistics,
    register_activation,
    remove,
    set_alpha,
    sites,
    straight_through,
)
from .placement import prepare as _place
from .search import AlphaSearchResult, search_alpha, search_per_site, search_schedule
from .serialization import load, save
from .version import __version__


@functools.wraps(_place)
def prepare(*args, fuse: bool = False, **kwargs):
    prepared = _place(*args, **kwargs)
    return _accel.fuse(prepared) if fuse else prepared


prepare.__doc__ = (_place.__doc__ or "") + """
    ``fuse=True`` also calls :func:`meansparse.fuse` (operator + activation in one compiled function, same
    results; see :mod:`meansparse.accel`).
"""
_signature = inspect.signature(_place)
prepare.__signature__ = _signature.replace(parameters=[  # type: ignore[attr-defined]
    *_signature.parameters.values(), inspect.Parameter("fuse", inspect.Parameter.KEYWORD_ONLY, default=False)])


__all__ = [
    "__version__",
    "prepare",
    "sites",
    "calibrate",
    "set_alpha",
    "save",
    "load",
    "MeanSparse",
    "MeanSparseActivation",
    "straight_through",
    "learn_statistics",
    "AlphaSchedule",
    "remove",
    "operators",
    "register_activation",
    "Moments",
    "Site",
    "SiteInfo",
    "EvaluationSpec",
    "Ladder",
    "Report",
    "evaluate",
    "AlphaSearchResult",
    "search_alpha",
    "search_per_site",
    "search_schedule",
    "data",
    "models",
    "fuse",
    "unfuse",
    "fused_sites",
    "tune_cpu_allocator",
    "zoo",
]
