"""The fastest correct path without a flag: ``evaluate`` and the pipeline fuse a MeanSparse model (CPU) or
compile it whole (CUDA) when that pays off (:mod:`meansparse.accel.auto`), run, and leave the model as they
found it.

This sits above both :mod:`meansparse.accel` and :mod:`meansparse.evaluation` so that neither imports the
other.  The decision and its reason go into the report's run metadata (``metadata["run"]["fuse"]``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .accel import fuse as fuse_model
from .accel import fused_sites, unfuse, whole_model_compiled
from .accel.auto import FuseDecision, fuse_decision
from .core import operators
from .evaluation import Attack, Report, build_attack
from .evaluation import evaluate as evaluate_eager
from .evaluation.attacks import options_for
from .evaluation.budget import estimated_passes
from .evaluation.examples import as_examples
from .evaluation.report import RUN_KEY

__all__ = ["evaluate", "plan_fusion", "attack_objects", "fast_path", "WHOLE_MODEL"]

#: ``fuse=WHOLE_MODEL`` asks for the whole model under torch.compile (the default choice on a GPU).
WHOLE_MODEL = "whole-model"

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
    """``fuse``: True / False / "whole-model" force the choice; "auto" / None decide (see
    :mod:`meansparse.accel.auto`)."""
    if fuse is True:
        return FuseDecision(True, "asked for (--fuse / fuse=True)")
    if fuse is False:
        return FuseDecision(False, "asked for the eager operator (--no-fuse / fuse=False)")
    if fuse == WHOLE_MODEL:
        return FuseDecision(False, f"asked for (fuse={WHOLE_MODEL!r})", whole_model=True)
    if fuse not in ("auto", None):
        raise ValueError(f"fuse must be True, False, 'auto' or {WHOLE_MODEL!r}, got {fuse!r}")
    if any(op.learns for op in operators(model)):  # fused kernels would not update the statistics
        return FuseDecision(False, "its operators learn (learn_statistics): the eager operator")
    return fuse_decision(model, example, passes)


@contextlib.contextmanager
def fast_path(model: nn.Module, decision: FuseDecision) -> Iterator[nn.Module]:
    """``model`` on the decided path for the block (fused, or its whole forward compiled), as it was after."""
    if decision.whole_model:
        with whole_model_compiled(model):
            yield model
        return
    fused_here = decision.fuse and not fused_sites(model)
    if fused_here:
        fuse_model(model)
    try:
        yield model
    finally:
        if fused_here:
            unfuse(model)


def evaluate(model: nn.Module, x: Any, y: torch.Tensor | None = None, *args: Any, fuse: bool | str = "auto",
             announce: Callable[[FuseDecision], None] | None = None, **kwargs: Any) -> Report:
    """:func:`meansparse.evaluation.evaluate`, on the fused model (CPU) or the whole model compiled (CUDA)
    when that is faster (``fuse="auto"``, the default; True / False / "whole-model" force it), with the same
    report: on the CPU fused outputs and gradients are bit-identical; compiled ones agree to float rounding.
    ``announce(decision)`` is called before the evaluation starts."""
    bound = inspect.signature(evaluate_eager).bind(model, x, y, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    cost = estimated_passes(attack_objects(a["attacks"], a["attack_options"]), len(x))
    example = x[: a["batch_size"]] if isinstance(x, torch.Tensor) else \
        as_examples(x, y).fetch(range(min(a["batch_size"], len(x))))[0]  # a data set: its first batch
    decision = plan_fusion(model, example, cost, fuse)
    log.info("meansparse: %s: %s", decision.path, decision.reason)
    if announce is not None:
        announce(decision)
    with fast_path(model, decision):
        report = evaluate_eager(*bound.args, **bound.kwargs)
    report.metadata.setdefault(RUN_KEY, {})["fuse"] = decision.as_dict()
    return report
