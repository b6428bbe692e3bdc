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
from .square import Square, SquareWarm
from .surrogate import SURROGATE_PREFIXES, Surrogate
from .transfer import Transfer

__all__ = ["ATTACK_NAMES", "BPDA_ATTACKS", "COUNT_OPTIONS", "DEFAULT_ATTACKS", "SURROGATE_ATTACKS", "WRAPPERS",
           "build_attack", "check_options", "options_for", "split_wrapper"]

_FACTORIES: dict[str, Callable[..., Attack]] = {
    "clean": Clean,
    "pgd": PGD,
    "apgd-ce": lambda **kw: APGD(loss="ce", **kw),
    "apgd-dlr": lambda **kw: APGD(loss="dlr", **kw),
    "apgd-t": APGDTargeted,
    "apgd-margin": lambda **kw: APGD(loss="margin", **kw),
    "apgd-mt": lambda **kw: APGDTargeted(loss="margin", **kw),
    "fab-t": FABTargeted,
    "square": Square,
    "square-warm": SquareWarm,
    "aa": AutoAttackStandard,
    "transfer": Transfer,
    "adaptive": AdaptivePGD,
}
#: attacks that use gradients, hence have a meaningful BPDA variant
BPDA_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "apgd-margin", "apgd-mt", "fab-t", "aa", "adaptive")
#: gradient attacks with surrogate variants (sg-X, smooth-X, ens-X; see .surrogate)
SURROGATE_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "apgd-margin", "apgd-mt", "fab-t")
#: the wrappers a name can start with, and the attacks each wraps
WRAPPERS = {"bpda": BPDA_ATTACKS, **{p: SURROGATE_ATTACKS for p in SURROGATE_PREFIXES}}
ATTACK_NAMES: tuple[str, ...] = tuple(_FACTORIES) + tuple(f"{w}-{a}" for w, inner in WRAPPERS.items() for a in inner)
#: the attack whose candidates square-warm starts from (option ``start``)
WARM_START = "sg-apgd-margin"
#: options that belong to a surrogate wrapper, not to the attack it wraps
WRAPPER_OPTIONS = ("sharpness", "weight")
#: the default worst case: plain APGD-CE (the white-box reference the masking check compares with), the two
#: strongest MeanSparse-aware attacks (surrogate gradient with the untargeted and the targeted logit margin),
#: transfer from the base model and Square started from the surrogate attack's candidates (chosen with
#: experiments/attack_probe.py; docs/evaluation.md).  AutoAttack ("aa") is not in it: on every model and α
#: measured (experiments/strongest.py) it broke no image the others did not, at about half of the first
#: rung's time.
DEFAULT_ATTACKS = ("apgd-ce", "sg-apgd-margin", "sg-apgd-mt", "transfer", "square-warm")


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


def split_wrapper(name: str) -> tuple[str | None, str]:
    """(wrapper, inner) for a wrapped name such as ``sg-apgd-t``; (None, name) for a plain one."""
    head, _, rest = name.partition("-")
    if head in WRAPPERS and rest in WRAPPERS[head]:
        return head, rest
    return None, name


def build_attack(name: str, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 **options: Any) -> Attack:
    """The attack called ``name`` (see ``ATTACK_NAMES``) with ``options`` overriding its defaults."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACK_NAMES)}")
    check_options(name, options)
    wrapper, inner = split_wrapper(name)
    if wrapper == "bpda":
        return BPDA(build_attack(inner, norm=norm, eps=eps, **options))
    if wrapper is not None:
        own = {k: options.pop(k) for k in WRAPPER_OPTIONS if k in options}
        try:
            return Surrogate(build_attack(inner, norm=norm, eps=eps, **options), wrapper, base_model=base_model,
                             **own)
        except TypeError as e:
            raise ValueError(f"bad options for attack {name!r}: {e}") from e
    if name == "square-warm":
        options["start"] = build_attack(options.pop("start", WARM_START), norm=norm, eps=eps,
                                        base_model=base_model, **options.pop("start_options", {}))
    if name == "transfer":
        options["base_model"] = base_model
    try:
        return _FACTORIES[name](norm=norm, eps=eps, **options)
    except TypeError as e:
        raise ValueError(f"bad options for attack {name!r}: {e}") from e


def options_for(name: str, attack_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The options of attack ``name``: for a wrapped ``bpda-X`` / ``sg-X`` / ... X's, updated by its own entry."""
    options = attack_options or {}
    inner = split_wrapper(name)[1]
    return {**(options.get(inner, {}) if inner != name else {}), **options.get(name, {})}
