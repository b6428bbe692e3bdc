"""Square Attack: the score-based black-box attack, immune to gradient masking."""

from __future__ import annotations

import torch

from .base import Attack, require_pyautoattack

__all__ = ["Square"]


class Square(Attack):
    """Square Attack (black-box, score-based; pyautoattack's ``SquareAttack``, 5000 queries as in A.3).

    It never looks at gradients, so masking cannot fool it: a gap between it and the white-box attacks is a
    masking symptom.
    """

    name = "square"
    kind = "black-box"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, queries: int = 5000, p_init: float = 0.8,
                 restarts: int = 1) -> None:
        super().__init__(norm=norm, eps=eps)
        self.queries, self.p_init, self.restarts = int(queries), float(p_init), int(restarts)

    def params(self):
        return {"queries": self.queries, "p_init": self.p_init, "restarts": self.restarts, "loss": "margin"}

    def _run(self, model, x, y, seed):
        require_pyautoattack()  # the [eval] extra, with a message naming it when missing
        from pyautoattack.square import SquareAttack

        attack = SquareAttack(model, norm=self.norm, n_queries=self.queries, eps=self.eps, p_init=self.p_init,
                              n_restarts=self.restarts, seed=seed, verbose=False, loss="margin",
                              resc_schedule=False, device=x.device)
        with torch.no_grad():
            return attack.perturb(x, y)
