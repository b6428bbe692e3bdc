"""The package version, and the versions a report records."""

from __future__ import annotations

__all__ = ["__version__", "package_versions"]

__version__ = "0.1.0"


def package_versions() -> dict[str, str]:
    """Python and the installed versions of meansparse, torch, numpy and pyautoattack."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("meansparse", "torch", "numpy", "pyautoattack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
