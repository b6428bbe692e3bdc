"""The budget ladder: evidence that the worst case has converged, not just a number at one budget.

Rung 1 is the attack list as given.  Each further rung repeats the masking-proof attacks whose strength is
bought with optimisation on this model (BPDA, surrogate, adaptive: :data:`ESCALATED_FAMILIES`) with
``factor`` times their budget (steps; their own seeds) on the examples still robust.  Transfer (bounded by
how well the base model's examples carry over, not by steps) and black-box Square stay at rung 1 by default:
on the ReLU PGD-AT checkpoint (200 images, three α) their 2x and 4x rungs broke nothing while costing a
quarter of the ladder; ``Ladder(families=...)`` adds them back.

The ladder climbs until a rung breaks at most ``share`` of the examples —
the result is then *converged* — or its factors run out (*not converged*: a warning says by how much the
last rung still lowered the worst case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .attacks import Attack
from .masking import ADAPTIVE_FAMILIES

__all__ = ["CONVERGED_SHARE", "DEFAULT_FACTORS", "ESCALATED_FAMILIES", "Ladder", "ladder_findings",
           "resolve_ladder"]

#: a rung that breaks at most this share of the examples (0.5 %) ends the climb: converged
CONVERGED_SHARE = 0.005
#: budget multipliers of rungs 2, 3, ...
DEFAULT_FACTORS = (2, 4)
#: attack families a rung repeats by default (a subset of the masking-proof ones, ``ADAPTIVE_FAMILIES``)
ESCALATED_FAMILIES = ("bpda", "surrogate", "adaptive")


@dataclass(frozen=True)
class Ladder:
    """Rungs beyond the first: ``factors`` (increasing budget multipliers) and the convergence ``share``;
    ``min_rungs`` rungs beyond the first are run even if an earlier one converged (a comparison gives both
    models the same rungs); ``families``: the attack families a rung repeats (masking-proof ones)."""

    factors: tuple[int, ...] = DEFAULT_FACTORS
    share: float = CONVERGED_SHARE
    min_rungs: int = 0
    families: tuple[str, ...] = ESCALATED_FAMILIES

    def __post_init__(self) -> None:
        factors = tuple(self.factors)
        if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 2 for f in factors):
            raise ValueError(f"ladder factors must be integers >= 2, got {self.factors!r}")
        if list(factors) != sorted(set(factors)):
            raise ValueError(f"ladder factors must increase, got {self.factors!r}")
        if not (isinstance(self.share, (int, float)) and math.isfinite(self.share) and 0 <= self.share < 1):
            raise ValueError(f"ladder share must be a number in [0, 1), got {self.share!r}")
        if isinstance(self.min_rungs, bool) or not isinstance(self.min_rungs, int) or \
                not 0 <= self.min_rungs <= len(factors):
            raise ValueError(f"ladder min_rungs must be an integer from 0 to {len(factors)}, got {self.min_rungs!r}")
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        if not families or any(f not in ADAPTIVE_FAMILIES for f in families):
            raise ValueError(f"ladder families must be masking-proof attack families ({', '.join(ADAPTIVE_FAMILIES)}), "
                             f"got {self.families!r}")
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "families", families)

    def rung(self, attacks: Sequence[Attack], factor: int) -> list[Attack]:
        """The attacks of the rung with ``factor``: those of the escalated families, scaled."""
        return [a.scaled(factor) for a in attacks if a.family in self.families]

    def done(self, rungs: list[dict[str, Any]], n: int) -> bool:
        """Whether to stop climbing after the rung records ``rungs`` (rung 1 first)."""
        return len(rungs) - 1 >= self.min_rungs and rungs[-1]["n_broken"] <= self.allowed(n)

    def allowed(self, n: int) -> int:
        """How many examples a rung may break with the result still called converged."""
        return math.floor(self.share * n + 1e-9)

    def settings(self) -> dict[str, Any]:
        """What a rung's results depend on (``min_rungs`` only decides how far to climb: a state file written
        with another value resumes)."""
        return {"factors": list(self.factors), "share": self.share, "families": list(self.families)}


def resolve_ladder(ladder: Ladder | bool | None) -> Ladder | None:
    """``True``: the default ladder; ``False`` / ``None``: a single rung."""
    if ladder is True:
        return Ladder()
    if ladder is False or ladder is None:
        return None
    if not isinstance(ladder, Ladder):
        raise ValueError(f"ladder must be True, False or a meansparse Ladder, got {ladder!r}")
    return ladder


def ladder_findings(rungs: list[dict[str, Any]], ladder: Ladder, n: int) -> tuple[bool, list[str]]:
    """(converged, warnings) from the rung records (rung 1 first)."""
    if len(rungs) < 2:
        return False, [f"budget ladder: no attack to escalate (none of the attacks is of the families "
                       f"{', '.join(ladder.families)}), so nothing shows that the worst case has converged"]
    last = rungs[-1]
    converged = last["n_broken"] <= ladder.allowed(n)
    if converged:
        return True, []
    more = ",".join(str(f) for f in (*ladder.factors, 2 * ladder.factors[-1]))
    return False, [f"budget ladder not converged: its last rung (x{last['factor']} budget) still broke "
                   f"{last['n_broken']} of {n} examples (more than {100 * ladder.share:g} %); the worst case may "
                   f"fall further with larger budgets: climb on with `meansparse evaluate --ladder {more}` (Python: "
                   f"ladder=Ladder(factors=({more.replace(',', ', ')}))) and the same state file, which reuses "
                   "the rungs already run"]
