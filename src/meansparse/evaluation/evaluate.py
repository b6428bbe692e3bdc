"""``evaluate``: per-example worst case over a set of attacks, batched, resumable, deterministic.

Honesty rules this module enforces:
- an example is robust only if it is classified correctly and *no* attack breaks it;
- every candidate is judged here on the real model (plain forward), and a candidate outside the threat
  model (norm ball, [0, 1] box, NaN) never counts as a break;
- attacks that cannot be fooled by gradient masking (BPDA, transfer, Square, adaptive) are compared with
  the plain white-box ones, and a gap of more than 1 point is reported as a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from ..distributed import all_gather_object, broadcast_object
from ..distributed import rank as dist_rank
from ..distributed import world_size as dist_world_size
from ..insertion import _model_device as _first_device
from .attacks import ATTACK_NAMES, DEFAULT_ATTACKS, LIBRARY_LOGGER, Attack, build_attack
from .report import RUN_KEY, Report
from .state import EvaluationState

INDIVIDUAL_MAX_N = 1000  # individual mode by default up to this many examples (every attack sees all)
MASKING_MARGIN = 0.01  # 1 point
MAX_LIBRARY_MESSAGES = 3
_LINF_TOL = 1e-6
_L2_REL_TOL = 1e-5
_BOX_TOL = 1e-6


# ---------------------------------------------------------------------------------------------- helpers
def derive_seed(seed: int, attack: str, batch: int) -> int:
    """Seed of one (attack, batch): independent of batch order and of which batches were resumed."""
    digest = hashlib.sha256(f"{seed}/{attack}/{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def model_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): any change to weights, statistics or
    alphas gives a different hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("meansparse", "torch", "numpy", "pyautoattack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _operators(model: nn.Module) -> list[nn.Module]:
    import meansparse as ms

    return list(ms.operators(model))


def _model_device(model: nn.Module) -> torch.device:
    return _first_device(model) or torch.device("cpu")


@contextlib.contextmanager
def _frozen(*models: nn.Module | None) -> Iterator[None]:
    """Parameters do not need gradients during an attack; FAB calls ``backward`` and would otherwise
    fill the model's ``.grad`` fields."""
    saved = [(p, p.requires_grad) for m in models if m is not None for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _library_messages(sink: dict[str, int]) -> Iterator[None]:
    """Collect pyautoattack's own alarms (zero gradients, randomness, dynamic defences) into ``sink``
    instead of letting them scroll past on stderr."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            sink[msg] = sink.get(msg, 0) + 1

    handler = _Handler(level=logging.WARNING)
    loggers = [logging.getLogger("auto-attack"), logging.getLogger(LIBRARY_LOGGER)]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    for w in caught:
        if "pyautoattack" in str(w.filename):
            msg = str(w.message)
            sink[msg] = sink.get(msg, 0) + 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


# ------------------------------------------------------------------------------------------- validation
def _check_inputs(model: nn.Module, x: Any, y: Any, norm: str, eps: float, batch_size: int,
                  base_model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for label, m in (("model", model), ("base_model", base_model)):
        if m is None:
            continue
        training = [name or "<root>" for name, sub in m.named_modules() if sub.training]
        if training:
            raise ValueError(f"{label} is in train mode ({', '.join(training[:3])}…): call {label}.eval() "
                             "first; dropout/batch-norm statistics would change during the attack")
    if norm not in ("Linf", "L2"):
        raise ValueError(f"unknown norm {norm!r}: use 'Linf' or 'L2'")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = torch.as_tensor(x).detach().cpu()  # kept on the CPU; batches move to the device one at a time
    y = torch.as_tensor(y).detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D NCHW image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point in [0, 1], got dtype {x.dtype}")
    if len(x) == 0:
        raise ValueError("x is empty")
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of labels, got shape {tuple(y.shape)}, dtype {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} images, {len(y)} labels")
    if torch.isnan(x).any():
        raise ValueError("x contains NaN")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"x must lie in [0, 1] (normalisation belongs inside the model); got [{lo:.4g}, {hi:.4g}]")
    return x, y.long()


def _check_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    with torch.no_grad():
        out = model(x[:1].to(device))
    if out.ndim != 2:
        raise ValueError(f"model must return (N, classes) logits, got shape {tuple(out.shape)}")
    n_classes = int(out.shape[1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes - 1}] (the model has {n_classes} outputs); "
                         f"got labels in [{lo}, {hi}]")
    return n_classes


_NEED_4_CLASSES = ("apgd-t", "apgd-dlr", "fab-t", "aa", "transfer")


def _build_attacks(attacks: Sequence[str | Attack], norm: str, eps: float, base_model: nn.Module | None,
                   attack_options: Mapping[str, Mapping[str, Any]] | None, n_classes: int) -> list[Attack]:
    if isinstance(attacks, str):
        attacks = (attacks,)
    if len(attacks) == 0:
        raise ValueError(f"no attacks given; valid attacks: {', '.join(ATTACK_NAMES)}")
    options = dict(attack_options or {})
    unknown_opts = [k for k in options if k not in ATTACK_NAMES]
    if unknown_opts:
        raise ValueError(f"attack_options for unknown attacks {unknown_opts}; valid: {', '.join(ATTACK_NAMES)}")
    built: list[Attack] = []
    for a in attacks:
        if isinstance(a, Attack):
            if a.norm != norm or abs(a.eps - eps) > 1e-12:
                raise ValueError(f"attack {a.name!r} is set up for {a.norm}, eps={a.eps}, not {norm}, eps={eps}")
            built.append(a)
            continue
        if not isinstance(a, str) or a not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {a!r}; valid attacks: {', '.join(ATTACK_NAMES)}")
        opts = dict(options.get(a, options.get(a[5:], {})) if a.startswith("bpda-") else options.get(a, {}))
        built.append(build_attack(a, norm=norm, eps=eps, base_model=base_model, **opts))
    names = [a.name for a in built]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"attack names must be unique, repeated: {dupes}")
    needs_dlr = [a.name for a in built if a.name.removeprefix("bpda-") in _NEED_4_CLASSES]
    if needs_dlr and n_classes < 4:
        raise ValueError(f"{needs_dlr} need at least 4 classes (DLR loss / targets); the model has {n_classes}")
    return built


# --------------------------------------------------------------------------------------------- judging
def _attack_batch(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[int], b: int,
                  seed: int, device: torch.device, norm: str, eps: float) -> dict[str, Any]:
    """Run ``attack`` on examples ``idx`` (batch ``b``, seeded from ``derive_seed``) and judge the result."""
    t0 = time.perf_counter()
    batch_messages: dict[str, int] = {}
    ii = torch.tensor(idx)
    xb, yb = x[ii].to(device), y[ii].to(device)
    bseed = derive_seed(int(seed), attack.seed_key, b)
    with torch.random.fork_rng(devices=_rng_devices(device)), _library_messages(batch_messages):
        torch.manual_seed(bseed)
        x_adv = attack.run(model, xb, yb, seed=bseed)
    rob, inval = _judge(model, xb, x_adv.to(device), yb, norm, eps)
    return {"indices": idx, "robust": [int(v) for v in rob.cpu()], "invalid": int(inval.sum()),
            "messages": batch_messages, "seconds": time.perf_counter() - t0}



def _judge(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, norm: str,
           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust, invalid): a candidate breaks an example only if it is inside the threat model and
    misclassified by the plain model."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    bound = eps + _LINF_TOL if norm == "Linf" else eps * (1 + _L2_REL_TOL) + _LINF_TOL
    flat = x_adv.flatten(1)
    valid = ((size <= bound) & torch.isfinite(flat).all(1) & (flat.amin(1) >= -_BOX_TOL)
             & (flat.amax(1) <= 1 + _BOX_TOL))
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return ~(valid & wrong), ~valid


# -------------------------------------------------------------------------------------------- reporting
WHITE_BOX = "white-box"
ADAPTIVE_KINDS = ("bpda", "transfer", "black-box", "adaptive")


def masking_findings(attacks: Sequence[Attack], masks: Mapping[str, torch.Tensor], n: int,
                     individual: bool, margin: float = MASKING_MARGIN) -> tuple[list[str], dict[str, int]]:
    """Warnings naming every masking-proof attack that does better than the plain white-box attacks.

    Two symptoms, either fires: (a) in individual mode, its accuracy is more than ``margin`` below the
    best plain white-box accuracy; (b) in both modes, it breaks more than ``margin`` of the examples that
    survived every plain white-box attack that saw them.
    """
    white = [a.name for a in attacks if a.kind == WHITE_BOX]
    extra: dict[str, int] = {}
    if not white:
        return [], extra
    w = torch.stack([masks[k] for k in white])  # (W, n) int8
    survived_white = (w != 0).all(0) & (w == 1).any(0)
    white_acc = {k: float((masks[k] == 1).sum()) / n for k in white}
    best_white = min(white_acc.values())
    offenders = []
    for a in attacks:
        if a.kind not in ADAPTIVE_KINDS:
            continue
        m = masks[a.name]
        extra[a.name] = int(((m == 0) & survived_white).sum())
        acc = float((m == 1).sum()) / n
        beats = individual and acc < best_white - margin
        if beats or extra[a.name] / n > margin:
            shown = f"{100 * acc:.1f} %, " if individual else ""
            offenders.append(f"{a.name} ({shown}breaks {extra[a.name]} example(s) that survive every plain "
                             "white-box attack)")
    if not offenders:
        return [], extra
    msg = (f"gradient masking suspected: {'; '.join(offenders)}. Plain white-box attacks: "
           f"{', '.join(f'{k} {100 * v:.1f} %' for k, v in white_acc.items())}. An attack that cannot be fooled "
           f"by masked gradients does more than {100 * margin:.0f} point better, so plain gradient attacks "
           "overestimate this model's robustness: quote the worst case")
    return [msg], extra


# -------------------------------------------------------------------------------------------- evaluate
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "Linf",
    eps: float = 8 / 255,
    attacks: Sequence[str | Attack] = DEFAULT_ATTACKS,
    base_model: nn.Module | None = None,
    batch_size: int = 128,
    seed: int = 0,
    state_path: str | PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    individual: bool | None = None,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    sanity: bool | Sequence[str] = False,
    callback: Callable[[str, int], None] | None = None,
) -> Report:
    """Per-example worst-case robust accuracy of ``model`` on (x, y) over ``attacks``.

    ``x``: float NCHW in [0, 1]; ``y``: integer labels; the model must be in eval mode and return logits.
    ``attacks``: names from ``ATTACK_NAMES`` (or ``Attack`` instances), run in order; ``attack_options``
    overrides their defaults by name (``bpda-X`` falls back to X's options), e.g.
    ``{"apgd-ce": {"steps": 20}, "adaptive": {"lam": 10.0}}``.
    ``individual``: every attack sees every clean-correct example (honest per-attack numbers); False = cascade
    (each attack only sees examples still robust, as AutoAttack does: same worst case, cheaper). Default:
    individual up to ``INDIVIDUAL_MAX_N`` examples.
    ``state_path``: JSON file with per-batch results; a rerun with the same path skips finished batches and
    gives the same report. Batch b of attack a is seeded from ``derive_seed(seed, a, b)``.
    ``sanity``: also run ``sanity_checks`` (True: APGD-CE, plus BPDA-APGD-CE on a MeanSparse model; or a
    list of attack names); failures become warnings.
    ``callback(attack, batch)`` runs after every newly computed batch has been saved.
    """
    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    x, y = _check_inputs(model, x, y, norm, eps, batch_size, base_model)
    eps = float(eps)
    if device is None:
        device = _model_device(model)
    device = torch.device(device)
    here = _model_device(model)
    if here.type != device.type or (device.index is not None and here.index not in (None, device.index)):
        raise ValueError(f"model is on {here} but device={device}: move the model first")
    n_classes = _check_labels(model, x, y, device)
    if base_model is not None:
        _check_labels(base_model, x, y, device)
    built = _build_attacks(attacks, norm, eps, base_model, attack_options, n_classes)
    n = len(x)
    individual = n <= INDIVIDUAL_MAX_N if individual is None else bool(individual)
    report_warnings: list[str] = []
    has_ops = len(_operators(model)) > 0
    if not has_ops and any(a.kind in ("bpda", "adaptive") or (a.kind == "transfer" and base_model is None)
                           for a in built):
        report_warnings.append("the model has no MeanSparse operators: bpda-*, transfer (without base_model) "
                               "and adaptive reduce to their plain versions")

    config = {
        "eps": eps, "norm": norm, "n_examples": n, "seed": int(seed), "batch_size": batch_size,
        "mode": "individual" if individual else "cascade",
        "attacks": [a.settings() for a in built],
        "model_hash": model_hash(model),
        "base_model_hash": model_hash(base_model) if base_model is not None else None,
        "data_hash": data_hash(x, y),
    }
    # Under torch.distributed (e.g. torchrun) rank r computes the batches b with b % world == r; results are
    # gathered after every round of `world` batches, so every rank holds every result, the batches and their
    # seeds are those of a single-process run (identical report) and rank 0 alone writes the state file.
    world, me = dist_world_size(), dist_rank()
    state = EvaluationState(state_path if me == 0 else None, config)
    if world > 1:
        state.batches = broadcast_object(state.batches)
    if me != 0:
        progress = False

    # clean pass
    clean_correct = torch.zeros(n, dtype=torch.bool)
    starts = list(range(0, n, batch_size))
    local: dict[int, list[bool]] = {}
    with torch.no_grad():
        for j, s in enumerate(starts):
            if j % world == me:
                pred = model(x[s:s + batch_size].to(device)).argmax(1).cpu()
                local[s] = (pred == y[s:s + batch_size]).tolist()
    for part in all_gather_object(local):
        for s, correct in part.items():
            clean_correct[s:s + len(correct)] = torch.tensor(correct, dtype=torch.bool)

    robust = clean_correct.clone()  # worst case so far
    masks: dict[str, torch.Tensor] = {}
    breakdown: list[dict[str, Any]] = []
    attack_seconds: dict[str, float] = {}
    resumed = 0
    library: dict[str, dict[str, int]] = {}

    with _frozen(model, base_model):
        for attack in built:
            mask = torch.full((n,), -1, dtype=torch.int8)
            pool = (clean_correct if individual else robust).nonzero().flatten().tolist()
            chunks = [pool[s:s + batch_size] for s in range(0, len(pool), batch_size)]
            seconds, invalid_total, seen, kept = 0.0, 0, 0, 0
            sink: dict[str, int] = {}
            bar = _progress(attack.name, len(pool), progress)
            try:
                for first in range(0, len(chunks), world):
                    b = first + me
                    mine: dict[int, tuple[dict[str, Any], bool]] = {}
                    if b < len(chunks):
                        idx = chunks[b]
                        record = state.get(attack.name, b, idx)
                        if record is None:
                            record = _attack_batch(attack, model, x, y, idx, b, seed, device, norm, eps)
                            mine[b] = (record, True)
                        else:
                            mine[b] = (record, False)
                    round_results = sorted((k, v) for part in all_gather_object(mine) for k, v in part.items())
                    for b, (record, fresh) in round_results:
                        idx = chunks[b]
                        if fresh:
                            state.put(attack.name, b, record)
                            if callback is not None:
                                callback(attack.name, b)
                        else:
                            resumed += 1
                        ii = torch.tensor(idx, dtype=torch.long)
                        mask[ii] = torch.tensor(record["robust"], dtype=torch.int8)
                        seconds += record["seconds"]
                        invalid_total += record["invalid"]
                        for msg, count in record["messages"].items():  # persisted, so a resume keeps them
                            sink[msg] = sink.get(msg, 0) + count
                        seen += len(idx)
                        kept += sum(record["robust"])
                        if bar is not None:
                            bar.update(len(idx))
                            bar.set_postfix(robust=f"{100 * kept / max(seen, 1):.1f}%",
                                            worst=f"{100 * float((robust & (mask != 0)).sum()) / n:.1f}%")
            finally:
                if bar is not None:
                    bar.close()
            masks[attack.name] = mask
            robust &= mask != 0
            attack_seconds[attack.name] = seconds
            if sink:
                library[attack.name] = sink
            if invalid_total:
                report_warnings.append(f"{attack.name}: {invalid_total} candidate(s) outside the threat model "
                                       "were rejected (not counted as breaks)")
            breakdown.append({
                "attack": attack.name, "kind": attack.kind, "n_attacked": len(pool),
                "n_broken": int((mask == 0).sum()),
                "robust_accuracy": float((mask == 1).sum()) / n if individual else float(robust.sum()) / n,
                "cumulative_accuracy": float(robust.sum()) / n,
                "success_rate_on_attacked": float((mask == 0).sum()) / len(pool) if pool else 0.0,
                "invalid_candidates": invalid_total,
            })

    found, extra = masking_findings(built, masks, n, individual)
    report_warnings += found
    for row in breakdown:
        if row["attack"] in extra:
            row["extra_breaks_vs_white_box"] = extra[row["attack"]]
    for name, sink in library.items():  # per-batch alarms (AutoAttack checks every batch): keep a few
        items = sorted(sink.items())
        for msg, count in items[:MAX_LIBRARY_MESSAGES]:
            report_warnings.append(f"pyautoattack ({name}, {count}x): {msg}")
        if len(items) > MAX_LIBRARY_MESSAGES:
            report_warnings.append(f"pyautoattack ({name}): {len(items) - MAX_LIBRARY_MESSAGES} more distinct "
                                   "message(s) not shown")

    report = Report(
        clean_accuracy=float(clean_correct.sum()) / n,
        robust_accuracy={row["attack"]: row["robust_accuracy"] for row in breakdown},
        worst_case_accuracy=float(robust.sum()) / n,
        n_examples=n, norm=norm, eps=eps, attacks=[a.name for a in built],
        mode=config["mode"],
        clean_correct=[bool(v) for v in clean_correct],
        robust_masks={k: [int(v) for v in m] for k, m in masks.items()},
        worst_case_robust=[bool(v) for v in robust],
        breakdown=breakdown,
        warnings=report_warnings,
        metadata={
            "seed": int(seed), "eps": eps, "norm": norm, "n_examples": n, "n_classes": n_classes,
            "batch_size": batch_size, "model_hash": config["model_hash"],
            "base_model_hash": config["base_model_hash"], "data_hash": config["data_hash"],
            "attack_settings": {a.name: a.settings() for a in built},
            "meansparse_operators": len(_operators(model)),
            "versions": package_versions(), "device": str(device),
            "seed_rule": "batch b of attack a uses derive_seed(seed, a, b) (bpda-X shares X's seeds)",
        },
    )
    if sanity:
        from .sanity import sanity_checks

        names = list(sanity) if not isinstance(sanity, bool) else (
            ["apgd-ce", "bpda-apgd-ce"] if has_ops else ["apgd-ce"])
        for name in names:
            found = None
            if me == 0:  # under torch.distributed rank 0 runs the checks and shares the findings
                findings = sanity_checks(model, x, y, norm=norm, eps=eps, attack=name, seed=seed,
                                         batch_size=batch_size, device=device, attack_options=attack_options)
                found = ([f.to_dict() for f in findings],
                         [f"sanity check failed: {f.check}: {f.message}" for f in findings if not f.passed])
            dicts, failed = broadcast_object(found)
            report.sanity += dicts
            report.warnings += failed
    report.metadata[RUN_KEY] = {
        "wall_time_s": time.perf_counter() - started,
        "attack_seconds": attack_seconds,
        "resumed_batches": resumed,
        "started_at": started_at,
        "world_size": world,
    }
    return report


def _progress(name: str, total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="img", leave=True, dynamic_ncols=True)
