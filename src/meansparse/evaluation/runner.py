"""``run_evaluation``: per-example worst case over a set of attacks, batched, resumable, deterministic.

Honesty rules this module enforces:
- an example is robust only if it is classified correctly and *no* attack breaks it;
- every candidate is judged on the real model (plain forward, see ``judge``), and a candidate outside the
  threat model (norm ball, [0, 1] box, NaN) never counts as a break;
- attacks that cannot be fooled by gradient masking (BPDA, transfer, Square, adaptive) are compared with
  the plain white-box ones, and a gap of more than 1 point is reported as a warning.

Sanity checks are not run here: they evaluate again, so they sit on top (``evaluate``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._utils import frozen_parameters
from ..core import operators
from ..distributed import all_gather_object, broadcast_object
from ..distributed import rank as dist_rank
from ..distributed import world_size as dist_world_size
from ..version import package_versions
from .adversarial import AdversarialStore, worst_case_images, write_adversarial
from .attacks import Attack
from .examples import ExampleSource, as_examples, chunk_indices
from .hashing import config_hash, example_digests, examples_hash, model_hash
from .judge import attack_batch, check_finite
from .ladder import Ladder, ladder_findings
from .masking import masking_findings
from .messages import library_warnings
from .report import RUN_KEY, Report
from .spec import INDIVIDUAL_MAX_N, EvaluationSpec
from .state import EvaluationState
from .validation import build_attacks, check_labels, check_models, evaluation_device, vacuous_eps

__all__ = ["INDIVIDUAL_MAX_N", "AttackOutcome", "BatchResult", "EvaluationPlan", "Outcomes", "breakdown_row",
           "build_report", "clean_pass", "plan_evaluation", "run_attack", "run_attacks", "run_config", "run_evaluation"]

@dataclass
class EvaluationPlan:
    """Everything an evaluation runs, validated: where the examples come from, the threat model, the attacks
    in order.  ``data_hash`` is known up front for tensors; for a streamed source the clean pass sets it."""

    examples: ExampleSource
    norm: str
    eps: float
    device: torch.device
    n_classes: int
    attacks: list[Attack]
    individual: bool
    batch_size: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    data_hash: str | None = None
    ladder: Ladder | None = None

    @property
    def n(self) -> int:
        return len(self.examples)

    @property
    def mode(self) -> str:
        return "individual" if self.individual else "cascade"


class BatchResult(NamedTuple):
    """One batch's stored record, whether it was computed now (else read from the state file), and the
    candidates that broke an example when adversarial examples are kept."""

    record: dict[str, Any]
    fresh: bool
    breaking: torch.Tensor | None = None


@dataclass
class AttackOutcome:
    """One attack over all its batches: per-example mask (1 robust, 0 broken, -1 not attacked) and tallies."""

    mask: torch.Tensor
    n_attacked: int
    seconds: float = 0.0
    invalid: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    resumed: int = 0


@dataclass
class Outcomes:
    """Every attack's result: per-example worst case so far, masks, report rows and run statistics."""

    robust: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    attack_seconds: dict[str, float] = field(default_factory=dict)
    library: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resumed: int = 0
    ran: list[Attack] = field(default_factory=list)
    rungs: list[dict[str, Any]] = field(default_factory=list)


def _progress(name: str, total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="img", leave=True, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- planning
def plan_evaluation(model: nn.Module, x: Any, y: Any, spec: EvaluationSpec,
                    base_model: nn.Module | None = None) -> EvaluationPlan:
    """Check the models and the data against ``spec`` (a ValueError before any attack runs) and fix the mode.
    ``x, y``: tensors, or a data set of (image, label) with ``y`` None (see :func:`as_examples`); a streamed
    source's batches are validated as they are fetched, before anything about them is counted."""
    check_models(model, base_model)
    examples = as_examples(x, y, spec.workers)
    device = evaluation_device(model, spec.device)
    first_x, first_y = examples.first()
    labels = examples.known_labels()
    labels = first_y if labels is None else labels
    n_classes = check_labels(model, first_x, labels, device)
    if base_model is not None:
        check_labels(base_model, first_x, labels, device)
    examples.n_classes = n_classes
    built = build_attacks(spec.attacks, spec.norm, spec.eps, base_model, spec.attack_options, n_classes)
    plan = EvaluationPlan(examples, spec.norm, spec.eps, device, n_classes, built, spec.individual_for(len(examples)),
                          spec.batch_size, spec.seed, data_hash=examples.data_hash(), ladder=spec.ladder)
    vacuous = vacuous_eps(spec.norm, spec.eps, first_x)
    if vacuous:
        plan.warnings.append(vacuous)
    if not operators(model) and any(a.family in ("bpda", "surrogate", "adaptive")
                                    or (a.family == "transfer" and base_model is None) for a in built):
        plan.warnings.append("the model has no MeanSparse operators: bpda-*, sg-* / smooth-* / ens-*, transfer "
                             "(without base_model) and adaptive reduce to their plain versions")
    return plan


def run_config(plan: EvaluationPlan, model: nn.Module, base_model: nn.Module | None) -> dict[str, Any]:
    """What a stored state must match to be resumed: threat model, data, models and attack settings."""
    return {
        "eps": plan.eps, "norm": plan.norm, "n_examples": plan.n, "seed": plan.seed, "batch_size": plan.batch_size,
        "mode": plan.mode,
        "attacks": [a.settings() for a in plan.attacks],
        "ladder": plan.ladder.settings() if plan.ladder is not None else None,
        "model_hash": model_hash(model),
        "base_model_hash": model_hash(base_model) if base_model is not None else None,
        "data_hash": plan.data_hash,
    }


# -------------------------------------------------------------------------------------------- running
# Under torch.distributed (e.g. torchrun) rank r computes the batches b with b % world == r; results are
# gathered after every round of `world` batches, so every rank holds every result, the batches and their
# seeds are those of a single-process run (identical report) and rank 0 alone writes the state file.
def clean_pass(model: nn.Module, plan: EvaluationPlan, world: int, me: int, progress: bool = False) -> torch.Tensor:
    """Per example: classified correctly without attack (bool, CPU).  The one pass over every example: for a
    streamed source it also hashes them (``plan.data_hash``), so a resume can tell different data apart."""
    n = plan.n
    streamed = plan.data_hash is None
    clean_correct = torch.zeros(n, dtype=torch.bool)
    mine = [idx for j, idx in enumerate(chunk_indices(n, plan.batch_size)) if j % world == me]
    local: dict[int, tuple[list[bool], list[bytes] | None]] = {}
    bar = _progress("clean", sum(map(len, mine)), progress and streamed)
    fetched = plan.examples.batches(mine)
    try:
        with torch.no_grad():
            for idx, (xb, yb) in zip(mine, fetched):
                logits = model(xb.to(plan.device))
                check_finite(logits, f"clean examples {idx[0]}..{idx[-1]}")
                pred = logits.argmax(1).cpu()
                local[idx[0]] = ((pred == yb).tolist(), example_digests(xb, yb) if streamed else None)
                if bar is not None:
                    bar.update(len(idx))
    finally:
        fetched.close()
        if bar is not None:
            bar.close()
    digests: dict[int, list[bytes]] = {}
    for part in all_gather_object(local):
        for s, (correct, ds) in part.items():
            clean_correct[s:s + len(correct)] = torch.tensor(correct, dtype=torch.bool)
            if ds is not None:
                digests[s] = ds
    if streamed:
        ordered = [d for s in sorted(digests) for d in digests[s]]
        shape = getattr(plan.examples, "shape", None) or ()
        plan.data_hash = examples_hash(ordered, getattr(plan.examples, "dtype", None) or torch.float32, shape)
    return clean_correct


def run_attack(attack: Attack, model: nn.Module, plan: EvaluationPlan, pool: list[int], robust: torch.Tensor,
               state: EvaluationState, *, world: int, me: int, progress: bool,
               callback: Callable[[str, int], None] | None, store: AdversarialStore | None = None) -> AttackOutcome:
    """``attack`` on the examples ``pool``, batch by batch; finished batches come from ``state``, new ones
    are saved there (then ``callback(attack, batch)``), their breaking candidates in ``store``. ``robust``
    (the worst case before this attack) only feeds the progress bar."""
    n, batch_size = plan.n, plan.batch_size
    out = AttackOutcome(mask=torch.full((n,), -1, dtype=torch.int8), n_attacked=len(pool))
    chunks = [pool[s:s + batch_size] for s in range(0, len(pool), batch_size)]
    seen, kept = 0, 0
    bar = _progress(attack.name, len(pool), progress)
    def stored(b: int) -> dict[str, Any] | None:
        """Batch ``b``'s stored record, unless it broke examples whose images were not kept (attack it again:
        same seed, same result, now with the images)."""
        record = state.get(attack.name, b, chunks[b])
        if record is not None and store is not None and not all(record["robust"]) and not store.has(attack.name, b):
            return None
        return record

    # this rank's batches without a stored result, fetched in order (ahead, with workers) and nothing else
    todo = [b for b in range(me, len(chunks), world) if stored(b) is None]
    fetched = plan.examples.batches([chunks[b] for b in todo])
    try:
        for first in range(0, len(chunks), world):
            b = first + me
            mine: dict[int, BatchResult] = {}
            if b < len(chunks):
                record = stored(b)
                if record is None:
                    xb, yb = next(fetched)
                    run = attack_batch(attack, model, xb, yb, chunks[b], b, plan.seed, plan.device,
                                       plan.norm, plan.eps)
                    mine[b] = BatchResult(run.record, True, run.breaking if store is not None else None)
                else:
                    mine[b] = BatchResult(record, False)
            round_results = sorted((k, v) for part in all_gather_object(mine) for k, v in part.items())
            for b, result in round_results:
                idx, record = chunks[b], result.record
                if result.fresh:
                    if store is not None and me == 0:  # before the record: a resumed record has its images
                        store.put(attack.name, b, [i for i, r in zip(idx, record["robust"]) if not r],
                                  result.breaking)
                    state.put(attack.name, b, record)
                    if callback is not None:
                        callback(attack.name, b)
                else:
                    out.resumed += 1
                out.mask[torch.tensor(idx, dtype=torch.long)] = torch.tensor(record["robust"], dtype=torch.int8)
                out.seconds += record["seconds"]
                out.invalid += record["invalid"]
                for msg, count in record["messages"].items():  # persisted, so a resume keeps them
                    out.messages[msg] = out.messages.get(msg, 0) + count
                seen += len(idx)
                kept += sum(record["robust"])
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix(robust=f"{100 * kept / max(seen, 1):.1f}%",
                                    worst=f"{100 * float((robust & (out.mask != 0)).sum()) / n:.1f}%")
    finally:
        fetched.close()
        if bar is not None:
            bar.close()
    return out


def breakdown_row(attack: Attack, out: AttackOutcome, robust: torch.Tensor, plan: EvaluationPlan) -> dict[str, Any]:
    """The report's row for one attack; ``robust`` is the worst case after it."""
    n, mask, attacked = plan.n, out.mask, out.n_attacked
    return {
        "attack": attack.name, "kind": attack.family, "n_attacked": attacked,
        "n_broken": int((mask == 0).sum()),
        "robust_accuracy": float((mask == 1).sum()) / n if plan.individual else float(robust.sum()) / n,
        "cumulative_accuracy": float(robust.sum()) / n,
        "success_rate_on_attacked": float((mask == 0).sum()) / attacked if attacked else 0.0,
        "invalid_candidates": out.invalid,
    }


def _run_one(attack: Attack, model: nn.Module, plan: EvaluationPlan, pool: list[int], res: Outcomes,
             state: EvaluationState, rung: int, **kw: Any) -> None:
    """``attack`` on ``pool``; its mask, time, messages and report row go into ``res``."""
    out = run_attack(attack, model, plan, pool, res.robust, state, **kw)
    res.masks[attack.name] = out.mask
    res.robust &= out.mask != 0
    res.attack_seconds[attack.name] = out.seconds
    res.resumed += out.resumed
    res.ran.append(attack)
    if out.messages:
        res.library[attack.name] = out.messages
    if out.invalid:
        res.warnings.append(f"{attack.name}: {out.invalid} candidate(s) outside the threat model "
                            "were rejected (not counted as breaks)")
    row = breakdown_row(attack, out, res.robust, plan)
    if rung > 1:  # a rung always runs as a cascade: its number is the worst case after it
        row.update(rung=rung, robust_accuracy=row["cumulative_accuracy"])
    res.breakdown.append(row)


def _rung_record(rung: int, factor: int, attacks: list[Attack], before: torch.Tensor, res: Outcomes,
                 n: int) -> dict[str, Any]:
    return {"rung": rung, "factor": factor, "attacks": [a.name for a in attacks],
            "n_attacked": int(before.sum()), "n_broken": int((before & ~res.robust).sum()),
            "worst_case_after": float(res.robust.sum()) / n}


def run_attacks(model: nn.Module, base_model: nn.Module | None, plan: EvaluationPlan, clean_correct: torch.Tensor,
                state: EvaluationState, *, world: int, me: int, progress: bool,
                callback: Callable[[str, int], None] | None, store: AdversarialStore | None = None) -> Outcomes:
    """Every attack in order: on all clean-correct examples (individual) or on those still robust (cascade);
    then the ladder's rungs, each on the examples still robust, until one breaks few enough."""
    res = Outcomes(robust=clean_correct.clone())
    kw = dict(world=world, me=me, progress=progress, callback=callback, store=store)
    with frozen_parameters(model, base_model):
        for attack in plan.attacks:
            pool = (clean_correct if plan.individual else res.robust).nonzero().flatten().tolist()
            _run_one(attack, model, plan, pool, res, state, 1, **kw)
        res.rungs.append(_rung_record(1, 1, plan.attacks, clean_correct, res, plan.n))
        ladder = plan.ladder
        for r, factor in enumerate(ladder.factors if ladder is not None else (), start=2):
            rung = ladder.rung(plan.attacks, factor)
            if not rung:
                break
            before = res.robust.clone()
            for attack in rung:
                _run_one(attack, model, plan, res.robust.nonzero().flatten().tolist(), res, state, r, **kw)
            res.rungs.append(_rung_record(r, factor, rung, before, res, plan.n))
            if ladder.done(res.rungs, plan.n):
                break
    return res


# -------------------------------------------------------------------------------------------- reporting
def build_report(model: nn.Module, plan: EvaluationPlan, config: Mapping[str, Any], clean_correct: torch.Tensor,
                 res: Outcomes) -> Report:
    """The report (without ``metadata["run"]``): numbers, masks, masking and library warnings, metadata."""
    n = plan.n
    # rung-1 attacks only: a rung's cascade masks are not comparable, and the ladder reports its own breaks
    findings = masking_findings(plan.attacks, res.masks, n, plan.individual, has_operators=bool(operators(model)))
    converged, ladder_warnings = (ladder_findings(res.rungs, plan.ladder, n) if plan.ladder is not None
                                  else (None, []))
    for row in res.breakdown:
        if row["attack"] in findings.extra_breaks:
            row["extra_breaks_vs_white_box"] = findings.extra_breaks[row["attack"]]
    return Report(
        clean_accuracy=float(clean_correct.sum()) / n,
        robust_accuracy={row["attack"]: row["robust_accuracy"] for row in res.breakdown},
        worst_case_accuracy=float(res.robust.sum()) / n,
        n_examples=n, norm=plan.norm, eps=plan.eps, attacks=[a.name for a in res.ran],
        mode=plan.mode,
        clean_correct=[bool(v) for v in clean_correct],
        robust_masks={k: [int(v) for v in m] for k, m in res.masks.items()},
        worst_case_robust=[bool(v) for v in res.robust],
        breakdown=res.breakdown,
        warnings=(plan.warnings + res.warnings + findings.warnings + ladder_warnings
                  + library_warnings(res.library)),
        ladder=res.rungs, converged=converged,
        metadata={
            "seed": plan.seed, "eps": plan.eps, "norm": plan.norm, "n_examples": n, "n_classes": plan.n_classes,
            "batch_size": plan.batch_size, "model_hash": config["model_hash"],
            "base_model_hash": config["base_model_hash"], "data_hash": config["data_hash"],
            "attack_settings": {a.name: a.settings() for a in res.ran},
            "ladder": plan.ladder.settings() if plan.ladder is not None else None,
            "meansparse_operators": len(operators(model)),
            "versions": package_versions(), "device": str(plan.device),
            "seed_rule": "batch b of attack a uses derive_seed(seed, a, b) (bpda-X shares X's seeds)",
        },
    )


def run_evaluation(model: nn.Module, x: Any, y: Any, spec: EvaluationSpec, *, base_model: nn.Module | None = None,
                   state_path: str | PathLike | None = None, progress: bool = True,
                   callback: Callable[[str, int], None] | None = None,
                   adversarial_dir: str | PathLike | None = None) -> Report:
    """``evaluate`` without its indicators and sanity checks (``spec.indicators`` / ``spec.sanity`` are not
    run here); the arguments mean the same."""
    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    plan = plan_evaluation(model, x, y, spec, base_model)
    world, me = dist_world_size(), dist_rank()

    def open_state() -> tuple[dict[str, Any], EvaluationState]:
        config = run_config(plan, model, base_model)
        state = EvaluationState(state_path if me == 0 else None, config)
        if world > 1:
            state.batches = broadcast_object(state.batches)
        return config, state

    # tensors are hashed up front, so a state file for other data fails before any work; a streamed source
    # is hashed by the clean pass (its one pass over every example), and the state is opened after it
    opened = open_state() if plan.data_hash is not None else None
    clean_correct = clean_pass(model, plan, world, me, progress=progress and me == 0)
    config, state = opened if opened is not None else open_state()
    store = None
    if adversarial_dir is not None:  # resumable next to the state: one folder per evaluation config
        keyed = Path(adversarial_dir) / "batches" / config_hash(config) if state_path is not None else None
        store = AdversarialStore(keyed)
    res = run_attacks(model, base_model, plan, clean_correct, state, world=world, me=me,
                      progress=progress and me == 0, callback=callback, store=store)
    report = build_report(model, plan, config, clean_correct, res)
    if store is not None and me == 0:
        broken = worst_case_images(store, [a.name for a in res.ran], res.masks)
        clean = torch.cat([xb for xb, _ in plan.examples.batches(chunk_indices(plan.n, plan.batch_size))])
        write_adversarial(adversarial_dir, clean, broken, list(range(plan.n)), report.clean_correct,
                          report.worst_case_robust, {"norm": plan.norm, "eps": plan.eps,
                                                     "model_hash": config["model_hash"],
                                                     "data_hash": config["data_hash"]})
    report.metadata[RUN_KEY] = {
        "wall_time_s": time.perf_counter() - started,
        "attack_seconds": res.attack_seconds,
        "resumed_batches": res.resumed,
        "started_at": started_at,
        "world_size": world,
    }
    return report
