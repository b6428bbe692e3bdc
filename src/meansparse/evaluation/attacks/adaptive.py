"""The paper's adaptive PGD: a loss that also pulls the operators' inputs out of their bands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ...core import operators
from .base import SuccessTracker
from .pgd import PGD

__all__ = ["AdaptivePGD"]


class AdaptivePGD(PGD):
    """The paper's adaptive PGD (appendix A.4): :class:`PGD` with its loss.

    Maximises CE(f(x+d), y) - lam * sum_k ||M_k * (z_k(x+d) - z_k(x))||^2, where z_k is the input of the
    k-th MeanSparse operator and M_k marks the positions that operator blocks on the clean input.
    Hand-written: the loss needs the operators' inputs, which no attack library can see.
    """

    name = "adaptive"
    family = "adaptive"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, lam: float = 1.0, steps: int = 50,
                 step_size: float | None = None, random_start: bool = True, name: str | None = None) -> None:
        super().__init__(norm=norm, eps=eps, steps=steps, step_size=step_size, random_start=random_start)
        if name is not None:  # e.g. two λ values side by side: AdaptivePGD(lam=10, name="adaptive-lam10")
            self.name = name
        self.lam = float(lam)

    def params(self):
        return {"lam": self.lam, "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start}

    def _run(self, model, x, y, seed):
        with _operator_inputs(model) as inputs:
            return self._descend(model, x, y, seed, partial(self._loss_through, inputs))

    def _loss_through(self, inputs: list, model: nn.Module, x: torch.Tensor, tracker: SuccessTracker) -> Callable:
        """The adaptive loss, ``inputs`` holding each operator's input at the latest forward pass."""
        with torch.no_grad():
            model(x)
            clean = [z.detach() for z in inputs]
            masks = [op.band_mask(z).to(z.dtype) for op, z in zip(operators(model), clean)]

        def loss_fn(xa: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            logits = model(xa)
            tracker.update(xa, logits, yy)
            loss = F.cross_entropy(logits, yy, reduction="none")
            for z, z0, m in zip(inputs, clean, masks):
                loss = loss - self.lam * (m * (z - z0)).pow(2).flatten(1).sum(1)
            return loss

        return loss_fn


@contextmanager
def _operator_inputs(model: nn.Module) -> Iterator[list]:
    """A list whose k-th item is the k-th operator's input at the latest forward pass, while inside."""
    ops = operators(model)
    inputs: list[torch.Tensor | None] = [None] * len(ops)

    def hook(k: int) -> Callable:
        def fn(module, args):
            # an in-place operator overwrites its input, so keep a (differentiable) copy
            inputs[k] = args[0].clone() if getattr(module, "inplace", False) else args[0]

        return fn

    handles = [op.register_forward_pre_hook(hook(k)) for k, op in enumerate(ops)]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()
