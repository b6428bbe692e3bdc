"""The fastest correct path without a flag: ``evaluate`` and the pipeline fuse a MeanSparse model when that
pays off (:mod:`meansparse.accel.auto`), run, and leave the model as they found it.

This sits above both :mod:`meansparse.accel` and :mod:`meansparse.evaluation` so that neither imports the
other.  The decision and its reason go into the report's run metadata (``metadata["run"]["fuse"]``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .accel import fuse as fuse_model
from .accel import unfuse
from .accel.auto import FuseDecision, fuse_decision
from .core import operators
from .evaluation import Attack, Report, build_attack
from .evaluation import evaluate as evaluate_eager
from .evaluation.attacks import options_for
from .evaluation.budget import estimated_passes
from .evaluation.examples import as_examples
from .evaluation.report import RUN_KEY

__all__ = ["evaluate", "plan_fusion", "attack_objects"]

log = logging.getLogger(__name__)


def attack_objects(attacks: Sequence[str | Attack] | str,
                   attack_options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Attack]:
    """The attacks an evaluation would build (for estimating its cost; unknown names are left to it)."""
    out = []
    for a in [attacks] if isinstance(attacks, str) else attacks:
        if isinstance(a, Attack):
            out.append(a)
            continue
        opts = options_for(a, attack_options)
        try:
            out.append(build_attack(a, **opts))
        except ValueError:
            continue
    return out


def plan_fusion(model: nn.Module, example: torch.Tensor, passes: float, fuse: bool | str | None = "auto"
                ) -> FuseDecision:
    """``fuse``: True / False force the choice; "auto" / None decide (see :mod:`meansparse.accel.auto`)."""
    if fuse is True:
        return FuseDecision(True, "asked for (--fuse / fuse=True)")
    if fuse is False:
        return FuseDecision(False, "asked for the eager operator (--no-fuse / fuse=False)")
    return fuse_decision(model, example, passes)


def evaluate(model: nn.Module, x: Any, y: torch.Tensor | None = None, *args: Any, fuse: bool | str = "auto",
             announce: Callable[[FuseDecision], None] | None = None, **kwargs: Any) -> Report:
    """:func:`meansparse.evaluation.evaluate`, on the fused model when that is faster (``fuse="auto"``, the
    default; True / False force it), with the same report: on the CPU fused outputs and gradients are
    bit-identical.  ``announce(decision)`` is called before the evaluation starts."""
    bound = inspect.signature(evaluate_eager).bind(model, x, y, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    cost = estimated_passes(attack_objects(a["attacks"], a["attack_options"]), len(x))
    example = x[: a["batch_size"]] if isinstance(x, torch.Tensor) else \
        as_examples(x, y).fetch(range(min(a["batch_size"], len(x))))[0]  # a data set: its first batch
    decision = plan_fusion(model, example, cost, fuse)
    log.info("meansparse: %s operator: %s", "fused" if decision.fuse else "eager", decision.reason)
    if announce is not None:
        announce(decision)
    fused_here = decision.fuse and not any(op.fused_activation is not None for op in operators(model))
    if fused_here:
        fuse_model(model)
    try:
        report = evaluate_eager(*bound.args, **bound.kwargs)
    finally:
        if fused_here:
            unfuse(model)
    report.metadata.setdefault(RUN_KEY, {})["fuse"] = decision.as_dict()
    return report
