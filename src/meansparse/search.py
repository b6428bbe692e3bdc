"""Choosing α against the worst case: global grid, depth schedule α_k = a·r^k, per-site coordinate ascent.

The objective is always the same: maximise worst-case robust accuracy (plain white-box ∧ BPDA ∧ whatever
else is asked for) on a HELD-OUT part of the training split, subject to a clean-accuracy drop budget
relative to α = 0. What a plain (masked) white-box attack would have chosen is reported next to it.
Statistics are calibrated once beforehand; only α changes between evaluations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._utils import model_device
from .accel.auto import PathDecision
from .core import check_alpha, operators
from .evaluation import EvaluationSpec, attack_budget, evaluate
from .evaluation.examples import as_examples, chunk_indices
from .evaluation.spec import resolve_spec
from .fastpath import choose_path, first_batch, on_path
from .placement import set_alpha

DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
#: the plain attack first (the "plain" column), then the strongest cheap MeanSparse-aware one
DEFAULT_SEARCH_ATTACKS = ("apgd-ce", "sg-apgd-margin")
#: what a search's spec defaults to where it differs from ``EvaluationSpec()``'s
SEARCH_DEFAULTS = {"attacks": DEFAULT_SEARCH_ATTACKS, "batch_size": 256}
AlphaSpec = float | Mapping[int, float]

log = logging.getLogger(__name__)


@dataclass
class AlphaSearchResult:
    """Rows of (alpha or schedule, clean, plain, worst_case, ...) and the chosen setting."""

    rows: list[dict[str, Any]]
    chosen: dict[str, Any]
    naive: dict[str, Any]
    clean_budget: float
    attacks: list[str]
    plain_attack: str
    n_clean: int
    n_robust: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_alpha(self) -> AlphaSpec:
        """What to pass to `ms.set_alpha`: a float, or {site index: α} for per-layer settings."""
        return _spec(self.chosen)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)

    @classmethod
    def from_json(cls, text: str) -> AlphaSearchResult:
        return cls(**json.loads(text))

    def to_markdown(self) -> str:
        lines = [f"Clean accuracy on {self.n_clean} held-out images; robust accuracy on the first "
                 f"{self.n_robust} of them, attacks {', '.join(self.attacks)}. Budget: clean drop <= "
                 f"{100 * self.clean_budget:.2f} points vs α = 0.", "",
                 "| α | clean % | plain (" + self.plain_attack + ") % | worst case % | within budget |",
                 "|---|---:|---:|---:|:---:|"]
        budgets = self.settings.get("attack_budgets") or {}
        if budgets:  # every α, 0 included, is attacked alike
            lines[1:1] = ["", "Every α, 0 included, gets the same attacks and budgets: "
                          + "; ".join(f"{k}: {v}" for k, v in budgets.items()) + "."]
        for r in self.rows:
            mark = " **chosen**" if r is self.chosen or r == self.chosen else ""
            mark += " (plain pick)" if r is self.naive or r == self.naive else ""
            lines.append(f"| {_fmt(r['alpha'])}{mark} | {100 * r['clean']:.2f} | {100 * r['plain']:.2f} | "
                         f"{100 * r['worst_case']:.2f} | {'yes' if r['feasible'] else 'no'} |")
        return "\n".join(lines) + "\n"


def _fmt(alpha: Any) -> str:
    if isinstance(alpha, dict):
        return ", ".join(f"{k}={v:g}" for k, v in alpha.items())
    if isinstance(alpha, (list, tuple)):
        return "[" + " ".join(f"{v:.2g}" for v in alpha) + "]"
    return f"{alpha:g}"


def _spec(row: dict[str, Any]) -> AlphaSpec:
    if row.get("per_site") is not None:
        return {k: float(v) for k, v in enumerate(row["per_site"])}
    return float(row["alpha"])


def _row(label: Any, spec: AlphaSpec, scores: dict[str, Any]) -> dict[str, Any]:
    per_site = [spec[k] for k in sorted(spec)] if isinstance(spec, Mapping) else None
    return {"alpha": label, "per_site": per_site, **scores}


def schedule(a: float, r: float, n_sites: int) -> dict[int, float]:
    """α_k = a·r^k for site k (k = 0 nearest the input): r < 1 favours early layers (paper Table 10)."""
    return {k: a * r**k for k in range(n_sites)}


class AlphaObjective:
    """Evaluates one α setting: clean accuracy on all of x, worst case on x[:n_robust] (cascade mode).

    ``spec`` (or keyword ``settings``, as for ``ms.evaluate``; default attacks ``DEFAULT_SEARCH_ATTACKS``, batch
    size 256): the threat model, attacks and options, seed, batch size, workers and device; every α runs them
    in cascade mode, one rung, without indicators or sanity checks (the search ranks α on held-out images; the
    number to quote comes from the final evaluation).  The model runs as it is (the searches put it on
    ``spec.path`` for their whole grid).
    ``x, y``: tensors, or a data set of (image, label) with ``y`` None (streamed batch by batch, decoded in
    ``spec.workers`` processes; every α decodes the held-out images again instead of keeping them in memory)."""

    def __init__(self, model: nn.Module, x: Any, y: Any = None, spec: EvaluationSpec | None = None, *,
                 n_robust: int = 200, state_dir: str | Path | None = None, progress: bool = False,
                 **settings: Any) -> None:
        if not operators(model):
            raise ValueError("search_alpha needs a prepared and calibrated model (ms.prepare + ms.calibrate)")
        self.model = model
        self.spec = resolve_spec(spec, settings, **SEARCH_DEFAULTS)
        self.examples = as_examples(x, y, self.spec.workers)
        self.n_robust = min(n_robust, len(self.examples))
        self.attacks = [a if isinstance(a, str) else a.name for a in self.spec.attacks]
        self.state_dir = Path(state_dir) if state_dir else None
        self.progress = progress
        self.n_sites = len(operators(model))
        #: called as (attack, batch) after every newly attacked batch (progress inside one α step)
        self.on_batch: Callable[[str, int], None] | None = None
        self.attack_settings: dict[str, Any] = {}
        self._each = self.spec.replace(mode="cascade", ladder=False, indicators=False, sanity=False)

    def passes(self, evaluations: int) -> float:
        """Forward + backward passes over single examples that ``evaluations`` α settings cost."""
        return sweep_passes(self.spec, evaluations, len(self.examples), self.n_robust)

    @torch.no_grad()
    def clean(self) -> float:
        device = model_device(self.model) or torch.device("cpu")
        correct, n = 0, len(self.examples)
        with closing(self.examples.batches(chunk_indices(n, self.spec.batch_size))) as fetched:
            for xb, yb in fetched:
                pred = self.model(xb.to(device)).argmax(1).cpu()
                correct += (pred == yb).sum().item()
        return correct / n

    def __call__(self, alpha: AlphaSpec, tag: str) -> dict[str, Any]:
        set_alpha(self.model, alpha)
        state = self.state_dir / f"{tag}.json" if self.state_dir else None
        # one rung, no indicators: the search ranks α on held-out images; the number to quote comes from the
        # final evaluation, which climbs the budget ladder
        report = evaluate(self.model, self.examples.head(self.n_robust), None, self._each, state_path=state,
                          progress=self.progress, callback=self.on_batch)
        self.attack_settings = report.metadata["attack_settings"]  # the same for every α
        plain = report.robust_accuracy[self.attacks[0]]  # the first attack of a cascade saw every example
        return {"clean": self.clean(), "plain": plain, "worst_case": report.worst_case_accuracy,
                "robust": dict(report.robust_accuracy), "warnings": list(report.warnings)}


def _pick(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    feasible = [r for r in rows if r["feasible"]] or rows[:1]
    return max(feasible, key=lambda r: (round(r[key], 9), -rows.index(r)))


def _finish(rows, objective: AlphaObjective, clean_budget: float, settings: dict) -> AlphaSearchResult:
    settings = {**settings, "attack_budgets": {k: attack_budget(v) for k, v in objective.attack_settings.items()}}
    return AlphaSearchResult(rows=rows, chosen=_pick(rows, "worst_case"), naive=_pick(rows, "plain"),
                             clean_budget=clean_budget, attacks=objective.attacks, plain_attack=objective.attacks[0],
                             n_clean=len(objective.examples), n_robust=objective.n_robust, settings=settings)


def _follow(bar: Any, objective: AlphaObjective, step: str) -> None:
    """Show progress inside one step on ``bar``: which attack and batch of the step's evaluation finished
    (cascade: a later attack has at most as many batches as the first)."""
    if bar.disable:
        return
    n = -(-objective.n_robust // objective.spec.batch_size)
    bar.set_postfix_str(f"{step}: attacking with {', '.join(objective.attacks)}")

    def done(attack: str, batch: int) -> None:
        bar.set_postfix_str(f"{step}: {attack} batch {batch + 1} (of at most {n}) done")

    objective.on_batch = done


def _run_grid(objective: AlphaObjective, specs: list[tuple[Any, AlphaSpec, str]], clean_budget: float,
              progress: bool, base_clean: float | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="alpha sweep", disable=not progress, dynamic_ncols=True)
    for label, spec, tag in bar:
        _follow(bar, objective, f"α={_fmt(label)}")
        row = _row(label, spec, objective(spec, tag))
        if base_clean is None:
            base_clean = row["clean"]  # the first setting is α = 0
        row["feasible"] = row["clean"] >= base_clean - clean_budget - 1e-12
        rows.append(row)
        bar.set_postfix(alpha=_fmt(label), clean=f"{100 * row['clean']:.1f}",
                        worst=f"{100 * row['worst_case']:.1f}")
    return rows


@contextmanager
def _grid_path(objective: AlphaObjective, evaluations: int, other_passes: float,
               announce: Callable[[PathDecision], None] | None) -> Iterator[None]:
    """The model on ``spec.path`` for a whole grid of ``evaluations`` α settings ("auto": decided on the grid's
    work plus ``other_passes``; the whole-model compile would recompile for every α, so a sweep never runs it)."""
    decision = choose_path(objective.model, first_batch(objective.examples, None, objective.spec.batch_size),
                           objective.passes(evaluations), objective.spec.path, other_passes=other_passes,
                           alpha_varies=True)
    log.info("meansparse: α search: %s: %s", decision.description, decision.reason)
    if announce is not None:
        announce(decision)
    with on_path(objective.model, decision):
        yield


def _search_args(kwargs: dict[str, Any]) -> tuple[float, bool, float, Callable[[PathDecision], None] | None]:
    """(clean_budget, progress, other_passes, announce) out of a search's keyword arguments; the rest are the
    objective's."""
    return (kwargs.pop("clean_budget", 0.005), kwargs.pop("progress", True), kwargs.pop("other_passes", 0.0),
            kwargs.pop("announce", None))


def search_alpha(model: nn.Module, x: Any, y: Any = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 spec: EvaluationSpec | None = None, *, clean_budget: float = 0.005, n_robust: int = 200,
                 state_dir: str | Path | None = None, progress: bool = True, other_passes: float = 0.0,
                 announce: Callable[[PathDecision], None] | None = None, **settings: Any) -> AlphaSearchResult:
    """Sweep one global α on HELD-OUT data; pick the best worst case within the clean-accuracy budget.

    ``spec`` (or keyword ``settings``: ``eps=..., attacks=..., batch_size=...``; see :class:`AlphaObjective`):
    ``spec.attacks[0]`` is the plain white-box attack whose (masked) curve is shown; the rest run only on the
    examples it left robust.  The grid runs on ``spec.path`` ("auto": the fused kernels when the sweep, plus
    ``other_passes`` of the rest of the job, pays for compiling them; ``announce(decision)`` is told which).
    ``state_dir`` makes the sweep resumable (one evaluation state per α).  ``x, y``: tensors, or a data set of
    (image, label) with ``y`` None, streamed (``spec.workers`` decoding processes).
    """
    alphas = sorted({float(a) for a in alphas})
    try:
        for a in alphas:
            check_alpha(a)
    except ValueError:
        raise ValueError(f"alphas must be finite and >= 0, got {alphas}") from None
    if alphas[0] != 0.0:
        alphas = [0.0, *alphas]  # the clean budget is relative to the unmodified model
    objective = AlphaObjective(model, x, y, spec, n_robust=n_robust, state_dir=state_dir, **settings)
    with _grid_path(objective, len(alphas), other_passes, announce):
        rows = _run_grid(objective, [(a, a, f"alpha-{a:g}") for a in alphas], clean_budget, progress)
    result = _finish(rows, objective, clean_budget, {"kind": "global", "alphas": alphas, "eps": objective.spec.eps,
                                                     "norm": objective.spec.norm})
    set_alpha(model, result.chosen_alpha)
    return result


def search_schedule(model: nn.Module, x: Any, y: Any = None, a_values: Sequence[float] = DEFAULT_ALPHAS,
                    ratios: Sequence[float] = (0.6, 0.8, 1.0, 1.25), **kwargs: Any) -> AlphaSearchResult:
    """Per-layer α as a depth schedule α_k = a·r^k (r = 1 is the global α), same objective and budget; the
    keyword arguments are :func:`search_alpha`'s."""
    clean_budget, progress, other_passes, announce = _search_args(kwargs)
    objective = AlphaObjective(model, x, y, **kwargs)
    specs: list[tuple[Any, AlphaSpec, str]] = [({"a": 0.0, "r": 1.0}, schedule(0.0, 1.0, objective.n_sites),
                                                 "sched-0")]
    for a in sorted({float(v) for v in a_values} - {0.0}):
        for r in ratios:
            specs.append(({"a": a, "r": float(r)}, schedule(a, r, objective.n_sites), f"sched-{a:g}-{r:g}"))
    with _grid_path(objective, len(specs), other_passes, announce):
        rows = _run_grid(objective, specs, clean_budget, progress)
    result = _finish(rows, objective, clean_budget, {"kind": "schedule", "ratios": list(ratios)})
    set_alpha(model, result.chosen_alpha)
    return result


def search_per_site(model: nn.Module, x: Any, y: Any, start: float,
                    candidates: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4), rounds: int = 1,
                    callback: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any) -> AlphaSearchResult:
    """Coordinate ascent over sites from a global α `start`: each site tries every candidate, others fixed; the
    keyword arguments are :func:`search_alpha`'s."""
    clean_budget, progress, other_passes, announce = _search_args(kwargs)
    objective = AlphaObjective(model, x, y, **kwargs)
    evaluations = 2 + rounds * objective.n_sites * len(candidates)  # an upper bound: a candidate equal to α skips
    with _grid_path(objective, evaluations, other_passes, announce):
        rows = _ascend(objective, float(start), candidates, rounds, clean_budget, progress, callback)
    result = _finish(rows, objective, clean_budget, {"kind": "per_site", "start": start, "rounds": rounds})
    set_alpha(model, result.chosen_alpha)
    return result


def _ascend(objective: AlphaObjective, start: float, candidates: Sequence[float], rounds: int, clean_budget: float,
            progress: bool, callback: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """The rows of :func:`search_per_site`: α = 0, the start, then every site's candidates in turn."""
    zero = dict.fromkeys(range(objective.n_sites), 0.0)
    base = _row("α=0", zero, objective(zero, "site-base"))
    base_clean = base["clean"]
    current = dict.fromkeys(range(objective.n_sites), float(start))
    rows = [{**base, "feasible": True}]
    best = _row(f"start α={start:g}", current, objective(dict(current), "site-start"))
    best["feasible"] = best["clean"] >= base_clean - clean_budget - 1e-12
    rows.append(best)
    bar = tqdm(total=rounds * objective.n_sites * len(candidates), desc="per-site α", disable=not progress)
    for rnd in range(rounds):
        for k in range(objective.n_sites):
            for c in candidates:
                bar.update(1)
                if c == current[k]:
                    continue
                trial = {**current, k: float(c)}
                _follow(bar, objective, f"site {k} -> {c:g}")
                row = _row(f"site {k} -> {c:g}", trial, objective(trial, f"site-{rnd}-{k}-{c:g}"))
                row["feasible"] = row["clean"] >= base_clean - clean_budget - 1e-12
                rows.append(row)
                if callback:
                    callback(row)
                if row["feasible"] and row["worst_case"] > best["worst_case"] + 1e-9:
                    best, current = row, trial
    bar.close()
    return rows


def sweep_passes(spec: EvaluationSpec, evaluations: int, n_clean: int, n_robust: int) -> float:
    """Forward + backward passes over single examples a search of ``evaluations`` α settings costs: each
    attacks ``n_robust`` held-out images with ``spec`` and classifies all ``n_clean`` (a forward pass is
    about a third of a forward + backward one)."""
    return evaluations * (spec.estimated_passes(min(n_robust, n_clean)) + n_clean / 3)
