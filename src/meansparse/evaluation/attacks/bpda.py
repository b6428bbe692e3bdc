"""BPDA: any attack, with identity gradients through the MeanSparse operators."""

from __future__ import annotations

from ...placement import straight_through
from .base import Attack

__all__ = ["BPDA"]


class BPDA(Attack):
    """Run ``inner`` with identity gradients through every MeanSparse operator (``straight_through``).

    The forward pass is unchanged, so every candidate is a genuine input for the real model. A wrapper of
    our own because only this package knows its operators; the inner attack is unchanged.
    """

    kind = "bpda"

    def __init__(self, inner: Attack) -> None:
        super().__init__(norm=inner.norm, eps=inner.eps)
        self.inner = inner
        self.name = f"bpda-{inner.name}"

    @property
    def seed_key(self) -> str:
        return self.inner.seed_key

    def _rescale(self, factor: int) -> None:
        self.inner = self.inner.scaled(factor)

    def params(self):
        return {"inner": self.inner.settings()}

    def _run(self, model, x, y, seed):
        with straight_through(model):
            return self.inner.run(model, x, y, seed=seed)
