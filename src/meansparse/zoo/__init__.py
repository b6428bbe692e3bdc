"""Model zoo: RobustBench and timm models, ready for MeanSparse.

:func:`load` returns a model in eval mode that takes inputs in [0, 1]:

* a RobustBench id (``"Wang2023Better_WRN-70-16"``, ``"Peng2023Robust"``, ...) through
  ``robustbench.utils.load_model`` (downloads once, then reads its cache; RobustBench models normalize
  inside);
* a timm name (``"convnext_large"``) through ``timm.create_model``, wrapped in
  :class:`meansparse.models.Normalized` with the model's own ``pretrained_cfg`` mean / std;
* a checkpoint written by :func:`meansparse.models.save_checkpoint` (a path).

:func:`load_model_spec` loads the model a command-line spec names (``robustbench:<id>``, ``timm:<name>``,
``python:<file>:<callable>`` with weights, or a checkpoint path; :mod:`meansparse.zoo.spec`).

The authors' own MeanSparse models in RobustBench (``Amini2024MeanSparse_*``) come back as the base
architecture prepared by meansparse with the authors' statistics and thresholds: :func:`import_reference`
(:mod:`meansparse.zoo.reference`).

:func:`preprocessing` names the test-time preprocessing RobustBench feeds a model (``"Res256Crop224"``,
``"BicubicRes256Crop224"``, ...; None for CIFAR); ``meansparse.data`` streams images through it.

The reference code's placements for these families (``meansparse.prepare(model, preset=...)``:
``dm_wrn``, ``rawrn``, ``swin``, ``convnext``, ``generic``, ``auto``) are defined and documented in
:mod:`meansparse.placement.presets`; :data:`PRESETS`, :func:`detect_preset`, :func:`resolve_preset` and
:func:`register_family_activations` are re-exported here.

timm and robustbench are the ``[zoo]`` extra and are imported only when needed.  Where the installed
torchvision cannot load its C++ operators (a torch / torchvision build mismatch), they are imported through
:mod:`meansparse.zoo.torchvision_shim`, which says so with a warning.
"""

from __future__ import annotations

from ..placement.presets import PRESETS, detect_preset, register_family_activations, resolve_preset
from .imports import import_robustbench, import_timm
from .loading import load
from .preprocessing import preprocessing
from .reference import import_reference, reference_family, reference_sites
from .spec import ModelSpec, load_model_spec, parse_model_spec, read_weights

__all__ = [
    "load",
    "preprocessing",
    "import_reference",
    "reference_family",
    "reference_sites",
    "PRESETS",
    "detect_preset",
    "resolve_preset",
    "register_family_activations",
    "import_timm",
    "import_robustbench",
    "ModelSpec",
    "parse_model_spec",
    "load_model_spec",
    "read_weights",
]
