"""Attacks by name: what ``evaluate(attacks=...)`` and the command line accept."""

from __future__ import annotations

from collections.abc import Callable
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

__all__ = ["ATTACK_NAMES", "BPDA_ATTACKS", "DEFAULT_ATTACKS", "build_attack"]

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


def build_attack(name: str, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 **options: Any) -> Attack:
    """The attack called ``name`` (see ``ATTACK_NAMES``) with ``options`` overriding its defaults."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACK_NAMES)}")
    if name.startswith("bpda-"):
        return BPDA(build_attack(name[5:], norm=norm, eps=eps, **options))
    if name == "transfer":
        options["base_model"] = base_model
    try:
        return _FACTORIES[name](norm=norm, eps=eps, **options)
    except TypeError as e:
        raise ValueError(f"bad options for attack {name!r}: {e}") from e
