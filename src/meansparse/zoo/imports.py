"""Importing the ``[zoo]`` extra (timm, robustbench): through the torchvision shim, and with an ImportError
that names the extra when a package is missing, since neither is a dependency of meansparse itself."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from .torchvision_shim import import_torchvision

__all__ = ["import_timm", "import_robustbench"]

_EXTRA = 'pip install "meansparse[zoo]" (timm, robustbench; install the torchvision build matching your torch first)'


def _missing(package: str, error: BaseException) -> ImportError:
    return ImportError(f"meansparse.zoo needs {package} ({error}); install the [zoo] extra: {_EXTRA}")


def import_timm() -> ModuleType:
    """``import timm`` (through the torchvision shim), or an ImportError naming the ``[zoo]`` extra."""
    if importlib.util.find_spec("timm") is None:
        raise _missing("timm", ModuleNotFoundError("No module named 'timm'"))
    try:
        import_torchvision()
    except ModuleNotFoundError as e:
        raise _missing("torchvision", e) from e
    import timm

    return timm


def import_robustbench() -> ModuleType:
    """``import robustbench`` (with timm), or an ImportError naming the ``[zoo]`` extra.

    robustbench 1.1.1 imports ``autoattack`` (the GitHub package) while depending on ``pyautoattack`` (the
    same code published on PyPI under another name): when only the latter is installed it is registered
    under the name robustbench imports.  ``pkg_resources`` (robustbench's loaders) needs setuptools < 81.
    """
    if importlib.util.find_spec("robustbench") is None:
        raise _missing("robustbench", ModuleNotFoundError("No module named 'robustbench'"))
    import_timm()
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        import robustbench
        import robustbench.utils  # noqa: F401
    except ModuleNotFoundError as e:
        raise _missing(f"robustbench's dependency {e.name!r}", e) from e
    return robustbench
