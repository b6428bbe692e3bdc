"""The identity attack: clean accuracy as a row of the report."""

from __future__ import annotations

from .base import Attack

__all__ = ["Clean"]


class Clean(Attack):
    """No perturbation: the clean accuracy expressed as an attack (useful as a baseline row)."""

    name = "clean"
    family = "clean"

    def _run(self, model, x, y, seed):
        return x.clone()
