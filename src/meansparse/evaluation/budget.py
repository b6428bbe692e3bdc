"""How much model work an evaluation is: forward + backward passes per example, from each attack's settings.

An upper bound (a cascade stops early on broken examples, APGD may stop a restart early); what it is for is
telling a seconds-long job from an hours-long one, e.g. to decide whether compiling pays off
(:func:`meansparse.accel.auto.decide_path`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .attacks import Attack

__all__ = ["attack_passes", "estimated_passes"]

#: A score-based query is one forward pass: about a third of a forward + backward pass.
QUERY_COST = 1 / 3


def attack_passes(settings: Mapping[str, Any]) -> float:
    """Forward + backward passes one example costs under the attack with these ``settings``."""
    if "inner" in settings:  # BPDA / surrogates: the inner attack per sharpness (twice for an ensemble)
        per = 2 if settings.get("surrogate") == "ens" else 1
        return attack_passes(settings["inner"]) * per * len(settings.get("sharpness", [1]))
    if isinstance(settings.get("start"), Mapping):  # warm-started Square: its start, then the queries
        return attack_passes(settings["start"]) + float(settings.get("queries", 0)) * QUERY_COST
    if "sources" in settings:  # transfer: its crafting attacks
        return sum(attack_passes(s) for s in settings["sources"])
    if settings.get("name") == "clean":
        return 0.0
    steps = float(settings.get("steps", 0))
    queries = float(settings.get("queries", 0)) * QUERY_COST
    if settings.get("version") == "standard":  # AutoAttack: APGD-CE, APGD-T and FAB-T (9 targets), Square
        return steps * (1 + 9 + 9) + queries
    return steps * settings.get("restarts", 1) * settings.get("n_target_classes", 1) + queries


def estimated_passes(attacks: Sequence[Attack], n_examples: int) -> float:
    """Forward + backward passes over single examples that ``attacks`` cost on ``n_examples`` (upper bound)."""
    return n_examples * (1 + sum(attack_passes(a.settings()) for a in attacks))
