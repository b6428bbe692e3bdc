"""The ``meansparse`` command line, one module per sub-command group (``python -m meansparse.cli`` runs it,
e.g. under ``torchrun``)."""

from __future__ import annotations

from .app import build_parser, main

__all__ = ["main", "build_parser"]
