"""Targeted FAB: pyautoattack's reference implementation with AutoAttack's FAB-T settings."""

from __future__ import annotations

from .base import Attack, num_classes, require_pyautoattack

__all__ = ["FABTargeted"]


class FABTargeted(Attack):
    """Targeted FAB (pyautoattack's ``FABAttack_PT``, AutoAttack's FAB-T settings); targets capped as APGD-T."""

    name = "fab-t"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.restarts = int(steps), int(restarts)
        self.n_target_classes = int(n_target_classes)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)

    def params(self):
        return {"steps": self.steps, "restarts": self.restarts, "n_target_classes": self.n_target_classes,
                "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta}

    def _run(self, model, x, y, seed):
        require_pyautoattack()  # the [eval] extra, with a message naming it when missing
        from pyautoattack.fab_pt import FABAttack_PT

        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        attack = FABAttack_PT(model, norm=self.norm, n_restarts=self.restarts, n_iter=self.steps, eps=self.eps,
                              alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, verbose=False, seed=seed,
                              targeted=True, device=x.device, n_target_classes=targets)
        return attack.perturb(x, y)
