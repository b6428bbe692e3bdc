"""Attacks by name: what ``evaluate(attacks=...)`` and the command line accept."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .adaptive import AdaptivePGD
from .apgd import APGD, APGDTargeted
from .autoattack import AutoAttackStandard
from .base import Attack
from .bpda import BPDA
from .clean import Clean
from .fab import FABTargeted
from .pgd import PGD
from .square import Square
from .transfer import Transfer

__all__ = ["ATTACK_NAMES", "BPDA_ATTACKS", "COUNT_OPTIONS", "DEFAULT_ATTACKS", "build_attack", "check_options",
           "options_for"]

_FACTORIES: dict[str, Callable[..., Attack]] = {
    "clean": Clean,
    "pgd": PGD,
    "apgd-ce": lambda **kw: APGD(loss="ce", **kw),
    "apgd-dlr": lambda **kw: APGD(loss="dlr", **kw),
    "apgd-t": APGDTargeted,
    "fab-t": FABTargeted,
    "square": Square,
    "aa": AutoAttackStandard,
    "transfer": Transfer,
    "adaptive": AdaptivePGD,
}
#: attacks that use gradients, hence have a meaningful BPDA variant
BPDA_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "aa", "adaptive")
ATTACK_NAMES: tuple[str, ...] = tuple(_FACTORIES) + tuple(f"bpda-{a}" for a in BPDA_ATTACKS)
DEFAULT_ATTACKS = ("aa", "bpda-apgd-ce", "bpda-apgd-t", "transfer", "square")


#: options that count something (iterations, restarts, queries, classes): integers >= 1
COUNT_OPTIONS = ("steps", "restarts", "queries", "n_target_classes")
#: options that must be finite numbers > 0
POSITIVE_OPTIONS = ("step_size", "rho", "p_init", "alpha_max", "eta", "beta")
#: options that are fractions, in (0, 1]: APGD's step-size decay threshold, Square's initial patch fraction
FRACTION_OPTIONS = ("rho", "p_init")


def check_options(name: str, options: dict[str, Any]) -> None:
    """A ValueError naming the attack and option for a count that is not an integer >= 1, a size that is
    not a finite number > 0 (e.g. ``apgd-ce.steps=-5``) or a fraction outside (0, 1] (``apgd-ce.rho=7``).
    ``lam`` (the adaptive attack's weight) may be any finite number: the paper uses negative λ too."""
    for key, value in options.items():
        if key in COUNT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"bad option {name}.{key}={value!r}: must be an integer >= 1")
        if key in POSITIVE_OPTIONS and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value <= 0):
            raise ValueError(f"bad option {name}.{key}={value!r}: must be a finite number > 0")
        if key in FRACTION_OPTIONS and value is not None and value > 1:
            raise ValueError(f"bad option {name}.{key}={value!r}: must be a fraction in (0, 1]")
        if key == "lam" and (isinstance(value, bool) or not isinstance(value, (int, float))
                             or not math.isfinite(value)):
            raise ValueError(f"bad option {name}.{key}={value!r}: must be a finite number")


def build_attack(name: str, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 **options: Any) -> Attack:
    """The attack called ``name`` (see ``ATTACK_NAMES``) with ``options`` overriding its defaults."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACK_NAMES)}")
    check_options(name, options)
    if name.startswith("bpda-"):
        return BPDA(build_attack(name[5:], norm=norm, eps=eps, **options))
    if name == "transfer":
        options["base_model"] = base_model
    try:
        return _FACTORIES[name](norm=norm, eps=eps, **options)
    except TypeError as e:
        raise ValueError(f"bad options for attack {name!r}: {e}") from e


def options_for(name: str, attack_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The options of attack ``name``: its own entry, else (``bpda-X``) X's, else none."""
    options = attack_options or {}
    return dict(options.get(name, options.get(name.removeprefix("bpda-"), {})))
