"""MeanSparse: post-training mean-centred feature sparsification for robust classifiers.

Typical use::

    import meansparse as ms
    model = ms.prepare(model)          # operators before every activation, alpha = 0 (no change)
    ms.calibrate(model, train_loader)  # exact per-channel mean/var in one pass
    ms.set_alpha(model, 0.2)
    ms.save(model, "state.safetensors")

This module only gathers the public API: the workflow verbs, the result and spec types, and the subpackages
(``accel``, ``core``, ``data``, ``evaluation``, ``models``, ``placement``, ``zoo``), where everything else lives;
the layers they come from are described in docs/architecture.md.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

# the subpackages, as public attributes of the package (``ms.accel.whole_model_compiled``, ``ms.core.Moments``)
from . import accel, core, data, evaluation, models, placement, zoo
from .accel import fuse, fused_sites, unfuse
from .calibration import calibrate
from .core import MeanSparse, SiteInfo, operators
from .evaluation import EvaluationSpec, Ladder, Report
from .fastpath import evaluate
from .placement import (
    AlphaSchedule,
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
        return accel.fuse(prepared) if fuse else prepared
    return _place(*args, **kwargs)


prepare.__doc__ = (_place.__doc__ or "") + """
    To fuse the operators with their activations (same results, one compiled function), call
    :func:`meansparse.fuse` on the prepared model (see :mod:`meansparse.accel`).
"""
prepare.__signature__ = inspect.signature(_place)  # type: ignore[attr-defined]


#: Internals that were once top-level names, and the subpackage each lives in now (issue #23).
_MOVED = {"Moments": "core", "MeanSparseActivation": "placement", "tune_cpu_allocator": "accel"}


def __getattr__(name: str) -> Any:
    """``ms.Moments`` & co. still resolve, with a DeprecationWarning naming their subpackage."""
    if name in _MOVED:
        where = _MOVED[name]
        warnings.warn(f"meansparse.{name} is deprecated: use meansparse.{where}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(globals()[where], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    # the workflow: place, calibrate, set alpha, evaluate, search, fuse, save
    "prepare",
    "sites",
    "calibrate",
    "set_alpha",
    "straight_through",
    "learn_statistics",
    "register_activation",
    "remove",
    "operators",
    "evaluate",
    "search_alpha",
    "search_per_site",
    "search_schedule",
    "fuse",
    "unfuse",
    "fused_sites",
    "save",
    "load",
    # result and spec types
    "MeanSparse",
    "Site",
    "SiteInfo",
    "AlphaSchedule",
    "EvaluationSpec",
    "Ladder",
    "Report",
    "AlphaSearchResult",
    # the subpackages (internals live there: ms.core.Moments, ms.placement.MeanSparseActivation, ...)
    "accel",
    "core",
    "data",
    "evaluation",
    "models",
    "placement",
    "zoo",
]
