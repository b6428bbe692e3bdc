"""``evaluate``: the robustness evaluation (``run_evaluation``) plus, when asked, the sanity checks on it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from .._utils import frozen_parameters
from ..core import operators
from ..distributed import broadcast_object
from ..distributed import rank as dist_rank
from .examples import as_examples
from .indicators import INDICATOR_PROBE_N, attack_failure_indicators
from .report import RUN_KEY, Report
from .runner import run_evaluation
from .sanity import sanity_checks
from .spec import EvaluationSpec, resolve_spec
from .validation import evaluation_device

__all__ = ["add_indicators", "add_sanity_findings", "evaluate", "sanity_attacks"]


def sanity_attacks(model: nn.Module, sanity: bool | Sequence[str]) -> list[str]:
    """The attacks ``sanity`` asks to check: APGD-CE, plus BPDA-APGD-CE on a model with MeanSparse
    operators (``True``), or the names given."""
    if not isinstance(sanity, bool):
        return list(sanity)
    return ["apgd-ce", "bpda-apgd-ce"] if operators(model) else ["apgd-ce"]


def add_sanity_findings(report: Report, model: nn.Module, x: Any, y: Any, names: Sequence[str],
                        spec: EvaluationSpec) -> None:
    """Run ``sanity_checks`` for each attack in ``names`` with ``spec``'s threat model, seed, batch size, device
    and attack options, and add its findings to ``report`` (failures also as warnings). Under
    torch.distributed rank 0 runs the checks and shares the findings."""
    for name in names:
        found = None
        if dist_rank() == 0:
            findings = sanity_checks(model, x, y, spec, attack=name)
            found = ([f.to_dict() for f in findings],
                     [f"sanity check failed: {f.check}: {f.message}" for f in findings if not f.passed])
        dicts, failed = broadcast_object(found)
        report.sanity += dicts
        report.warnings += failed


def add_indicators(report: Report, model: nn.Module, examples: Any, *, base_model: nn.Module | None, seed: int,
                   device: torch.device, n: int = INDICATOR_PROBE_N) -> None:
    """The attack-failure indicators on the first ``n`` clean-correct examples; each failed one becomes a
    warning.  Under torch.distributed rank 0 computes them and shares the result."""
    found = None
    if dist_rank() == 0:
        idx = [i for i, ok in enumerate(report.clean_correct) if ok][:n]
        if idx:
            (xb, yb), = list(examples.batches([idx]))
        else:
            xb, yb = torch.empty(0), torch.empty(0, dtype=torch.long)
        counted = torch.tensor([report.worst_case_robust[i] for i in idx], dtype=torch.bool)
        found = attack_failure_indicators(model, xb.to(device), yb.to(device), counted, eps=report.eps,
                                          norm=report.norm, base_model=base_model, seed=seed)
    report.indicators = broadcast_object(found)
    report.warnings += [f"attack-failure indicator failed: {i['name']}: {i['value']} ({i['detail']})"
                        for i in report.indicators if i["verdict"] == "FAIL"]


def evaluate(model: nn.Module, x: Any, y: torch.Tensor | None = None, spec: EvaluationSpec | None = None, *,
             base_model: nn.Module | None = None, state_path: str | PathLike | None = None, progress: bool = True,
             callback: Callable[[str, int], None] | None = None, adversarial_dir: str | PathLike | None = None,
             **settings: Any) -> Report:
    """Per-example worst-case robust accuracy of ``model`` on (x, y) under ``spec``, the model run as it is
    (``ms.evaluate`` also picks the fast path, ``spec.path``).

    ``spec``: an :class:`EvaluationSpec` (threat model, attacks and options, mode, ladder, indicators, sanity
    checks, seed, batch size, workers, device); keyword ``settings`` build one (``eps=8/255, attacks=[...]``,
    ``individual=False`` for ``mode="cascade"``) or replace fields of the one given.
    ``x``: float NCHW in [0, 1]; ``y``: integer labels; the model must be in eval mode and return logits.
    Or ``x``: a sized data set of ``(image, label)`` by index (a ``torch.utils.data.Dataset``, a
    ``meansparse.data`` stream) and ``y`` None: only the batches being worked on are fetched (decoded in
    ``spec.workers`` DataLoader processes when > 0), each validated before it counts; the state file's data
    hash is then computed example by example during the clean pass.
    ``base_model``: the model without MeanSparse, the source of the transfer attack.
    ``state_path``: JSON file with per-batch results; a rerun with the same path skips finished batches and
    gives the same report.
    ``callback(attack, batch)`` runs after every newly computed batch has been saved.
    ``adversarial_dir``: write the per-example worst-case adversarial images there (``adversarial.pt`` in
    RobustBench's external-evaluation format, ``adversarial.json``; :mod:`meansparse.evaluation.adversarial`);
    with ``state_path`` the breaking candidates are kept per batch under it, so a resumed run has them too.
    The report's ``converged`` and ``indicators`` come from the ladder and the indicators; failed sanity
    checks and indicators are also warnings.
    """
    started = time.perf_counter()
    spec = resolve_spec(spec, settings)
    report = run_evaluation(model, x, y, spec, base_model=base_model, state_path=state_path, progress=progress,
                            callback=callback, adversarial_dir=adversarial_dir)
    name = getattr(x, "name", None)  # a meansparse stream (ImageStream) says which data set it is
    if isinstance(name, str) and name:
        report.metadata.setdefault("data", {"name": name, "n": len(x)})
    examples = as_examples(x, y, spec.workers)  # the examples that were evaluated (CPU tensors, or the data set)
    if spec.indicators:
        with frozen_parameters(model, base_model):
            add_indicators(report, model, examples, base_model=base_model, seed=spec.seed,
                           device=evaluation_device(model, spec.device))
    if spec.sanity:
        add_sanity_findings(report, model, examples, None, sanity_attacks(model, spec.sanity), spec)
    report.metadata[RUN_KEY]["wall_time_s"] = time.perf_counter() - started  # the checks are part of the run
    return report
