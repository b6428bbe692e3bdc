"""The main job: model -> calibrate -> α sweep on held-out data -> honest before/after evaluation -> report.

`meansparse demo` runs it on the embedded default (8x8 digits, a small CNN adversarially trained in
seconds); `--data/--model` run the very same pipeline on CIFAR-10 with a reference checkpoint or on a
user's own model and data.  A `--data` path (an image folder or a tar archive) is streamed: calibration,
the sweep and the evaluation decode batch by batch (`workers` processes), never holding the set in memory.

The job runs through the public API: ``search_alpha`` for the sweep and ``ms.evaluate`` for both test rows,
each on its execution path (``EvaluationSpec.path``; the MeanSparse row decides, the base row follows).  What
it writes and prints is :mod:`meansparse.pipeline_report`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._utils import resolve_device, warn_at_caller, writable_dir
from .calibration import calibrate
from .core import operators
from .data import as_xy, first_images, holdout_split, loader, open_dataset
from .evaluation import DEFAULT_ATTACKS, EvaluationSpec, Report, attack_budget, check_attack_names
from .evaluation.hashing import config_hash
from .evaluation.ladder import Ladder
from .evaluation.spec import check_path
from .evaluation.validation import check_options_used
from .fastpath import evaluate
from .models import CLASS_ADVICE, check_input_shape, checkpoint_paths, class_mismatch, probe_model, read_config
from .models import load as load_checkpoint
from .pipeline_report import Comparison, Counts, Outcome, console, draw_plots, print_outcome, write_outputs, write_sweep
from .placement import find_prepared, prepare, remove, set_alpha, sites
from .search import DEFAULT_ALPHAS, DEFAULT_SEARCH_ATTACKS, AlphaSearchResult, search_alpha, sweep_passes
from .serialization import save
from .training import TrainConfig, train
from .zoo.spec import load_model_spec

HONEST_ATTACKS = DEFAULT_ATTACKS  # the demo's before/after rows: what ms.evaluate runs by default
DIGITS_EPS = 0.1  # Linf budget used for the 8x8 digits default (pixels in [0, 1], 17 grey levels)


@dataclass
class PipelineConfig:
    """What ``meansparse demo`` / ``sweep`` run: data and model, threat model, α grid, budget and attacks."""

    data: str = "digits"
    data_root: str | None = None
    model: str | None = None          # model spec (meansparse.zoo.spec); None = train the small digits model
    dataset: str = "cifar10"          # RobustBench data set and threat model of a robustbench: model
    threat_model: str = "Linf"
    weights: str | None = None        # weights of a python: model
    pretrained: bool = True           # False: random weights (robustbench:/timm:/python:), nothing downloaded
    preset: str | None = "auto"       # prepare's placement (None: before every activation)
    eps: float | None = None          # default: 8/255 (CIFAR) or DIGITS_EPS (digits)
    norm: str = "Linf"
    alphas: Sequence[float] = DEFAULT_ALPHAS
    clean_budget: float = 0.005
    n_holdout: int = 300
    n_sweep_robust: int = 200
    n_test: int | None = None         # None = the whole test split
    attacks: Sequence[str] = HONEST_ATTACKS
    sweep_attacks: Sequence[str] = DEFAULT_SEARCH_ATTACKS
    attack_options: dict[str, dict[str, Any]] | None = None
    calibration_batches: int | None = None
    batch_size: int = 256
    seed: int = 0
    progress: bool = True
    train_epochs: int = 30            # epochs of the embedded digits model
    device: str = "cpu"               # where the models run ("cuda", "cuda:1", ...); data stays on the CPU
    path: str = "auto"                # execution path of the sweep and the test rows (EvaluationSpec.path):
    #                                   "auto" fused (CPU) / whole model compiled (CUDA) when that pays off
    workers: int = 0                  # DataLoader processes decoding a streamed data path (0: in this process)
    preprocessing: str | None = None  # RobustBench preprocessing name of a streamed data path (None: ToTensor)
    train_split: str = "train"        # splits of a data path ("val" for an ImageNet-style tree)
    test_split: str = "test"
    allow_class_mismatch: bool = False  # data whose classes are not the model's: a warning instead of an error
    fuse: InitVar[bool | str | None] = None  # the older name of path: True "fused", False "eager", "whole-model"

    def __post_init__(self, fuse: bool | str | None) -> None:
        if fuse is not None:
            legacy = {True: "fused", False: "eager", "whole-model": "compiled", "auto": "auto"}
            if not isinstance(fuse, (bool, str)) or fuse not in legacy:
                raise ValueError(f"fuse must be True, False, 'auto' or 'whole-model', got {fuse!r}")
            warn_at_caller(f"PipelineConfig(fuse={fuse!r}) is path={legacy[fuse]!r} now", DeprecationWarning)
            self.path = legacy[fuse]

    @property
    def resolved_eps(self) -> float:
        """``eps``, or its default for the data: :data:`DIGITS_EPS` for digits, 8/255 otherwise."""
        return self.eps if self.eps is not None else (DIGITS_EPS if self.data == "digits" else 8 / 255)


@dataclass(frozen=True)
class JobSpecs:
    """What a run resolves from its config (which it never writes): the threat model's eps and the
    evaluation specs of the α sweep and of the before/after rows (cascade: each attack sees the examples still
    robust, which keeps the default attacks and the budget ladder within the demo's time)."""

    eps: float
    sweep: EvaluationSpec
    test: EvaluationSpec


def job_specs(cfg: PipelineConfig) -> JobSpecs:
    """The :class:`JobSpecs` of ``cfg`` (validated: a ValueError names a bad setting)."""
    eps = cfg.resolved_eps
    common = dict(norm=cfg.norm, eps=eps, attack_options=cfg.attack_options, batch_size=cfg.batch_size,
                  seed=cfg.seed, workers=cfg.workers, path=cfg.path)
    return JobSpecs(eps, EvaluationSpec(attacks=tuple(cfg.sweep_attacks), **common),
                    EvaluationSpec(attacks=tuple(cfg.attacks), mode="cascade", **common))


@dataclass(frozen=True)
class PreparedModels:
    """The data splits, the base model (its own operators removed, if it came with some) and the MeanSparse
    copy of it, prepared and calibrated once on the fitting split."""

    base: nn.Module
    model: nn.Module
    fit: Any
    hold: Any
    test: Any


def _count(cfg: PipelineConfig, name: str, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def check_config(cfg: PipelineConfig, out: str | Path, *, test_evaluation: bool = True) -> Path:
    """Everything the job can check before its first expensive step (training, calibration, the sweep):
    the device, counts, budget, α grid, threat model, every attack and option, the data/model pairing and the
    output folder (created, and proven writable with a probe write). Returns the output folder."""
    resolve_device(cfg.device)
    for name in ("n_holdout", "n_sweep_robust", "batch_size", "train_epochs"):
        _count(cfg, name)
    for name in ("n_test", "calibration_batches"):
        _count(cfg, name, optional=True)
    if not 0 <= cfg.clean_budget <= 1:
        raise ValueError(f"clean_budget is a fraction in [0, 1] (0.005 = half a point), got {cfg.clean_budget}")
    if cfg.norm not in ("Linf", "L2"):
        raise ValueError(f"unknown norm {cfg.norm!r}: use 'Linf' or 'L2'")
    if cfg.eps is not None and not (math.isfinite(cfg.eps) and cfg.eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {cfg.eps}")
    check_path(cfg.path)
    if not cfg.alphas or any(not (math.isfinite(a) and a >= 0) for a in cfg.alphas):
        raise ValueError(f"alphas must be finite numbers >= 0, got {list(cfg.alphas)}")
    eps = cfg.resolved_eps
    check_attack_names(cfg.sweep_attacks, cfg.attack_options, norm=cfg.norm, eps=eps,
                       what="the sweep attacks (--sweep-attacks)")
    if test_evaluation:
        check_attack_names(cfg.attacks, cfg.attack_options, norm=cfg.norm, eps=eps, what="the attacks (--attacks)")
    run = [*cfg.sweep_attacks, *(cfg.attacks if test_evaluation else ())]
    check_options_used(cfg.attack_options, run, "--sweep-attacks" + (" and --attacks" if test_evaluation else ""))
    if not cfg.model and cfg.data != "digits":
        raise ValueError("--model is required for data sets other than digits (e.g. checkpoints/...)")
    return writable_dir(out, "output folder")


def _train_digits_model(out: Path, cfg: PipelineConfig) -> nn.Module:
    eps = cfg.resolved_eps
    tc = TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 32}, dataset="digits",
                     method="pgd", eps=eps, steps=5, step_size=eps / 4, epochs=cfg.train_epochs, batch_size=64,
                     lr=0.05, n_holdout=cfg.n_holdout, eval_n=cfg.n_holdout, eval_steps=10, seed=cfg.seed)
    train(tc, out, progress=cfg.progress, command="meansparse demo (embedded digits model)", device=cfg.device)
    return load_checkpoint(out / "best")


def _load_data(cfg: PipelineConfig) -> tuple[Any, Any, Any]:
    """(fitting, held-out, test) parts: in-memory ImageSets for a named data set, streams for a path."""
    full = open_dataset(cfg.data, cfg.train_split, root=cfg.data_root, preprocessing=cfg.preprocessing)
    test = open_dataset(cfg.data, cfg.test_split, root=cfg.data_root,
                        preprocessing=cfg.preprocessing).sample(cfg.n_test, seed=cfg.seed)
    fit, hold = holdout_split(full, cfg.n_holdout, seed=cfg.seed)
    return fit, hold, test


def same_attacks(before: Report, after: Report) -> dict[str, str]:
    """The attacks both reports ran, with their budgets in words; a RuntimeError if the two rows of a
    comparison were not attacked alike (names, order, budgets; transfer's source model may differ)."""
    a, b = before.metadata["attack_settings"], after.metadata["attack_settings"]

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "base"}

    if list(a) != list(b) or any(comparable(a[k]) != comparable(b[k]) for k in a) or before.mode != after.mode:
        raise RuntimeError(f"the two rows of the comparison were attacked differently: {a} vs {b}")
    return {k: attack_budget(v) for k, v in b.items()}


def _base_model(cfg: PipelineConfig, out: Path, hold: Any) -> tuple[nn.Module, str | None]:
    """The base model on its device, in eval mode (loaded and checked against the data, or the digits model
    trained), with the operators it came with removed; and the placement preset to prepare it with."""
    device = resolve_device(cfg.device)
    if cfg.model:
        base = load_model_spec(cfg.model, dataset=cfg.dataset, threat_model=cfg.threat_model, weights=cfg.weights,
                               pretrained=cfg.pretrained, device=device)
        config = read_config(cfg.model) if checkpoint_paths(cfg.model)[1].exists() else {}
        check_input_shape(base, config, tuple(first_images(hold, 1).shape[1:]), f"--data {cfg.data}",
                          str(cfg.model))
        _check_classes(cfg, base.to(device), hold, config)
    else:
        base = _train_digits_model(out / "model", cfg)
    base = base.to(device).eval()
    preset = cfg.preset
    shipped = operators(base)
    if shipped:  # e.g. the authors' released models: calibrate and choose α for the network underneath
        preset = preset or _shipped_preset(base)
        base = remove(base)
        console(cfg.progress)(
            f"{cfg.model} came with {len(shipped)} MeanSparse sites: this run calibrates its own on the network "
            f"underneath (placement: {preset or 'default'}); `meansparse evaluate --model {cfg.model}` evaluates "
            f"the model as it was released")
    return base, preset


def prepare_models(cfg: PipelineConfig, out: Path) -> PreparedModels:
    """Data splits, the base model, and a MeanSparse copy of it calibrated once on the fitting split."""
    device = resolve_device(cfg.device)  # fail before loading data or training anything
    fit, hold, test = _load_data(cfg)
    say = console(cfg.progress)
    say(f"data: {cfg.data} — {len(fit)} calibration / {len(hold)} held-out / {len(test)} test images")
    base, preset = _base_model(cfg, out, hold)
    model = prepare(copy.deepcopy(base), example_inputs=(first_images(hold, 2).to(device),), preset=preset)
    say(f"prepared: {len(sites(model))} MeanSparse sites")
    calibrate(model, loader(fit, cfg.batch_size, cfg.workers), max_batches=cfg.calibration_batches,
              progress=cfg.progress, state_path=out / "state" / f"calibration-{_calibration_key(cfg)}.partial")
    return PreparedModels(base, model, fit, hold, test)


def _check_classes(cfg: PipelineConfig, base: nn.Module, data: Any, config: dict[str, Any]) -> None:
    """The model runs on the data's images and its logits are the data's classes (an error, or a warning
    with ``allow_class_mismatch``): labels are class positions, so other classes would be scored wrongly."""
    logits = probe_model(base, first_images(data, 2).to(resolve_device(cfg.device)), str(cfg.model),
                         f"--data {cfg.data}")
    problem = class_mismatch(data, f"--data {cfg.data}", logits, config.get("classes"), str(cfg.model))
    if problem is not None and cfg.allow_class_mismatch:
        warnings.warn(f"{problem}; labels are class positions, so scores may be against the wrong logits "
                      "(--allow-class-mismatch)", stacklevel=2)
    elif problem is not None:
        raise ValueError(f"{problem}: {CLASS_ADVICE}, or pass --allow-class-mismatch to go on with a warning")


def _calibration_key(cfg: PipelineConfig) -> str:
    """Names an interrupted calibration's progress file: a rerun with other settings starts its own (eps as
    resolved, which is how the file was named when the run wrote it into its config)."""
    skip = {"progress", "path", "workers", "attacks", "sweep_attacks", "attack_options", "alphas",
            "allow_class_mismatch"}
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return config_hash({**fields, "eps": cfg.resolved_eps})


def _shipped_preset(model: nn.Module) -> str | None:
    """The preset a model that arrived prepared was prepared with (None if it was not recorded)."""
    try:
        return find_prepared(model)[2].config.get("preset")
    except ValueError:  # prepared in several places, or not by meansparse.prepare
        return None


def calibration_images(cfg: PipelineConfig, fit: Any) -> int:
    """Images the calibration pass actually saw: the fitting split, or ``calibration_batches`` batches of it."""
    if cfg.calibration_batches is None:
        return len(fit)
    return min(len(fit), cfg.calibration_batches * cfg.batch_size)


def _sweep(cfg: PipelineConfig, job: JobSpecs, prepared: PreparedModels, out: Path,
           other_passes: float = 0.0) -> AlphaSearchResult:
    """Global α sweep on the held-out split (``search_alpha``, on its own execution path; ``other_passes``: the
    test evaluation after it); writes sweep.json / sweep.md / alpha_curve.png."""
    say = console(cfg.progress)
    sweep = search_alpha(prepared.model, *as_xy(prepared.hold), cfg.alphas, job.sweep, clean_budget=cfg.clean_budget,
                         n_robust=cfg.n_sweep_robust, state_dir=out / "state" / "sweep", progress=cfg.progress,
                         other_passes=other_passes, announce=lambda d: say(f"α sweep: {d.description} ({d.reason})"))
    write_sweep(sweep, out, data=cfg.data, norm=cfg.norm, eps=job.eps, say=say)
    return sweep


def shown_alpha(sweep: AlphaSearchResult) -> Any:
    """The α the before/after table evaluates: the chosen one, or, when MeanSparse does not help within the
    budget (α = 0 chosen), the best α > 0, labelled as such in the report."""
    alpha = sweep.chosen_alpha
    if alpha != 0.0:
        return alpha
    nonzero = [r for r in sweep.rows if r["feasible"] and r["alpha"] > 0] or [r for r in sweep.rows if r["alpha"] > 0]
    return float(max(nonzero, key=lambda r: r["worst_case"])["alpha"]) if nonzero else alpha


def compare(cfg: PipelineConfig, job: JobSpecs, prepared: PreparedModels, alpha: Any, out: Path,
            other_passes: float = 0.0) -> Comparison:
    """The base model and the MeanSparse model at ``alpha`` on the test split with exactly the same attacks and
    budgets (on the base model, which has no operators, bpda-X is X and transfer crafts on the model itself).
    The MeanSparse row's ``ms.evaluate`` decides the execution path (``other_passes``: the sweep before it) and
    the base row runs on the same one; the budget ladder climbs until each row converges, and the row that
    stopped lower climbs on (resumed from its state) so that both rows ran the same rungs."""
    (base, model), (x, y), say = (prepared.base, prepared.model), as_xy(prepared.test), console(cfg.progress)
    state, ran = out / "state", []

    def announce(decision: Any) -> None:
        ran.append(decision)
        say(f"test evaluation: {decision.description} ({decision.reason})")

    set_alpha(model, alpha)
    after = evaluate(model, x, y, job.test, base_model=base, state_path=state / "after.json", progress=cfg.progress,
                     announce=announce, other_passes=other_passes)
    same = job.test.replace(path=ran[0].path)  # both rows alike (CPU: fused = eager for a model without operators)
    before = evaluate(base, x, y, same, state_path=state / "before.json", progress=cfg.progress)
    rungs = max(len(before.ladder), len(after.ladder)) - 1
    if len(before.ladder) - 1 < rungs:
        before = evaluate(base, x, y, same, state_path=state / "before.json", progress=cfg.progress,
                          ladder=Ladder(min_rungs=rungs))
    elif len(after.ladder) - 1 < rungs:
        after = evaluate(model, x, y, same, base_model=base, state_path=state / "after.json", progress=cfg.progress,
                         ladder=Ladder(min_rungs=rungs))
    return Comparison(before, after, ran[0], same_attacks(before, after))


def run_sweep(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    """`meansparse sweep`: calibrate once, sweep α on held-out data, save the state with the chosen α."""
    out = check_config(cfg, out, test_evaluation=False)
    job = job_specs(cfg)
    prepared = prepare_models(cfg, out)
    sweep = _sweep(cfg, job, prepared, out)
    set_alpha(prepared.model, sweep.chosen_alpha)
    save(prepared.model, out / "meansparse.safetensors")
    console(cfg.progress)(f"chosen α = {sweep.chosen_alpha} (plain-attack choice: {sweep.naive['alpha']}); "
                          f"state: {out / 'meansparse.safetensors'}")
    return json.loads(sweep.to_json())


def run(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    """Run the whole job, writing everything under `out`; returns the summary also saved as summary.json.
    ``cfg`` is read, never written: what the run resolves (eps, the evaluation specs) is a :class:`JobSpecs`."""
    t0 = time.time()
    out = check_config(cfg, out)
    job = job_specs(cfg)
    prepared = prepare_models(cfg, out)
    n_test = len(prepared.test)
    sweep = _sweep(cfg, job, prepared, out, other_passes=job.test.estimated_passes(n_test))
    alpha, shown = sweep.chosen_alpha, shown_alpha(sweep)
    swept = sweep_passes(job.sweep, len(sweep.rows), len(prepared.hold), cfg.n_sweep_robust)
    comparison = compare(cfg, job, prepared, shown, out, other_passes=swept)
    say = console(cfg.progress)
    plots = draw_plots(prepared.model, prepared.test, out, say)
    counts = Counts(len(prepared.fit), calibration_images(cfg, prepared.fit), len(prepared.hold), n_test,
                    len(sites(prepared.model)))
    outcome = Outcome(cfg, job.eps, sweep, alpha, shown, comparison, counts, plots, time.time() - t0)
    summary = write_outputs(outcome, out)
    set_alpha(prepared.model, alpha)
    save(prepared.model, out / "meansparse.safetensors")  # the recommended setting
    print_outcome(outcome, out, say)
    return summary
