"""What the main job (:mod:`meansparse.pipeline`) writes and prints: the α sweep's files and curve, the
before/after table, ``summary.json``, ``report.md`` and the console lines.  The orchestration measures; this
module only presents what it measured (:class:`Outcome`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from .accel.auto import PathDecision
from .core import operators
from .data import first_images
from .evaluation import Report
from .plots import plot_alpha_curve, plot_feature_histogram
from .search import AlphaSearchResult

__all__ = ["Comparison", "Counts", "Outcome", "console", "draw_plots", "print_outcome", "report_markdown",
           "summary", "table", "write_outputs", "write_sweep"]


def console(progress: bool) -> Callable[..., None]:
    """``print`` when the job shows its progress, else a function that prints nothing."""
    return print if progress else (lambda *a, **k: None)


class Comparison(NamedTuple):
    """The two rows of the before/after table, the path they ran (the MeanSparse row's decision, which the base
    row followed) and the attacks' budgets in words (the same for both rows)."""

    before: Report
    after: Report
    execution: PathDecision
    budgets: dict[str, str]


class Counts(NamedTuple):
    """How many images each split held, how many the calibration saw, and the MeanSparse sites."""

    fit: int
    calibration: int
    holdout: int
    test: int
    sites: int


@dataclass(frozen=True)
class Outcome:
    """What one demo run measured: ``cfg`` (its ``PipelineConfig``, as given) and ``eps`` (resolved), the
    sweep, the chosen α and the α the table shows (the best α > 0 when α = 0 is chosen), the comparison, the
    counts, the plots written and the run's seconds."""

    cfg: Any
    eps: float
    sweep: AlphaSearchResult
    alpha: Any
    shown: Any
    comparison: Comparison
    counts: Counts
    plots: dict[str, str]
    seconds: float


def write_sweep(sweep: AlphaSearchResult, out: Path, *, data: str, norm: str, eps: float,
                say: Callable[..., None]) -> None:
    """sweep.json, sweep.md (also printed) and alpha_curve.png (skipped, with a line, without matplotlib)."""
    (out / "sweep.json").write_text(sweep.to_json())
    (out / "sweep.md").write_text(sweep.to_markdown())
    say(sweep.to_markdown())
    try:
        plot_alpha_curve(sweep.rows, out / "alpha_curve.png", chosen=float(sweep.chosen["alpha"]),
                         naive=float(sweep.naive["alpha"]), n_clean=sweep.n_clean, n_robust=sweep.n_robust,
                         title=f"{data}: α sweep ({norm} ε={eps:.4g})\nrobust on {sweep.n_robust} / "
                               f"clean on {sweep.n_clean} held-out images")
    except ImportError as e:
        say(f"(plot skipped: {e})")


def draw_plots(model: nn.Module, test: Any, out: Path, say: Callable[..., None]) -> dict[str, str]:
    """The figures of the report (the α curve, if the sweep drew it, and the feature histogram of the first
    site on 256 test images): name -> file under ``out``."""
    plots = {"alpha_curve": "alpha_curve.png"} if (out / "alpha_curve.png").exists() else {}
    try:
        op = operators(model)[0]
        plots["feature_histogram"] = plot_feature_histogram(model, op, first_images(test, 256),
                                                            out / "feature_histogram.png").name
    except ImportError as e:
        say(f"(plots skipped: {e})")
    return plots


def table(before: Report, after: Report) -> str:
    """The before/after table: clean, each attack and the worst case, in %."""
    names = list(dict.fromkeys([*before.robust_accuracy, *after.robust_accuracy]))
    lines = ["| | clean % | " + " | ".join(f"{n} %" for n in names) + " | **worst case %** |",
             "|---|---:|" + "---:|" * len(names) + "---:|"]
    for label, r in (("base model", before), ("+ MeanSparse", after)):
        cells = [f"{100 * r.robust_accuracy[n]:.2f}" if n in r.robust_accuracy else "–" for n in names]
        lines.append(f"| {label} | {100 * r.clean_accuracy:.2f} | " + " | ".join(cells)
                     + f" | **{100 * r.worst_case_accuracy:.2f}** |")
    return "\n".join(lines)


def summary(o: Outcome) -> dict[str, Any]:
    """``summary.json``: the job's numbers and facts (``fuse`` is the path record's older shape, kept for its
    readers; ``execution`` the record itself)."""
    cfg, (before, after, execution, budgets) = o.cfg, o.comparison
    return {
        "data": cfg.data, "model": cfg.model or "small_cnn trained by the demo", "eps": o.eps, "norm": cfg.norm,
        "alpha": o.alpha, "alpha_evaluated": o.shown, "plain_attack_choice": o.sweep.naive["alpha"],
        "n_test": o.counts.test, "attacks": list(cfg.attacks), "attack_budgets": budgets,
        "same_attacks_both_rows": True, "calibration_images": o.counts.calibration, "n_holdout": o.counts.holdout,
        "n_sweep_robust": o.sweep.n_robust,
        "before": {"clean": before.clean_accuracy, "worst_case": before.worst_case_accuracy,
                   "robust": before.robust_accuracy},
        "after": {"clean": after.clean_accuracy, "worst_case": after.worst_case_accuracy,
                  "robust": after.robust_accuracy},
        "warnings": after.warnings, "base_warnings": before.warnings, "seconds": o.seconds, "plots": o.plots,
        "device": cfg.device, "fuse": execution.legacy_dict(), "execution": execution.as_dict(),
    }


def _facts(o: Outcome) -> list[str]:
    """The report's opening list: model, threat model, data and splits, the choice of α, the path."""
    cfg, n, sweep, execution = o.cfg, o.counts, o.sweep, o.comparison.execution
    return [
        f"- model: {cfg.model or 'small_cnn trained by the demo'}", f"- threat model: {cfg.norm}, ε = {o.eps:.4g}",
        f"- data: {cfg.data}; sites: {n.sites}; calibration on {n.calibration} of {n.fit} training images"
        + (f" ({cfg.calibration_batches} batches of {cfg.batch_size})" if n.calibration < n.fit else "")
        + f"; α chosen on {n.holdout} held-out training images (clean accuracy on all {sweep.n_clean}, robust "
        f"accuracy on the first {sweep.n_robust}; never the test split)",
        f"- chosen α = {o.alpha if isinstance(o.alpha, float) else 'per-layer'} (worst case within a "
        f"{100 * cfg.clean_budget:.2f}-point clean budget); a plain white-box selection would have picked "
        f"α = {sweep.naive['alpha']}",
        f"- test split: {n.test} images (every number in the table below is on these {n.test} images)",
        f"- operator: {execution.description} ({execution.reason})",
        (f"- **MeanSparse does not improve the worst case of this model within the budget (α = 0 chosen)**; "
         f"the table shows the best α > 0, α = {o.shown:g}, for reference" if o.shown != o.alpha else ""),
    ]


def report_markdown(o: Outcome) -> str:
    """``report.md``: the facts, the before/after table and budgets, warnings, the sweep, the figures and the
    per-attack breakdown after MeanSparse."""
    before, after, _, budgets = o.comparison
    md = [f"# MeanSparse report — {o.cfg.data}", "", *_facts(o), "",
          "## Before / after (test split)", "", table(before, after), "",
          f"Both rows were attacked with the same attacks and budgets ({', '.join(o.cfg.attacks)}; "
          f"{before.mode} mode, seed {o.cfg.seed}). On the base model, which has no MeanSparse operators, bpda-X is "
          "X and transfer crafts on the model itself.", "",
          "| attack | budget (both rows) |", "|---|---|", *[f"| {k} | {v} |" for k, v in budgets.items()], ""]
    if after.warnings:
        md += ["## Warnings (+ MeanSparse)", ""] + [f"- {w}" for w in after.warnings] + [""]
    if before.warnings:
        md += ["## Warnings (base model)", ""] + [f"- {w}" for w in before.warnings] + [""]
    md += ["## α sweep (held-out split)", "", o.sweep.to_markdown(), ""]
    md += [f"![{k}]({v})" for k, v in o.plots.items()]
    md += ["", "## Per-attack breakdown after MeanSparse", "", after.to_markdown()]
    return "\n".join(md) + "\n"


def write_outputs(o: Outcome, out: Path) -> dict[str, Any]:
    """before.json, after.json, summary.json and report.md under ``out``; returns the summary."""
    (out / "before.json").write_text(o.comparison.before.to_json())
    (out / "after.json").write_text(o.comparison.after.to_json())
    result = summary(o)
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "report.md").write_text(report_markdown(o))
    return result


def print_outcome(o: Outcome, out: Path, say: Callable[..., None]) -> None:
    """The console's end of a run: the table, the recommendation, the warnings and where the report is."""
    before, after = o.comparison.before, o.comparison.after
    say("\n" + table(before, after).replace("+ MeanSparse", f"+ MeanSparse α={o.shown:g}"))
    say(f"(both rows: the same attacks and budgets, on the same {o.counts.test} test images)")
    if o.shown != o.alpha:
        say(f"recommended α = 0: no α > 0 raises the worst case within the budget (shown: α = {o.shown:g})")
    for w in after.warnings:
        say(f"WARNING: {w}")
    say(f"\nreport: {out / 'report.md'}  ({o.seconds:.0f} s)")
