"""Square Attack: the score-based black-box attack, immune to gradient masking."""

from __future__ import annotations

import torch

from .base import Attack, require_pyautoattack

__all__ = ["Square", "SquareWarm"]


class Square(Attack):
    """Square Attack (black-box, score-based; pyautoattack's ``SquareAttack``, 5000 queries as in A.3).

    It never looks at gradients, so masking cannot fool it: a gap between it and the white-box attacks is a
    masking symptom.
    """

    name = "square"
    family = "black-box"

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


def _warm_square(base: type) -> type:
    """A subclass of pyautoattack's SquareAttack whose Linf start is a given point instead of random stripes.

    The library draws its start with ``random_choice([n, c, 1, w])`` as a sign pattern times eps; returning
    ``(start - x) / eps`` from that one call starts the search at ``start`` (any point of the ball: every
    later window is set to a vertex and projected as usual).  The rest is the library's search."""

    class WarmSquareAttack(base):
        warm: torch.Tensor | None = None

        def random_choice(self, shape):
            if self.warm is not None:
                start, self.warm = self.warm, None
                return start
            return super().random_choice(shape)

    return WarmSquareAttack


class SquareWarm(Attack):
    """Square started from the candidates of a white-box attack (``start``, default the surrogate-gradient
    margin APGD) instead of from random stripes: the black-box search continues where the gradient
    search stopped, on the real model.  Under L2 the library's start cannot be given a point: Square then
    starts from scratch and a start candidate that already fools the model is kept as it is."""

    name = "square-warm"
    family = "black-box"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, queries: int = 1000, p_init: float = 0.05,
                 start: Attack | None = None) -> None:
        super().__init__(norm=norm, eps=eps)
        self.queries, self.p_init = int(queries), float(p_init)
        self.start = start

    def _rescale(self, factor: int) -> None:
        self.start = self.start.scaled(factor) if self.start is not None else None

    def params(self):
        return {"queries": self.queries, "p_init": self.p_init, "loss": "margin",
                "start": self.start.settings() if self.start is not None else "clean",
                "warm": self.norm == "Linf"}

    def _run(self, model, x, y, seed):
        require_pyautoattack()  # the [eval] extra, with a message naming it when missing
        from pyautoattack.square import SquareAttack

        begin = self.start.run(model, x, y, seed=seed) if self.start is not None else x
        cls = _warm_square(SquareAttack) if self.norm == "Linf" else SquareAttack
        attack = cls(model, norm=self.norm, n_queries=self.queries, eps=self.eps, p_init=self.p_init, n_restarts=1,
                     seed=seed, verbose=False, loss="margin", resc_schedule=False, device=x.device)
        attack.init_hyperparam(x)
        if self.norm == "Linf":
            attack.warm = ((begin - x) / self.eps).clamp(-1, 1)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = attack.attack_single_run(x, y)[1]
            if self.norm != "Linf":  # the start's own breaks count too
                keep = (model(begin).argmax(1) != y).view(-1, *[1] * (x.ndim - 1))
                out = torch.where(keep, begin, out)
        return out
