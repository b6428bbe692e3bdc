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
import warnings

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
def prepare(*args, **kwargs):
    if "fuse" in kwargs:  # deprecated: fusing is its own step (issue #23: at most 13 parameters per function)
        fuse = kwargs.pop("fuse")
        warnings.warn("ms.prepare(fuse=True) is deprecated: fuse the prepared model with ms.fuse(model)",
                      DeprecationWarning, stacklevel=2)
        prepared = _place(*args, **kwargs)
        return _accel.fuse(prepared) if fuse else prepared
    return _place(*args, **kwargs)


prepare.__doc__ = (_place.__doc__ or "") + """
    To fuse the operators with their activations (same results, one compiled function), call
    :func:`meansparse.fuse` on the prepared model (see :mod:`meansparse.accel`).
"""
prepare.__signature__ = inspect.signature(_place)  # type: ignore[attr-defined]


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
