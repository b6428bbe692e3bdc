"""Transfer attack: adversarial examples crafted on the base model, judged on the sparsified one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...core import operators
from .apgd import APGD, APGDTargeted
from .base import Attack

__all__ = ["Transfer", "zero_alphas"]


@contextlib.contextmanager
def zero_alphas(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set every operator's alpha to 0: the band is empty, the operators are the identity and
    the model is its base model."""
    ops = operators(model)
    saved = [op.alpha_value for op in ops]  # the exact Python value, so restoring is bit-identical
    try:
        for op in ops:
            op.set_alpha(0.0)
        yield model
    finally:
        for op, a in zip(ops, saved):
            op.set_alpha(a)


class Transfer(Attack):
    """APGD-CE then APGD-T crafted on the base model, judged on the sparsified model.

    The base model is ``base_model`` when given, else the same model with all alphas 0 for the duration of
    the crafting. Per sample the APGD-CE candidate is kept if it fools the target model, else APGD-T's.
    Our own wrapper (pyautoattack has no transfer mode); the crafting attacks are pyautoattack's.
    """

    name = "transfer"
    family = "transfer"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 steps: int = 100, n_target_classes: int = 9) -> None:
        super().__init__(norm=norm, eps=eps)
        self.base_model = base_model
        self.steps, self.n_target_classes = int(steps), int(n_target_classes)
        self.sources = (APGD(norm=norm, eps=eps, loss="ce", steps=steps),
                        APGDTargeted(norm=norm, eps=eps, steps=steps, n_target_classes=n_target_classes))

    def _rescale(self, factor: int) -> None:
        self.sources = tuple(s.scaled(factor) for s in self.sources)

    def params(self):
        return {"base": "base_model" if self.base_model is not None else "alpha=0",
                "sources": [s.settings() for s in self.sources]}

    def _run(self, model, x, y, seed):
        x_adv = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for source in self.sources:
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            if self.base_model is not None:
                cand = source.run(self.base_model, x[idx], y[idx], seed=seed)
            else:
                with zero_alphas(model):
                    cand = source.run(model, x[idx], y[idx], seed=seed)
            with torch.no_grad():
                fooled = model(cand).argmax(1) != y[idx]
            x_adv[idx[fooled]] = cand[fooled]
            todo[idx[fooled]] = False
        return x_adv
