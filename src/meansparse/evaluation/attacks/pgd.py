"""PGD-k on cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...pgd import pgd
from .base import Attack, SuccessTracker

__all__ = ["PGD"]


class PGD(Attack):
    """PGD-k on cross-entropy with a random start (Madry et al.; the paper's A.10 attack).

    Hand-written on top of ``meansparse.pgd``: pyautoattack has no plain PGD and torchattacks drags in
    torchvision. Default step size 2.5·eps/steps; the first misclassified iterate is kept.
    """

    name = "pgd"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 50,
                 step_size: float | None = None, random_start: bool = True) -> None:
        super().__init__(norm=norm, eps=eps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start = bool(random_start)

    def _rescale(self, factor: int) -> None:
        self.step_size /= factor  # the same total path length as the default rule 2.5·eps/steps

    def params(self):
        return {"steps": self.steps, "step_size": self.step_size, "random_start": self.random_start,
                "loss": "ce"}

    def _loss(self, model: nn.Module, x: torch.Tensor, tracker: SuccessTracker) -> Callable:
        def loss_fn(xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(xa)
            tracker.update(xa, logits, y)
            return F.cross_entropy(logits, y, reduction="none")

        return loss_fn

    def _run(self, model, x, y, seed):
        return self._descend(model, x, y, seed, self._loss)

    def _descend(self, model, x, y, seed, make_loss: Callable) -> torch.Tensor:
        """PGD on the loss ``make_loss(model, x, tracker)`` returns (subclasses bring their own loss)."""
        tracker = SuccessTracker(x)
        gen = torch.Generator().manual_seed(seed)
        final = pgd(make_loss(model, x, tracker), x, y, eps=self.eps, step_size=self.step_size,
                    steps=self.steps, norm=self.norm, rand_init=self.random_start, generator=gen)
        return tracker.merge(model, final, y)
