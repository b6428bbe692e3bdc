"""Standard AutoAttack, run through pyautoattack so a batch gives the reference result for its seed."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .base import Attack, num_classes, require_pyautoattack

__all__ = ["AutoAttackStandard", "keep_tracer"]


@contextlib.contextmanager
def keep_tracer() -> Iterator[None]:
    """AutoAttack's ``check_dynamic`` calls ``sys.settrace(None)``, which would silently switch off a
    debugger or coverage; put the previous tracer back."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


class AutoAttackStandard(Attack):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square in cascade) via ``pyautoattack.AutoAttack``.

    The whole batch goes to ``run_standard_evaluation`` in one chunk, so a run of this class on a batch is the
    reference run on that batch with the same seed. ``steps``/``queries`` other than 100/5000 are a
    non-standard (cheaper) AutoAttack, flagged as such in ``settings()``.
    """

    name = "aa"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, queries: int = 5000) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.queries = int(steps), int(queries)

    def params(self):
        return {"version": "standard", "steps": self.steps, "queries": self.queries,
                "standard": self.steps == 100 and self.queries == 5000}

    def build(self, model: nn.Module, seed: int, device: torch.device | str, n_classes: int) -> Any:
        """The configured ``pyautoattack.AutoAttack`` (also used by the cross-check test)."""
        pa = require_pyautoattack()
        adversary = pa.AutoAttack(model, norm=self.norm, eps=self.eps, seed=seed, version="standard",
                                  device=device)
        adversary.verbose = False
        if self.steps != 100:
            # AutoAttack hard-codes n_iter=100 and APGD derives its step-size schedule in __init__, so the
            # sub-attacks must be rebuilt (mirroring AutoAttack's constructor), not just have n_iter set.
            from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
            from pyautoattack.fab_pt import FABAttack_PT

            common = dict(eps=self.eps, norm=self.norm, seed=seed, device=device)
            adversary.apgd = APGDAttack(model, n_restarts=5, n_iter=self.steps, verbose=False, eot_iter=1,
                                        rho=0.75, logger=adversary.logger, **common)
            adversary.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=self.steps, verbose=False,
                                                          eot_iter=1, rho=0.75, logger=adversary.logger,
                                                          **common)
            adversary.fab = FABAttack_PT(model, n_restarts=5, n_iter=self.steps, verbose=False, **common)
            adversary._set_version("standard")
        adversary.square.n_queries = self.queries
        targets = min(9, n_classes - 1)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        return adversary

    def _run(self, model, x, y, seed):
        from pyautoattack import checks

        adversary = self.build(model, seed, x.device, num_classes(model, x))
        # check_dynamic's call counters are module globals that are never reset: one positive would stick
        # to every later run, so start each run from zero.
        for key in checks.funcs:
            checks.funcs[key] = 0
        with keep_tracer():
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv
