"""MeanSparse: post-training mean-centred feature sparsification for robust classifiers.

Typical use::

    import meansparse as ms
    model = ms.prepare(model)          # operators before every activation, alpha = 0 (no change)
    ms.calibrate(model, train_loader)  # exact per-channel mean/var in one pass
    ms.set_alpha(model, 0.2)
    ms.save(model, "state.safetensors")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .calibration import calibrate
from .insertion import (
    MeanSparseActivation,
    Site,
    operators,
    prepare,
    register_activation,
    remove,
    set_alpha,
    sites,
    straight_through,
)
from .moments import Moments
from .operator import MeanSparse
from .serialization import load, save

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
    "remove",
    "operators",
    "register_activation",
    "Moments",
    "Site",
]

# ---------------------------------------------------------------------------------------------------
# Extension point: modules written in other issues register their public names below, e.g.
#     from .evaluation import evaluate  # noqa: E402
#     __all__ += ["evaluate"]
# (kept at the end so the core above never depends on them)
# ---------------------------------------------------------------------------------------------------
from . import data, models  # noqa: E402, F401
from .evaluation import Report, evaluate  # noqa: E402, F401
from .search import AlphaSearchResult, search_alpha, search_per_site, search_schedule  # noqa: E402, F401

__all__ += ["Report", "evaluate", "AlphaSearchResult", "search_alpha", "search_per_site", "search_schedule",
            "data", "models"]
from .fused import fuse, fused_sites, unfuse  # noqa: E402

__all__ += ["fuse", "unfuse", "fused_sites"]
from .allocator import tune_cpu_allocator  # noqa: E402

__all__ += ["tune_cpu_allocator"]
from . import zoo  # noqa: E402  (imports timm / robustbench only when used)

__all__ += ["zoo"]
