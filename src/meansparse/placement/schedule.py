"""α over training steps: a small object the training loop steps, whose position is saved with the run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..core import check_alpha
from .sites import set_alpha

__all__ = ["AlphaSchedule", "SCHEDULES", "parse_alpha_schedule"]

SCHEDULES = ("constant", "linear", "cosine")


class AlphaSchedule:
    """α at step t: ``max_alpha`` times 1 (constant), ``t / steps`` (linear warm-up from 0) or
    ``(1 - cos(pi t / steps)) / 2`` (cosine warm-up), held at ``max_alpha`` after ``steps``.

    ``max_alpha`` is one number (every site) or a mapping site name / index -> α (per site, same shape).
    The loop calls :meth:`apply` before each step and :meth:`step` after it; :meth:`state_dict` holds the
    position, so a resumed run continues the same curve."""

    def __init__(self, kind: str = "constant", max_alpha: float | Mapping[str | int, float] = 0.0,
                 steps: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown α schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
        if isinstance(max_alpha, Mapping):
            self.max_alpha: float | dict[str | int, float] = {k: check_alpha(v) for k, v in max_alpha.items()}
        else:
            self.max_alpha = check_alpha(max_alpha)
        if int(steps) < 0 or (kind != "constant" and int(steps) < 1):
            raise ValueError(f"an α schedule {kind!r} needs steps >= 1, got {steps}")
        self.kind, self.steps, self.position = kind, int(steps), 0

    def factor(self, position: int | None = None) -> float:
        """The fraction of ``max_alpha`` at ``position`` (default: the current step)."""
        t = self.position if position is None else position
        if self.kind == "constant" or t >= self.steps:
            return 1.0
        u = t / self.steps
        return u if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * u))

    def alpha(self, position: int | None = None) -> float | dict[str | int, float]:
        """α (or α per site) at ``position``."""
        f = self.factor(position)
        if isinstance(self.max_alpha, dict):
            return {k: v * f for k, v in self.max_alpha.items()}
        return self.max_alpha * f

    def apply(self, model: nn.Module) -> nn.Module:
        """Set the current α on ``model``'s operators."""
        return set_alpha(model, self.alpha())

    def step(self) -> None:
        """Advance one training step."""
        self.position += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "position": self.position,
                "max_alpha": self.max_alpha if not isinstance(self.max_alpha, dict)
                else {str(k): v for k, v in self.max_alpha.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position; a ValueError when the saved schedule is another one."""
        mine = self.state_dict()
        differs = [k for k in ("kind", "steps", "max_alpha") if state.get(k) != mine[k]]
        if differs:
            raise ValueError(f"saved α schedule differs in {', '.join(differs)}: {dict(state)} vs {mine}")
        self.position = int(state["position"])

    def __repr__(self) -> str:
        return f"AlphaSchedule({self.kind!r}, max_alpha={self.max_alpha}, steps={self.steps}, at={self.position})"


def parse_alpha_schedule(text: str) -> tuple[str, float]:
    """``constant``, ``linear:E`` or ``cosine:E`` -> (kind, E epochs of warm-up); a ValueError otherwise."""
    kind, _, length = text.partition(":")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown α schedule {text!r}: use constant, linear:EPOCHS or cosine:EPOCHS")
    if kind == "constant":
        if length:
            raise ValueError(f"α schedule 'constant' takes no length, got {text!r}")
        return kind, 0.0
    try:
        epochs = float(length)
    except ValueError:
        epochs = -1.0
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"α schedule {text!r}: give the warm-up in epochs > 0, e.g. {kind}:5")
    return kind, epochs
