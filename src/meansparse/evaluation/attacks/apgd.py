"""APGD and targeted APGD: pyautoattack's reference implementations with AutoAttack's settings."""

from __future__ import annotations

import logging

from .base import LIBRARY_LOGGER, Attack, num_classes, require_pyautoattack

__all__ = ["APGD", "APGDTargeted"]


class APGD(Attack):
    """APGD with the CE or DLR loss (pyautoattack's ``APGDAttack``, AutoAttack's settings)."""

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, loss: str = "ce", steps: int = 100,
                 restarts: int = 1, rho: float = 0.75) -> None:
        super().__init__(norm=norm, eps=eps)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"APGD loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss = loss
        self.name = f"apgd-{loss}"
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)

    def params(self):
        return {"loss": self.loss, "steps": self.steps, "restarts": self.restarts, "rho": self.rho}

    def _run(self, model, x, y, seed):
        require_pyautoattack()  # the [eval] extra, with a message naming it when missing
        from pyautoattack.autopgd_base import APGDAttack

        attack = APGDAttack(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts, eps=self.eps,
                            seed=seed, loss=self.loss, eot_iter=1, rho=self.rho, verbose=False,
                            device=x.device, logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)


class APGDTargeted(Attack):
    """APGD on the targeted DLR loss over the top ``n_target_classes`` wrong classes (AutoAttack's APGD-T).

    ``n_target_classes`` is capped at (classes - 1): pyautoattack would index past the logits otherwise.
    """

    name = "apgd-t"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)
        self.n_target_classes = int(n_target_classes)

    def params(self):
        return {"steps": self.steps, "restarts": self.restarts, "n_target_classes": self.n_target_classes,
                "rho": self.rho}

    def _run(self, model, x, y, seed):
        require_pyautoattack()  # the [eval] extra, with a message naming it when missing
        from pyautoattack.autopgd_base import APGDAttack_targeted

        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        attack = APGDAttack_targeted(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts,
                                     eps=self.eps, seed=seed, eot_iter=1, rho=self.rho, n_target_classes=targets,
                                     verbose=False, device=x.device, logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)
