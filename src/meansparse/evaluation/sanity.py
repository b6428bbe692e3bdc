"""Checks on the evaluation itself (Carlini et al.'s basic checklist): a working attack drives accuracy to
about 0 % at a huge eps, and accuracy never rises when eps or the attack budget grows. A failure means the
attack, not the model, is the weak part: typically gradient masking."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .attacks import build_attack, options_for, split_wrapper
from .attacks.registry import WRAPPER_OPTIONS
from .examples import as_examples
from .runner import run_evaluation
from .spec import EvaluationSpec, resolve_spec
from .validation import vacuous_eps

__all__ = ["SanityFinding", "large_eps", "sanity_checks"]


@dataclass
class SanityFinding:
    """The outcome of one check; ``passed`` False means the attack, not the model, is suspect."""

    check: str
    passed: bool
    message: str
    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def large_eps(norm: str, x: Any) -> float:
    """An eps that contains the whole [0, 1] box: any image is reachable, so accuracy must be ~0.  ``x``: the
    images, or any example source / data set of them (one example is fetched)."""
    if norm == "Linf":
        return 1.0
    first = x[0] if isinstance(x, torch.Tensor) else as_examples(x).first()[0][0]
    return math.sqrt(first.numel())


def _budget_key(attack: str) -> str | None:
    base = split_wrapper(attack)[1]
    if base == "clean":
        return None
    return "queries" if base.startswith("square") else "steps"


def _monotone(check: str, title: str, key: str, shown: list[str], keys: list[str], accs: list[float],
              xs: list, tolerance: float) -> SanityFinding:
    """Accuracy must not rise (by more than ``tolerance``) as the attack gets stronger along ``xs``."""
    rises = [(xs[i], xs[i + 1]) for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tolerance]
    return SanityFinding(
        check, not rises,
        f"{title}: " + ", ".join(f"{label}: {100 * v:.1f} %" for label, v in zip(shown, accs))
        + ("" if not rises else f"; rises between {rises}"),
        {f"{key}={k}": v for k, v in zip(keys, accs)})


def sanity_checks(model: nn.Module, x: Any, y: Any = None, spec: EvaluationSpec | None = None, *,
                  attack: str = "apgd-ce", eps_factors: Sequence[float] = (0.5, 1.0, 2.0),
                  budgets: Sequence[int] | None = None, huge_eps: float | None = None, zero_tolerance: float = 0.02,
                  tolerance: float = 0.01, **settings: Any) -> list[SanityFinding]:
    """Run ``attack`` at several eps and budgets; one finding per check (``passed`` False = suspicious).

    - ``eps-meaningful`` (only when it fails): ``eps`` covers the whole box, so every check is vacuous;
    - ``huge-eps``: accuracy at ``huge_eps`` (default: the whole box) must be <= ``zero_tolerance``;
    - ``eps-monotone``: accuracy at ``eps * eps_factors`` must not rise by more than ``tolerance``;
    - ``budget-monotone``: accuracy with ``budgets`` steps (queries for Square; default: a fifth of the
      configured budget, then the full one) must not rise by more than ``tolerance``.

    ``spec`` (or keyword ``settings``, as for ``evaluate``): the threat model, seed, batch size, device,
    workers and the attack options ``attack`` runs with; its attacks, mode, ladder and indicators are not
    used (each check is one attack, individual, one rung).  ``x, y`` as for ``evaluate`` (tensors, or a data
    set of (image, label) with ``y`` None).
    """
    spec = resolve_spec(spec, settings)
    norm, eps = spec.norm, spec.eps
    key = _budget_key(attack)
    if key is None:
        raise ValueError(f"sanity checks need a real attack, not {attack!r}")
    base_opts = options_for(attack, dict(spec.attack_options))
    if budgets is None:
        inner_opts = {k: v for k, v in base_opts.items() if k not in WRAPPER_OPTIONS}
        default = getattr(build_attack(split_wrapper(attack)[1], norm=norm, eps=eps, **inner_opts), key)
        budgets = sorted({max(1, default // 5), default})
    cache: dict[tuple[float, int | None], float] = {}

    def acc(e: float, budget: int | None = None) -> float:
        if (e, budget) not in cache:
            opts = dict(base_opts)
            if budget is not None:
                opts[key] = budget
            check = spec.replace(eps=e, attacks=(attack,), attack_options={attack: opts}, mode="individual",
                                 ladder=False, indicators=False, sanity=False)
            r = run_evaluation(model, x, y, check, progress=False)
            cache[(e, budget)] = r.robust_accuracy[attack]
        return cache[(e, budget)]

    findings = []
    if y is None:
        x = as_examples(x, None, spec.workers)  # wrapped once: every check below streams the same examples
    vacuous = vacuous_eps(norm, eps, x if isinstance(x, torch.Tensor) else x.first()[0])
    if vacuous:  # every check below would pass trivially: accuracy is ~0 at this eps whatever the attack
        findings.append(SanityFinding("eps-meaningful", False, vacuous, {"eps": eps}))
    big = huge_eps if huge_eps is not None else large_eps(norm, x)
    a = acc(big)
    findings.append(SanityFinding(
        "huge-eps", a <= zero_tolerance,
        f"{attack} at eps={big:.4g} leaves {100 * a:.1f} % accuracy (must be ~0 %"
        + ("" if a <= zero_tolerance else "; the attack cannot even reach inputs that are certainly wrong") + ")",
        {"eps": big, "accuracy": a}))

    epss = sorted(eps * f for f in eps_factors)
    findings.append(_monotone("eps-monotone", f"{attack} accuracy by eps", "eps", [f"{e:.4g}" for e in epss],
                              [f"{e:.6g}" for e in epss], [acc(e) for e in epss], epss, tolerance))
    budgets = sorted(int(b) for b in budgets)
    findings.append(_monotone("budget-monotone", f"{attack} accuracy by {key}", key, [str(b) for b in budgets],
                              [str(b) for b in budgets], [acc(eps, b) for b in budgets], budgets, tolerance))
    return findings
