"""The fastest correct path without a flag: ``ms.evaluate`` (and the α search) run a MeanSparse model on its
execution path, fused operator + activation kernels (CPU) or the whole model compiled (CUDA) when that pays
off (:mod:`meansparse.accel.auto` decides), and leave the model as they found it.

The path is one value, ``EvaluationSpec.path``: "auto", "eager", "fused" or "compiled".  This module sits above
both :mod:`meansparse.accel` and :mod:`meansparse.evaluation` so that neither imports the other.  The decision
and its reason go into the report's run metadata (``metadata["run"]["execution"]``; ``["fuse"]`` keeps the
record's older shape).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from os import PathLike
from typing import Any

import torch
from torch import nn

from ._utils import warn_at_caller
from .accel import fuse as fuse_model
from .accel import fused_sites, unfuse, whole_model_compiled
from .accel.auto import PathDecision, decide_path
from .core import operators
from .evaluation import EvaluationSpec, Report
from .evaluation import evaluate as evaluate_as_is
from .evaluation.examples import as_examples
from .evaluation.report import RUN_KEY
from .evaluation.spec import check_path, resolve_spec

__all__ = ["choose_path", "evaluate", "first_batch", "on_path", "record_path"]

log = logging.getLogger(__name__)

#: ``fuse=`` of ``ms.evaluate`` before the path was one value, and the path each value meant
_LEGACY_FUSE = {True: "fused", False: "eager", "whole-model": "compiled", "auto": "auto", None: "auto"}


def choose_path(model: nn.Module, example: torch.Tensor, passes: float, path: str = "auto", *,
                other_passes: float = 0.0, alpha_varies: bool = False) -> PathDecision:
    """The path ``model`` runs: ``path`` "eager" / "fused" / "compiled" forces it, "auto" decides for a job of
    ``passes`` forward + backward passes over single examples (``other_passes``: the rest of the job, see
    :func:`meansparse.accel.auto.decide_path`).  ``alpha_varies`` (a sweep): every α would recompile the whole
    model, so the compiled path becomes the eager one."""
    check_path(path)
    if path != "auto":
        decision = PathDecision(path, f"asked for{' the eager operator' if path == 'eager' else ''} (path={path!r})")
    elif any(op.learns for op in operators(model)):  # fused kernels would not update the statistics
        decision = PathDecision("eager", "its operators learn (learn_statistics): the eager operator")
    else:
        decision = decide_path(model, example, passes, other_passes)
    if alpha_varies and decision.path == "compiled":
        decision = PathDecision("eager", "the sweep changes α between passes (each would recompile the whole model)")
    return decision


@contextlib.contextmanager
def on_path(model: nn.Module, decision: PathDecision) -> Iterator[nn.Module]:
    """``model`` on the decided path for the block (fused, or its whole forward compiled), as it was after.
    The eager path leaves the model as it is (a model fused by hand stays fused)."""
    if decision.path == "compiled":
        with whole_model_compiled(model):
            yield model
        return
    fused_here = decision.path == "fused" and not fused_sites(model)
    if fused_here:
        fuse_model(model)
    try:
        yield model
    finally:
        if fused_here:
            unfuse(model)


def first_batch(x: Any, y: Any, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` images of an evaluation's examples (tensors, or a data set): what a path
    decision times."""
    if isinstance(x, torch.Tensor):
        return x[:batch_size]
    return as_examples(x, y).fetch(range(min(batch_size, len(x))))[0]


def record_path(report: Report, decision: PathDecision) -> None:
    """The path a report's evaluation ran, in its run metadata (the new record and the older shape)."""
    run = report.metadata.setdefault(RUN_KEY, {})
    run["execution"] = decision.as_dict()
    run["fuse"] = decision.legacy_dict()


def _legacy_fuse(settings: dict[str, Any]) -> None:
    """``fuse=True / False / "whole-model" / "auto"``, the keyword before ``path``: mapped, with a warning."""
    if "fuse" not in settings:
        return
    fuse = settings.pop("fuse")
    if "path" in settings:
        raise TypeError("give path or fuse, not both (fuse is the older name of path)")
    if not isinstance(fuse, (bool, str, type(None))) or fuse not in _LEGACY_FUSE:
        raise ValueError(f"fuse must be True, False, 'auto' or 'whole-model', got {fuse!r}")
    warn_at_caller(f"ms.evaluate(fuse={fuse!r}) is path={_LEGACY_FUSE[fuse]!r} now", DeprecationWarning)
    settings["path"] = _LEGACY_FUSE[fuse]


def evaluate(model: nn.Module, x: Any, y: torch.Tensor | None = None, spec: EvaluationSpec | None = None, *,
             base_model: nn.Module | None = None, state_path: str | PathLike | None = None, progress: bool = True,
             callback: Callable[[str, int], None] | None = None, adversarial_dir: str | PathLike | None = None,
             announce: Callable[[PathDecision], None] | None = None, other_passes: float = 0.0,
             **settings: Any) -> Report:
    """:func:`meansparse.evaluation.evaluate` on ``spec.path``: "auto" (the default) runs the fused model (CPU)
    or the whole model compiled (CUDA) when that is faster, "eager" / "fused" / "compiled" force a path.  The
    report is the same: on the CPU fused outputs and gradients are bit-identical; compiled ones agree to float
    rounding.  ``announce(decision)`` is called before the evaluation starts; ``other_passes`` (forward +
    backward passes over single examples) is the rest of a job the fused kernels would also serve (an α
    sweep before this evaluation), which "auto" weighs too.  The other arguments are ``evaluate``'s."""
    _legacy_fuse(settings)
    spec = resolve_spec(spec, settings)
    example = first_batch(x, y, spec.batch_size)
    decision = choose_path(model, example, spec.estimated_passes(len(x)), spec.path, other_passes=other_passes)
    log.info("meansparse: %s: %s", decision.description, decision.reason)
    if announce is not None:
        announce(decision)
    with on_path(model, decision):
        report = evaluate_as_is(model, x, y, spec, base_model=base_model, state_path=state_path, progress=progress,
                                callback=callback, adversarial_dir=adversarial_dir)
    record_path(report, decision)
    return report
