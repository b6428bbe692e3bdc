"""Gradient-masking detection: attacks that masked gradients cannot fool (BPDA, transfer, black-box,
adaptive) compared with the plain white-box ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from .attacks import Attack
from .budget import attack_passes

__all__ = ["ADAPTIVE_FAMILIES", "MASKING_MARGIN", "WHITE_BOX", "MaskingFindings", "effective_family",
           "masking_findings"]

MASKING_MARGIN = 0.01  # 1 point
WHITE_BOX = "white-box"
ADAPTIVE_FAMILIES = ("bpda", "surrogate", "transfer", "black-box", "adaptive")


class MaskingFindings(NamedTuple):
    """The warnings (zero or one), and per masking-proof attack the examples it broke that survived every
    plain white-box attack."""

    warnings: list[str]
    extra_breaks: dict[str, int]


def effective_family(attack: Attack, has_operators: bool) -> str:
    """What an attack amounts to on the model: without MeanSparse operators ``bpda-X`` is X, ``transfer``
    without a base model crafts on the model itself and ``adaptive`` has no penalty, so all three are plain
    white-box attacks there (comparing them with white-box attacks compares equals, not masking)."""
    if has_operators:
        return attack.family
    if attack.family in ("bpda", "surrogate", "adaptive") or (attack.family == "transfer"
                                                and getattr(attack, "base_model", None) is None):
        return WHITE_BOX
    return attack.family


def _budget_caveat(attack: Attack, attacks: Sequence[Attack]) -> str:
    """For ``bpda-X`` given more work than the plain ``X`` beside it: part of the gap may be that budget."""
    if attack.family != "bpda" or not attack.name.startswith("bpda-"):
        return ""
    plain = next((a for a in attacks if a.name == attack.name[len("bpda-"):]), None)
    if plain is None:
        return ""
    mine, theirs = attack_passes(attack.settings()), attack_passes(plain.settings())
    if mine <= theirs:
        return ""
    return (f"; but it had a larger budget than {plain.name}, {mine:.0f} vs {theirs:.0f} passes per example, "
            "so part of the gap may be that budget")


#: what the plain white-box attack "aa" runs, so bpda-X / sg-X of these have their plain counterpart beside them
AA_PARTS = ("apgd-ce", "apgd-t", "fab-t")


def _loss_caveat(attack: Attack, white: Sequence[str]) -> str:
    """For ``bpda-X`` / ``sg-X`` with no plain ``X`` among the white-box attacks: the gap mixes masking with X's
    own loss and targets (e.g. sg-apgd-mt against plain APGD-CE), so it says so."""
    inner = getattr(attack, "inner", None)
    if attack.family not in ("bpda", "surrogate") or inner is None:
        return ""
    present = set(white) | (set(AA_PARTS) if "aa" in white else set())
    if inner.name in present:
        return ""
    return (f"; no plain {inner.name} ran beside it, so part of the gap may be its loss or targets rather than "
            f"masking (add {inner.name} to the attacks to tell them apart)")


def masking_findings(attacks: Sequence[Attack], masks: Mapping[str, torch.Tensor], n: int,
                     individual: bool, margin: float = MASKING_MARGIN, *,
                     has_operators: bool = True) -> MaskingFindings:
    """Warnings naming every masking-proof attack that does better than the plain white-box attacks.

    Two symptoms, either fires: (a) in individual mode, its accuracy is more than ``margin`` below the
    best plain white-box accuracy; (b) in both modes, it breaks more than ``margin`` of the examples that
    survived every plain white-box attack that saw them.  ``has_operators=False`` (a model without
    MeanSparse): BPDA, self-transfer and adaptive attacks count as the white-box attacks they reduce to
    (:func:`effective_family`), so only black-box (or a transfer from another model) evidence can fire.
    """
    families = {a.name: effective_family(a, has_operators) for a in attacks}
    white = [a.name for a in attacks if families[a.name] == WHITE_BOX]
    extra: dict[str, int] = {}
    if not white:
        return MaskingFindings([], extra)
    w = torch.stack([masks[k] for k in white])  # (W, n) int8
    survived_white = (w != 0).all(0) & (w == 1).any(0)
    white_acc = {k: float((masks[k] == 1).sum()) / n for k in white}
    best_white = min(white_acc.values())
    offenders = []
    for a in attacks:
        if families[a.name] not in ADAPTIVE_FAMILIES:
            continue
        m = masks[a.name]
        extra[a.name] = int(((m == 0) & survived_white).sum())
        acc = float((m == 1).sum()) / n
        beats = individual and acc < best_white - margin
        if beats or extra[a.name] / n > margin:
            shown = f"{100 * acc:.1f} %, " if individual else ""
            offenders.append(f"{a.name} ({shown}breaks {extra[a.name]} example(s) that survive every plain "
                             f"white-box attack{_budget_caveat(a, attacks)}{_loss_caveat(a, white)})")
    if not offenders:
        return MaskingFindings([], extra)
    msg = (f"gradient masking suspected: {'; '.join(offenders)}. Plain white-box attacks: "
           f"{', '.join(f'{k} {100 * v:.1f} %' for k, v in white_acc.items())}. An attack that cannot be fooled "
           f"by masked gradients does more than {100 * margin:.0f} point better, so plain gradient attacks "
           "overestimate this model's robustness: quote the worst case")
    return MaskingFindings([msg], extra)
