"""``EvaluationSpec``: what an evaluation runs, as one immutable value validated once, when it is built.

The threat model (norm, eps), the attacks in order with their options, the mode (individual / cascade), the
budget ladder, the attack-failure indicators, the sanity checks, the seed, the batch size, the decoding
workers, the device and the execution path: everything that is a *setting* of an evaluation.  What belongs to
one call (the model, the examples, the base model, the resume file, progress bars, callbacks, where
adversarial examples go) stays an argument of that call, in the spirit of AutoAttack's
``AutoAttack(model, norm, eps, version, attacks_to_run)`` + ``run_standard_evaluation(x, y, bs, state_path)``.

``ms.evaluate(model, x, y, spec)``, ``ms.search_alpha(model, x, y, spec=...)`` and ``sanity_checks(model, x, y,
spec)`` take it; each also builds one from keyword settings (``ms.evaluate(model, x, y, eps=8/255)``), and
keywords given with a spec replace its fields (``ms.evaluate(model, x, y, spec, seed=1)``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attacks import ATTACK_NAMES, DEFAULT_ATTACKS, Attack
from .budget import estimated_passes
from .ladder import Ladder, resolve_ladder
from .validation import build_attacks, check_batch_size, check_threat_model

__all__ = ["INDIVIDUAL_MAX_N", "MODES", "PATHS", "EvaluationSpec", "check_path", "mode_of", "resolve_spec"]

INDIVIDUAL_MAX_N = 1000  # individual mode by default up to this many examples (every attack sees all)
#: ``mode``: "auto" is individual up to :data:`INDIVIDUAL_MAX_N` examples, cascade above
MODES = ("auto", "individual", "cascade")
#: ``path``, how ``ms.evaluate`` runs the model: "auto" decides (:mod:`meansparse.accel.auto`), "eager" is the
#: operator as written, "fused" the fused operator + activation kernels, "compiled" the whole model under one
#: torch.compile.  The model-level action of fusing operators is ``ms.fuse``.
PATHS = ("auto", "eager", "fused", "compiled")


def check_path(path: str) -> None:
    """A ValueError unless ``path`` is one of :data:`PATHS` (the spec, the pipeline and ``choose_path`` alike)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")


class _ReadOnly(dict):
    """A dict that refuses changes (the spec's attack options): a new spec is built with ``replace``."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an EvaluationSpec is immutable: build another one (spec.replace(attack_options=...))")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore

    def __reduce__(self) -> tuple:  # copy / deepcopy / pickle rebuild it from a plain dict
        return type(self), (dict(self),)


def _frozen_options(options: Mapping[str, Mapping[str, Any]] | None) -> _ReadOnly:
    if options is None:
        return _ReadOnly()
    if not isinstance(options, Mapping) or any(not isinstance(v, Mapping) for v in options.values()):
        raise ValueError(f"attack_options must map attack names to {{option: value}}, got {options!r}")
    return _ReadOnly({str(k): _ReadOnly(v) for k, v in options.items()})


@dataclass(frozen=True)
class EvaluationSpec:
    """The settings of one evaluation, validated when built (a ValueError naming the mistake).

    ``attacks``: names from ``ATTACK_NAMES`` (or ``Attack`` instances), run in order; ``attack_options``
    overrides their defaults by name (``bpda-X`` falls back to X's options), e.g.
    ``{"apgd-ce": {"steps": 20}, "adaptive": {"lam": 10.0}}``.
    ``mode``: "individual" (every attack sees every clean-correct example: honest per-attack numbers),
    "cascade" (each attack only sees the examples still robust, as AutoAttack does: same worst case,
    cheaper) or "auto" (individual up to ``INDIVIDUAL_MAX_N`` examples).
    ``ladder``: after the attacks, repeat the BPDA / surrogate / adaptive ones with 2x then 4x the budget on
    the examples still robust until a rung breaks at most 0.5 % of them (a :class:`Ladder` sets other
    factors, share or families; False: a single rung).  Stored as a ``Ladder`` or None.
    ``indicators``: attack-failure indicators on the first clean-correct examples.
    ``sanity``: also run ``sanity_checks`` (True: APGD-CE, plus BPDA-APGD-CE on a MeanSparse model; or the
    attack names to check).  ``seed``: batch b of attack a is seeded from ``derive_seed(seed, a, b)``.
    ``workers``: DataLoader processes decoding a streamed data set.  ``device``: default, the model's.
    ``path``: one of :data:`PATHS`, how ``ms.evaluate`` runs the model (``meansparse.evaluation.evaluate``
    runs it as it is).
    """

    norm: str = "Linf"
    eps: float = 8 / 255
    attacks: tuple[str | Attack, ...] = DEFAULT_ATTACKS
    attack_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_ReadOnly)
    mode: str = "auto"
    ladder: Ladder | bool | None = True
    indicators: bool = True
    sanity: bool | tuple[str, ...] = False
    seed: int = 0
    batch_size: int = 128
    workers: int = 0
    device: str | torch.device | None = None
    path: str = "auto"

    def __post_init__(self) -> None:
        check_threat_model(self.norm, self.eps)
        check_batch_size(self.batch_size)
        attacks = (self.attacks,) if isinstance(self.attacks, (str, Attack)) else tuple(self.attacks)
        options = _frozen_options(self.attack_options)
        built = build_attacks(attacks, self.norm, float(self.eps), None, options, None)  # names, options, values
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {self.workers!r}")
        if self.device is not None:
            torch.device(self.device)  # a malformed device string fails here, with torch's message
        check_path(self.path)
        for name, value in (("eps", float(self.eps)), ("attacks", attacks), ("attack_options", options),
                            ("ladder", resolve_ladder(self.ladder)), ("indicators", bool(self.indicators)),
                            ("sanity", _sanity(self.sanity)), ("seed", int(self.seed))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_built", tuple(built))  # not a field: for estimates, never compared

    # ----------------------------------------------------------------------------------------- derived
    def individual_for(self, n_examples: int) -> bool:
        """Whether ``n_examples`` examples are evaluated in individual mode (else cascade)."""
        if self.mode == "auto":
            return n_examples <= INDIVIDUAL_MAX_N
        return self.mode == "individual"

    def estimated_passes(self, n_examples: int) -> float:
        """Forward + backward passes over single examples the attacks cost on ``n_examples`` (an upper bound,
        rung 1; :mod:`meansparse.evaluation.budget`): what ``path="auto"`` weighs against compiling."""
        return estimated_passes(list(self._built), n_examples)  # type: ignore[attr-defined]

    def attack_settings(self) -> dict[str, dict[str, Any]]:
        """Each attack's settings as a report records them (transfer without its base model here)."""
        return {a.name: a.settings() for a in self._built}  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> EvaluationSpec:
        """A copy with ``changes`` (validated again)."""
        return resolve_spec(self, changes)


def _sanity(sanity: bool | str | Sequence[str]) -> bool | tuple[str, ...]:
    if isinstance(sanity, bool):
        return sanity
    names = (sanity,) if isinstance(sanity, str) else tuple(sanity)
    for name in names:
        if name not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {name!r} in sanity; valid attacks: {', '.join(ATTACK_NAMES)}")
    return names


def mode_of(individual: bool | None) -> str:
    """The ``mode`` of the ``individual`` keyword: None "auto", true "individual", false "cascade"."""
    return "auto" if individual is None else "individual" if individual else "cascade"


def resolve_spec(spec: EvaluationSpec | None, settings: Mapping[str, Any], **defaults: Any) -> EvaluationSpec:
    """The spec a call runs: ``spec`` with the keyword ``settings`` replacing its fields, or, without a spec, one
    built from ``defaults`` and ``settings``.  ``individual=None/True/False`` (the keyword before the spec)
    is ``mode="auto"/"individual"/"cascade"``."""
    settings = dict(settings)
    if "individual" in settings:
        if "mode" in settings:
            raise TypeError("give mode or individual, not both")
        settings["mode"] = mode_of(settings.pop("individual"))
    if spec is None:
        return EvaluationSpec(**{**defaults, **settings})
    if not isinstance(spec, EvaluationSpec):
        raise TypeError(f"spec must be a meansparse EvaluationSpec, got {type(spec).__name__} {spec!r} "
                        "(settings are keywords: norm=..., eps=..., attacks=...)")
    return dataclasses.replace(spec, **settings) if settings else spec
