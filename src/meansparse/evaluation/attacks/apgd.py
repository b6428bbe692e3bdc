"""APGD and targeted APGD: pyautoattack's reference implementations with AutoAttack's settings.

``loss="margin"`` swaps DLR's normalised margin for the plain (Carlini-Wagner) logit margin, the loss the
MeanSparse-aware attacks use most (:mod:`.surrogate`); the library has no such loss, so its DLR method is
overridden in a subclass and everything else (step sizes, restarts, checkpoints) stays the library's.
"""

from __future__ import annotations

import logging

from .base import LIBRARY_LOGGER, Attack, num_classes, require_pyautoattack

__all__ = ["APGD", "APGDTargeted", "margin_loss"]


def margin_loss(logits, y, target=None):
    """Per example: the largest wrong logit (or the ``target``'s) minus the true one (> 0: misclassified)."""
    true = logits.gather(1, y[:, None])[:, 0]
    if target is not None:
        return logits.gather(1, target[:, None])[:, 0] - true
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) - true


def _library_class(targeted: bool, loss: str):
    """pyautoattack's APGD class for ``loss``; for "margin" a subclass whose DLR methods return the margin."""
    require_pyautoattack()  # the [eval] extra, with a message naming it when missing
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    base = APGDAttack_targeted if targeted else APGDAttack
    if loss != "margin":
        return base
    if targeted:
        return type("MarginAPGDTargeted", (base,), {
            "dlr_loss_targeted": lambda self, x, y: margin_loss(x, y, self.y_target)})
    return type("MarginAPGD", (base,), {"dlr_loss": lambda self, x, y: margin_loss(x, y)})


class APGD(Attack):
    """APGD with the CE or DLR loss (pyautoattack's ``APGDAttack``, AutoAttack's settings)."""

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, loss: str = "ce", steps: int = 100,
                 restarts: int = 1, rho: float = 0.75) -> None:
        super().__init__(norm=norm, eps=eps)
        if loss not in ("ce", "dlr", "margin"):
            raise ValueError(f"APGD loss must be 'ce', 'dlr' or 'margin', got {loss!r}")
        self.loss = loss
        self.name = f"apgd-{loss}"
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)

    def params(self):
        return {"loss": self.loss, "steps": self.steps, "restarts": self.restarts, "rho": self.rho}

    def _run(self, model, x, y, seed):
        cls = _library_class(False, self.loss)
        attack = cls(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts, eps=self.eps,
                     seed=seed, loss="dlr" if self.loss == "margin" else self.loss, eot_iter=1, rho=self.rho,
                     verbose=False, device=x.device, logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)


class APGDTargeted(Attack):
    """APGD on the targeted DLR loss over the top ``n_target_classes`` wrong classes (AutoAttack's APGD-T);
    ``loss="margin"`` (``apgd-mt``): the targeted logit margin instead.

    ``n_target_classes`` is capped at (classes - 1): pyautoattack would index past the logits otherwise.
    """

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75, loss: str = "dlr") -> None:
        super().__init__(norm=norm, eps=eps)
        if loss not in ("dlr", "margin"):
            raise ValueError(f"targeted APGD loss must be 'dlr' or 'margin', got {loss!r}")
        self.loss = loss
        self.name = "apgd-t" if loss == "dlr" else "apgd-mt"
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)
        self.n_target_classes = int(n_target_classes)

    def params(self):
        out = {"steps": self.steps, "restarts": self.restarts, "n_target_classes": self.n_target_classes,
               "rho": self.rho}
        return out if self.loss == "dlr" else {**out, "loss": self.loss}

    def _run(self, model, x, y, seed):
        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        cls = _library_class(True, self.loss)
        attack = cls(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts, eps=self.eps, seed=seed,
                     eot_iter=1, rho=self.rho, n_target_classes=targets, verbose=False, device=x.device,
                     logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)
