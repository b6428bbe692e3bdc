"""The main job: model -> calibrate -> α sweep on held-out data -> honest before/after evaluation -> report.

`meansparse demo` runs it on the embedded default (8x8 digits, a small CNN adversarially trained in
seconds); `--data/--model` run the very same pipeline on CIFAR-10 with a reference checkpoint or on a
user's own model and data.  A `--data` path (an image folder or a tar archive) is streamed: calibration,
the sweep and the evaluation decode batch by batch (`workers` processes), never holding the set in memory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._utils import resolve_device, writable_dir
from .accel import fuse, fused_sites, whole_model_compiled
from .accel.auto import FuseDecision
from .calibration import calibrate
from .core import operators
from .data import ImageSet, as_xy, first_images, holdout_split, loader, open_dataset
from .evaluation import DEFAULT_ATTACKS, Report, attack_budget, check_attack_names, evaluate
from .evaluation.budget import estimated_passes
from .evaluation.hashing import config_hash
from .evaluation.ladder import Ladder
from .evaluation.report import operator_path
from .evaluation.validation import check_options_used
from .fastpath import attack_objects, plan_fusion
from .models import CLASS_ADVICE, check_input_shape, checkpoint_paths, class_mismatch, probe_model, read_config
from .models import load as load_checkpoint
from .placement import find_prepared, prepare, remove, set_alpha, sites
from .plots import plot_alpha_curve, plot_feature_histogram
from .search import DEFAULT_ALPHAS, DEFAULT_SEARCH_ATTACKS, AlphaSearchResult, search_alpha
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
    fuse_decision: dict | None = None  # set by the run: fused or eager, and why
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
    fuse: bool | str | None = None    # None: fused (CPU) / whole model compiled (CUDA) when that pays off
    #                                   (meansparse.accel.auto); True, False, "whole-model" force a path
    workers: int = 0                  # DataLoader processes decoding a streamed data path (0: in this process)
    preprocessing: str | None = None  # RobustBench preprocessing name of a streamed data path (None: ToTensor)
    train_split: str = "train"        # splits of a data path ("val" for an ImageNet-style tree)
    test_split: str = "test"
    allow_class_mismatch: bool = False  # data whose classes are not the model's: a warning instead of an error


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
    if not cfg.alphas or any(not (math.isfinite(a) and a >= 0) for a in cfg.alphas):
        raise ValueError(f"alphas must be finite numbers >= 0, got {list(cfg.alphas)}")
    eps = cfg.eps if cfg.eps is not None else (DIGITS_EPS if cfg.data == "digits" else 8 / 255)
    check_attack_names(cfg.sweep_attacks, cfg.attack_options, norm=cfg.norm, eps=eps,
                       what="the sweep attacks (--sweep-attacks)")
    if test_evaluation:
        check_attack_names(cfg.attacks, cfg.attack_options, norm=cfg.norm, eps=eps, what="the attacks (--attacks)")
    run = [*cfg.sweep_attacks, *(cfg.attacks if test_evaluation else ())]
    check_options_used(cfg.attack_options, run, "--sweep-attacks" + (" and --attacks" if test_evaluation else ""))
    if not cfg.model and cfg.data != "digits":
        raise ValueError("--model is required for data sets other than digits (e.g. checkpoints/...)")
    return writable_dir(out, "output folder")


def _train_digits_model(out: Path, cfg: PipelineConfig, progress: bool) -> nn.Module:
    tc = TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 32}, dataset="digits",
                     method="pgd", eps=cfg.eps, steps=5, step_size=cfg.eps / 4, epochs=cfg.train_epochs, batch_size=64,
                     lr=0.05, n_holdout=cfg.n_holdout, eval_n=cfg.n_holdout, eval_steps=10, seed=cfg.seed)
    train(tc, out, progress=progress, command="meansparse demo (embedded digits model)", device=cfg.device)
    return load_checkpoint(out / "best")


def _load_data(cfg: PipelineConfig) -> tuple[Any, Any, Any]:
    """(fitting, held-out, test) parts: in-memory ImageSets for a named data set, streams for a path."""
    full = open_dataset(cfg.data, cfg.train_split, root=cfg.data_root, preprocessing=cfg.preprocessing)
    test = open_dataset(cfg.data, cfg.test_split, root=cfg.data_root,
                        preprocessing=cfg.preprocessing).sample(cfg.n_test, seed=cfg.seed)
    fit, hold = holdout_split(full, cfg.n_holdout, seed=cfg.seed)
    return fit, hold, test


def _table(before: Report, after: Report) -> str:
    names = list(dict.fromkeys([*before.robust_accuracy, *after.robust_accuracy]))
    lines = ["| | clean % | " + " | ".join(f"{n} %" for n in names) + " | **worst case %** |",
             "|---|---:|" + "---:|" * len(names) + "---:|"]
    for label, r in (("base model", before), ("+ MeanSparse", after)):
        cells = [f"{100 * r.robust_accuracy[n]:.2f}" if n in r.robust_accuracy else "–" for n in names]
        lines.append(f"| {label} | {100 * r.clean_accuracy:.2f} | " + " | ".join(cells)
                     + f" | **{100 * r.worst_case_accuracy:.2f}** |")
    return "\n".join(lines)


def _job_passes(cfg: PipelineConfig, n_hold: int, n_test: int, final: bool) -> float:
    """Forward + backward passes over single examples the sweep (and the final evaluation) will cost."""
    sweep = estimated_passes(attack_objects(cfg.sweep_attacks, cfg.attack_options), min(cfg.n_sweep_robust, n_hold))
    passes = len(cfg.alphas) * (sweep + n_hold / 3)
    return passes + (estimated_passes(attack_objects(cfg.attacks, cfg.attack_options), n_test) if final else 0)


def same_attacks(before: Report, after: Report) -> dict[str, str]:
    """The attacks both reports ran, with their budgets in words; a RuntimeError if the two rows of a
    comparison were not attacked alike (names, order, budgets; transfer's source model may differ)."""
    a, b = before.metadata["attack_settings"], after.metadata["attack_settings"]

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "base"}

    if list(a) != list(b) or any(comparable(a[k]) != comparable(b[k]) for k in a) or before.mode != after.mode:
        raise RuntimeError(f"the two rows of the comparison were attacked differently: {a} vs {b}")
    return {k: attack_budget(v) for k, v in b.items()}


def _calibrated(cfg: PipelineConfig, out: Path, final: bool = False
                ) -> tuple[nn.Module, nn.Module, ImageSet, ImageSet, ImageSet]:
    """Data splits, the base model, and a MeanSparse copy calibrated once on the fitting split (fused when
    that pays off for the job: the sweep, plus the test evaluation when ``final``)."""
    if cfg.eps is None:
        cfg.eps = DIGITS_EPS if cfg.data == "digits" else 8 / 255
    device = resolve_device(cfg.device)  # fail before loading data or training anything
    fit, hold, test = _load_data(cfg)
    say = _say(cfg)
    say(f"data: {cfg.data} — {len(fit)} calibration / {len(hold)} held-out / {len(test)} test images")
    if cfg.model:
        base = load_model_spec(cfg.model, dataset=cfg.dataset, threat_model=cfg.threat_model, weights=cfg.weights,
                               pretrained=cfg.pretrained, device=device)
        config = read_config(cfg.model) if checkpoint_paths(cfg.model)[1].exists() else {}
        check_input_shape(base, config, tuple(first_images(hold, 1).shape[1:]), f"--data {cfg.data}",
                          str(cfg.model))
        _check_classes(cfg, base.to(device), hold, config)
    else:
        base = _train_digits_model(out / "model", cfg, cfg.progress)
    base = base.to(device).eval()
    preset = cfg.preset
    shipped = operators(base)
    if shipped:  # e.g. the authors' released models: calibrate and choose α for the network underneath
        preset = preset or _shipped_preset(base)
        base = remove(base)
        say(f"{cfg.model} came with {len(shipped)} MeanSparse sites: this run calibrates its own on the network "
            f"underneath (placement: {preset or 'default'}); `meansparse evaluate --model {cfg.model}` evaluates "
            f"the model as it was released")
    model = prepare(copy.deepcopy(base), example_inputs=(first_images(hold, 2).to(device),), preset=preset)
    say(f"prepared: {len(sites(model))} MeanSparse sites")
    calibrate(model, loader(fit, cfg.batch_size, cfg.workers), max_batches=cfg.calibration_batches,
              progress=cfg.progress, state_path=out / "state" / f"calibration-{_calibration_key(cfg)}.partial")
    # On a GPU the fast path compiles the whole model, and every α of the sweep would recompile it: only the
    # test evaluations (one α each) run compiled there, so only they count.
    n_hold = 0 if device.type == "cuda" else len(hold)
    decision = plan_fusion(model, first_images(hold, cfg.batch_size).to(device),
                           _job_passes(cfg, n_hold, len(test), final), "auto" if cfg.fuse is None else cfg.fuse)
    if decision.whole_model and not final:
        decision = FuseDecision(False, "the sweep changes α between passes (each would recompile the whole model)")
    cfg.fuse_decision = decision.as_dict()
    if decision.fuse:
        fuse(model)
        say(f"fused: {len(fused_sites(model))} of {len(operators(model))} sites ({decision.reason})")
    elif decision.whole_model:
        say(f"whole model compiled for the test evaluations, the α sweep eager ({decision.reason})")
    else:
        say(f"eager operator: {decision.reason}")
    return base, model, fit, hold, test


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
    """Names an interrupted calibration's progress file: a rerun with other settings starts its own."""
    skip = {"progress", "fuse", "fuse_decision", "workers", "attacks", "sweep_attacks", "attack_options", "alphas",
            "allow_class_mismatch"}
    return config_hash({k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip})


def _shipped_preset(model: nn.Module) -> str | None:
    """The preset a model that arrived prepared was prepared with (None if it was not recorded)."""
    try:
        return find_prepared(model)[2].config.get("preset")
    except ValueError:  # prepared in several places, or not by meansparse.prepare
        return None


def _say(cfg: PipelineConfig):
    return print if cfg.progress else (lambda *a, **k: None)


def calibration_images(cfg: PipelineConfig, fit: Any) -> int:
    """Images the calibration pass actually saw: the fitting split, or ``calibration_batches`` batches of it."""
    if cfg.calibration_batches is None:
        return len(fit)
    return min(len(fit), cfg.calibration_batches * cfg.batch_size)


def _sweep(cfg: PipelineConfig, model: nn.Module, hold: Any, out: Path) -> AlphaSearchResult:
    """Global α sweep on the held-out split; writes sweep.json / sweep.md / alpha_curve.png."""
    sweep = search_alpha(model, *as_xy(hold), cfg.alphas, clean_budget=cfg.clean_budget,
                         n_robust=cfg.n_sweep_robust, attacks=cfg.sweep_attacks, norm=cfg.norm, eps=cfg.eps,
                         attack_options=cfg.attack_options, batch_size=cfg.batch_size, seed=cfg.seed,
                         state_dir=out / "state" / "sweep", progress=cfg.progress, workers=cfg.workers)
    (out / "sweep.json").write_text(sweep.to_json())
    (out / "sweep.md").write_text(sweep.to_markdown())
    _say(cfg)(sweep.to_markdown())
    try:
        plot_alpha_curve(sweep.rows, out / "alpha_curve.png", chosen=float(sweep.chosen["alpha"]),
                         naive=float(sweep.naive["alpha"]), n_clean=sweep.n_clean, n_robust=sweep.n_robust,
                         title=f"{cfg.data}: α sweep ({cfg.norm} ε={cfg.eps:.4g})\nrobust on {sweep.n_robust} / "
                               f"clean on {sweep.n_clean} held-out images")
    except ImportError as e:
        _say(cfg)(f"(plot skipped: {e})")
    return sweep


def run_sweep(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    """`meansparse sweep`: calibrate once, sweep α on held-out data, save the state with the chosen α."""
    out = check_config(cfg, out, test_evaluation=False)
    _, model, _, hold, _ = _calibrated(cfg, out)
    sweep = _sweep(cfg, model, hold, out)
    set_alpha(model, sweep.chosen_alpha)
    save(model, out / "meansparse.safetensors")
    _say(cfg)(f"chosen α = {sweep.chosen_alpha} (plain-attack choice: {sweep.naive['alpha']}); "
              f"state: {out / 'meansparse.safetensors'}")
    return json.loads(sweep.to_json())


def run(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    """Run the whole job, writing everything under `out`; returns the summary also saved as summary.json."""
    t0 = time.time()
    out = check_config(cfg, out)
    say = _say(cfg)
    base, model, fit, hold, test = _calibrated(cfg, out, final=True)
    sweep = _sweep(cfg, model, hold, out)
    alpha = sweep.chosen_alpha
    shown = alpha
    if alpha == 0.0:
        # MeanSparse does not help within the budget: still show what the best α > 0 does, labelled as such.
        nonzero = [r for r in sweep.rows if r["feasible"] and r["alpha"] > 0] or [r for r in sweep.rows
                                                                                   if r["alpha"] > 0]
        if nonzero:
            shown = float(max(nonzero, key=lambda r: r["worst_case"])["alpha"])

    x, y = as_xy(test)
    # cascade: each attack sees the examples still robust (the worst case is what counts; the table's attack
    # columns are then cumulative), which keeps the default attacks and the budget ladder within the demo's time
    common = dict(norm=cfg.norm, eps=cfg.eps, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
                  attack_options=cfg.attack_options, workers=cfg.workers, individual=False)
    # Both rows get exactly the same attacks and budgets: on the base model (no operators) bpda-X is X and
    # transfer crafts on the model itself, so nothing is dropped and the two worst cases compare like for like.
    whole = cfg.fuse_decision["whole_model"]  # both rows compiled alike (CPU: the MeanSparse model stays fused)
    with whole_model_compiled(base) if whole else contextlib.nullcontext():
        before = evaluate(base, x, y, attacks=cfg.attacks, state_path=out / "state" / "before.json", **common)
    set_alpha(model, shown)
    with whole_model_compiled(model) if whole else contextlib.nullcontext():
        after = evaluate(model, x, y, attacks=cfg.attacks, base_model=base,
                         state_path=out / "state" / "after.json", **common)
    # the budget ladder climbs until each row converges; the row that stopped lower climbs on (resumed from its
    # state) so that both rows ran exactly the same rungs
    rungs = max(len(before.ladder), len(after.ladder)) - 1
    if len(before.ladder) - 1 < rungs:
        with whole_model_compiled(base) if whole else contextlib.nullcontext():
            before = evaluate(base, x, y, attacks=cfg.attacks, state_path=out / "state" / "before.json",
                              ladder=Ladder(min_rungs=rungs), **common)
    elif len(after.ladder) - 1 < rungs:
        with whole_model_compiled(model) if whole else contextlib.nullcontext():
            after = evaluate(model, x, y, attacks=cfg.attacks, base_model=base,
                             state_path=out / "state" / "after.json", ladder=Ladder(min_rungs=rungs), **common)
    budgets = same_attacks(before, after)
    n_cal = calibration_images(cfg, fit)
    (out / "before.json").write_text(before.to_json())
    (out / "after.json").write_text(after.to_json())

    plots = {"alpha_curve": "alpha_curve.png"} if (out / "alpha_curve.png").exists() else {}
    try:
        op = operators(model)[0]
        plots["feature_histogram"] = plot_feature_histogram(model, op, first_images(test, 256),
                                                            out / "feature_histogram.png").name
    except ImportError as e:
        say(f"(plots skipped: {e})")

    summary = {
        "data": cfg.data, "model": cfg.model or "small_cnn trained by the demo", "eps": cfg.eps, "norm": cfg.norm,
        "alpha": alpha, "alpha_evaluated": shown, "plain_attack_choice": sweep.naive["alpha"], "n_test": len(test),
        "attacks": list(cfg.attacks), "attack_budgets": budgets, "same_attacks_both_rows": True,
        "calibration_images": n_cal, "n_holdout": len(hold), "n_sweep_robust": sweep.n_robust,
        "before": {"clean": before.clean_accuracy, "worst_case": before.worst_case_accuracy,
                   "robust": before.robust_accuracy},
        "after": {"clean": after.clean_accuracy, "worst_case": after.worst_case_accuracy,
                  "robust": after.robust_accuracy},
        "warnings": after.warnings, "base_warnings": before.warnings, "seconds": time.time() - t0, "plots": plots,
        "device": cfg.device, "fuse": cfg.fuse_decision,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    md = [f"# MeanSparse report — {cfg.data}", "",
          f"- model: {summary['model']}", f"- threat model: {cfg.norm}, ε = {cfg.eps:.4g}",
          f"- data: {cfg.data}; sites: {len(sites(model))}; calibration on {n_cal} of {len(fit)} training images"
          + (f" ({cfg.calibration_batches} batches of {cfg.batch_size})" if n_cal < len(fit) else "")
          + f"; α chosen on {len(hold)} held-out training images (clean accuracy on all {sweep.n_clean}, robust "
          f"accuracy on the first {sweep.n_robust}; never the test split)",
          f"- chosen α = {alpha if isinstance(alpha, float) else 'per-layer'} (worst case within a "
          f"{100 * cfg.clean_budget:.2f}-point clean budget); a plain white-box selection would have picked "
          f"α = {sweep.naive['alpha']}",
          f"- test split: {len(test)} images (every number in the table below is on these {len(test)} images)",
          f"- operator: {operator_path(cfg.fuse_decision)} ({cfg.fuse_decision['reason']})",
          (f"- **MeanSparse does not improve the worst case of this model within the budget (α = 0 chosen)**; "
           f"the table shows the best α > 0, α = {shown:g}, for reference" if shown != alpha else ""), "",
          "## Before / after (test split)", "", _table(before, after), "",
          f"Both rows were attacked with the same attacks and budgets ({', '.join(cfg.attacks)}; "
          f"{before.mode} mode, seed {cfg.seed}). On the base model, which has no MeanSparse operators, bpda-X is X "
          "and transfer crafts on the model itself.", "",
          "| attack | budget (both rows) |", "|---|---|", *[f"| {k} | {v} |" for k, v in budgets.items()], ""]
    if after.warnings:
        md += ["## Warnings (+ MeanSparse)", ""] + [f"- {w}" for w in after.warnings] + [""]
    if before.warnings:
        md += ["## Warnings (base model)", ""] + [f"- {w}" for w in before.warnings] + [""]
    md += ["## α sweep (held-out split)", "", sweep.to_markdown(), ""]
    md += [f"![{k}]({v})" for k, v in plots.items()]
    md += ["", "## Per-attack breakdown after MeanSparse", "", after.to_markdown()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    set_alpha(model, alpha)
    save(model, out / "meansparse.safetensors")  # the recommended setting
    say("\n" + _table(before, after).replace("+ MeanSparse", f"+ MeanSparse α={shown:g}"))
    say(f"(both rows: the same attacks and budgets, on the same {len(test)} test images)")
    if shown != alpha:
        say(f"recommended α = 0: no α > 0 raises the worst case within the budget (shown: α = {shown:g})")
    for w in after.warnings:
        say(f"WARNING: {w}")
    say(f"\nreport: {out / 'report.md'}  ({summary['seconds']:.0f} s)")
    return summary
