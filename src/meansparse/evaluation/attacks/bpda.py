"""BPDA: any attack, with identity gradients through the MeanSparse operators."""

from __future__ import annotations

from ...placement import straight_through
from .base import Attack, Wrapper

__all__ = ["BPDA"]


class BPDA(Wrapper):
    """Run ``inner`` with identity gradients through every MeanSparse operator (``straight_through``).

    The forward pass is unchanged, so every candidate is a genuine input for the real model. A wrapper of
    our own because only this package knows its operators; the inner attack is unchanged.
    """

    family = "bpda"

    def __init__(self, inner: Attack) -> None:
        super().__init__(inner)
        self.name = f"bpda-{inner.name}"

    def _run(self, model, x, y, seed):
        with straight_through(model):
            return self.inner.run(model, x, y, seed=seed)
