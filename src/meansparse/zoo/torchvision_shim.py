"""Import torchvision when its compiled extension cannot load (a torch / torchvision build mismatch).

Why this exists
---------------
timm and robustbench import torchvision at import time.  ``torchvision/__init__`` imports
``torchvision._meta_registrations``, which calls ``torch.library.register_fake("torchvision::nms")`` (and
``"torchvision::qnms"``) *unconditionally*.  Those operators are defined by torchvision's compiled ``_C``
extension.  When ``_C`` cannot be loaded -- e.g. the CUDA wheel of torchvision next to a CPU-only build of
torch, as on this project's machines -- the registration raises::

    RuntimeError: operator torchvision::nms does not exist

and the whole import fails, although everything meansparse uses through timm and robustbench (layers,
architectures, transforms) is pure Python.

What it does -- only on exactly that failure
--------------------------------------------
1. removes the half-imported ``torchvision`` modules from ``sys.modules``;
2. declares the *schema* (signature only, no kernel) of the operator named in the error, with the exact
   signature torchvision's C++ code declares, in a ``torch.library`` fragment kept alive by this module;
3. imports torchvision again (repeating for the next missing operator, if any).

Nothing is faked: the declared operators have no implementation, so ``torchvision.ops.nms`` & co. still fail
when called (torchvision raises its own "Couldn't load custom C++ ops" error).  Any other import failure,
and an operator this module does not know, re-raise the original exception unchanged.  With a torchvision
that matches torch (the normal case for users) the first import succeeds and this module does nothing.
"""

from __future__ import annotations

import re
import sys
import warnings
from types import ModuleType

import torch

__all__ = ["import_torchvision", "SCHEMAS", "shimmed"]

#: Signatures of torchvision's C++ operators (torchvision/csrc/ops/*.cpp, v0.28), declared only on demand.
SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)"
    ),
}

_MISSING = re.compile(r"operator torchvision::(\w+) does not exist")
_library: torch.library.Library | None = None  # must stay referenced: dropping it unregisters the schemas
_declared: list[str] = []


def shimmed() -> list[str]:
    """The torchvision operators this process declared without an implementation (empty normally)."""
    return list(_declared)


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring missing operator schemas only if that exact failure happens."""
    global _library
    first_error: RuntimeError | None = None
    for _ in range(len(SCHEMAS) + 1):
        try:
            import torchvision
        except RuntimeError as e:
            match = _MISSING.search(str(e))
            if match is None or match.group(1) not in SCHEMAS or match.group(1) in _declared:
                if first_error is not None:
                    raise e from first_error
                raise
            first_error = first_error or e
            _forget_torchvision()
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            _library.define(SCHEMAS[match.group(1)])
            _declared.append(match.group(1))
            continue
        if first_error is not None:
            warnings.warn(
                f"torchvision {getattr(torchvision, '__version__', '?')} cannot load its C++ operators with "
                f"torch {torch.__version__} ({first_error}); meansparse declared their schemas "
                f"({', '.join(_declared)}) so that the pure-Python parts (models, layers used by timm and "
                "robustbench) import. torchvision.ops.nms & co. will not work: install the torchvision build "
                "that matches your torch to fix this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return torchvision
    raise RuntimeError("import_torchvision: too many missing torchvision operators") from first_error
