"""Argument checks for ``evaluate``: every mistake becomes a ValueError that says what to change, before
any attack runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .._utils import model_device
from .attacks import ATTACK_NAMES, Attack, build_attack, options_for, split_wrapper
from .attacks.registry import WARM_START
from .judge import check_finite

__all__ = ["NEED_4_CLASSES", "Examples", "build_attacks", "check_attack_names", "check_batch_size", "check_inputs",
           "check_labels", "check_models", "check_options_used", "check_settings", "check_tensors",
           "check_threat_model", "evaluation_device", "vacuous_eps"]

#: attacks whose DLR loss or target classes need at least 4 classes
NEED_4_CLASSES = ("apgd-t", "apgd-mt", "apgd-dlr", "fab-t", "aa", "transfer")


class Examples(NamedTuple):
    """Validated examples on the CPU: float NCHW images in [0, 1] and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor


def check_inputs(model: nn.Module, x: Any, y: Any, norm: str, eps: float, batch_size: int,
                 base_model: nn.Module | None) -> Examples:
    """The examples as CPU tensors, after checking the models' mode, the threat model and the data."""
    check_settings(model, norm, eps, batch_size, base_model)
    return check_tensors(x, y)


def check_settings(model: nn.Module, norm: str, eps: float, batch_size: int, base_model: nn.Module | None) -> None:
    """The models' type and mode, the threat model and the batch size (everything but the data)."""
    check_models(model, base_model)
    check_threat_model(norm, eps)
    check_batch_size(batch_size)


def check_models(model: nn.Module, base_model: nn.Module | None) -> None:
    """Both models are modules in eval mode (train mode would change dropout / batch-norm during an attack)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for label, m in (("model", model), ("base_model", base_model)):
        if m is None:
            continue
        training = [name or "<root>" for name, sub in m.named_modules() if sub.training]
        if training:
            raise ValueError(f"{label} is in train mode ({', '.join(training[:3])}…): call {label}.eval() "
                             "first; dropout/batch-norm statistics would change during the attack")


def check_threat_model(norm: str, eps: float) -> None:
    """``norm`` is Linf or L2 and ``eps`` a finite number > 0."""
    if norm not in ("Linf", "L2"):
        raise ValueError(f"unknown norm {norm!r}: use 'Linf' or 'L2'")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_tensors(x: Any, y: Any, where: str = "") -> Examples:
    """Images (float NCHW in [0, 1], no NaN) and integer labels of the same length, as CPU tensors;
    ``where`` (e.g. "examples 128-255: ") prefixes the error messages of a streamed batch."""
    x = torch.as_tensor(x).detach().cpu()  # kept on the CPU; batches move to the device one at a time
    y = torch.as_tensor(y).detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"{where}x must be a 4-D NCHW image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}x must be floating point in [0, 1], got dtype {x.dtype}")
    if len(x) == 0:
        raise ValueError(f"{where}x is empty")
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{where}y must be a 1-D integer tensor of labels, got shape {tuple(y.shape)}, "
                         f"dtype {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"{where}x and y differ in length: {len(x)} images, {len(y)} labels")
    if torch.isnan(x).any():
        raise ValueError(f"{where}x contains NaN")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{where}x must lie in [0, 1] (normalisation belongs inside the model); "
                         f"got [{lo:.4g}, {hi:.4g}]")
    return Examples(x, y.long())


def evaluation_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, defaulting to the model's (CPU for a model without tensors); the model must be there."""
    here = model_device(model) or torch.device("cpu")
    device = torch.device(here if device is None else device)
    if here.type != device.type or (device.index is not None and here.index not in (None, device.index)):
        raise ValueError(f"model is on {here} but device={device}: move the model first")
    return device


def check_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    """Number of classes of ``model``, after checking that it returns logits and that every label fits."""
    with torch.no_grad():
        out = model(x[:1].to(device))
    if out.ndim != 2:
        raise ValueError(f"model must return (N, classes) logits, got shape {tuple(out.shape)}")
    check_finite(out, "the first clean example")
    n_classes = int(out.shape[1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes - 1}] (the model has {n_classes} outputs); "
                         f"got labels in [{lo}, {hi}]")
    return n_classes


def build_attacks(attacks: Sequence[str | Attack], norm: str, eps: float, base_model: nn.Module | None,
                  attack_options: Mapping[str, Mapping[str, Any]] | None, n_classes: int | None) -> list[Attack]:
    """The attacks to run, in order: names are built with their options (``bpda-X`` falls back to X's),
    instances are checked against the threat model; names must be unique.  ``n_classes`` None (no model yet):
    the attacks that need 4 classes are not checked."""
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
        opts = options_for(a, options)
        if a == "square-warm":  # its start attack takes that attack's options
            opts.setdefault("start_options", options_for(opts.get("start", WARM_START), options))
        built.append(build_attack(a, norm=norm, eps=eps, base_model=base_model, **opts))
    names = [a.name for a in built]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"attack names must be unique, repeated: {dupes}")
    needs_dlr = [a.name for a in built if split_wrapper(a.name)[1] in NEED_4_CLASSES]
    if needs_dlr and n_classes is not None and n_classes < 4:
        raise ValueError(f"{needs_dlr} need at least 4 classes (DLR loss / targets); the model has {n_classes}")
    return built


def vacuous_eps(norm: str, eps: float, x: torch.Tensor) -> str | None:
    """A warning when the ε-ball is so large that robustness is meaningless: it reaches the constant grey
    image (0.5 everywhere) from every input (Linf ε >= 0.5, L2 ε >= 0.5·sqrt(C·H·W)), so any two images are
    indistinguishable to an attacker; None for a meaningful ε."""
    limit = 0.5 if norm == "Linf" else 0.5 * math.sqrt(x[0].numel())
    if eps < limit:
        return None
    hint = f" (did you mean {eps:g}/255 = {eps / 255:.4g}?)" if norm == "Linf" and eps >= 1 else ""
    return (f"eps = {eps:g} under {norm} covers the whole [0, 1] box: every input can be moved to the same grey "
            f"image, so robust accuracy is ~0 by construction and says nothing about the model{hint}")


def check_attack_names(names: Sequence[str], attack_options: Mapping[str, Mapping[str, Any]] | None, *,
                       norm: str = "Linf", eps: float = 8 / 255, what: str = "attacks") -> None:
    """Build every named attack once with its options (nothing runs, no model needed): an empty list, an
    unknown name, options for an unknown attack or a bad option value is a ValueError naming it. Lets a long
    job (training, calibration, a sweep) fail at its start instead of at its first attack."""
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise ValueError(f"{what}: no attack given; valid attacks: {', '.join(ATTACK_NAMES)}")
    options = dict(attack_options or {})
    unknown = [k for k in options if k not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"attack options for unknown attack(s) {unknown}; valid attacks: {', '.join(ATTACK_NAMES)}")
    for name in [*names, *options]:
        if name not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {name!r} in {what}; valid attacks: {', '.join(ATTACK_NAMES)}")
        build_attack(name, norm=norm, eps=eps, **options_for(name, options))


def check_options_used(attack_options: Mapping[str, Mapping[str, Any]] | None, names: Sequence[str],
                       what: str = "--attacks") -> None:
    """A ValueError for options of an attack that does not run (``pgd.steps=3`` without ``pgd``): they would be
    ignored, and the report would show another budget than the one asked for.  ``X`` options also serve the
    wrapped ``bpda-X`` / ``sg-X`` / ... (see :func:`options_for`), and square-warm's start attack."""
    options = attack_options or {}
    used = set(names) | {split_wrapper(n)[1] for n in names}
    if "square-warm" in names:
        start = dict(options.get("square-warm", {})).get("start", WARM_START)
        used |= {start, split_wrapper(start)[1]}
    unused = [k for k in options if k not in used]
    if unused:
        raise ValueError(f"options for {', '.join(unused)}, which {'is' if len(unused) == 1 else 'are'} not among "
                         f"the attacks run ({what}: {', '.join(names)}); add the attack or drop the option")
