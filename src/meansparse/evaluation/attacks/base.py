"""The ``Attack`` interface every attack implements, and the pieces several attacks share.

An attack only *proposes* adversarial examples; ``evaluate`` judges them on the real model and rejects any
that leave the threat model, so a wrapper can never inflate a success rate.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "LIBRARY_LOGGER", "NORMS", "Attack", "SuccessTracker", "Wrapper", "num_classes",
           "require_pyautoattack"]

NORMS = ("Linf", "L2")
#: logger handed to pyautoattack's APGD so its zero-gradient alarms end up in the report
LIBRARY_LOGGER = "meansparse.evaluation.pyautoattack"
#: what an attack knows of the model it attacks (``Attack.family``): nothing (clean), its gradients (white-box),
#: straight-through or surrogate gradients through the operators (bpda, surrogate), another model's gradients
#: (transfer), only its outputs (black-box), or the operator's band (adaptive)
FAMILIES = ("clean", "white-box", "bpda", "surrogate", "transfer", "black-box", "adaptive")


def require_pyautoattack() -> Any:
    """The ``pyautoattack`` module, or an ImportError that names the extra to install."""
    try:
        import pyautoattack
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the APGD/FAB/Square/AutoAttack attacks need pyautoattack: pip install 'meansparse[eval]'"
        ) from e
    return pyautoattack


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """Number of logits, from one forward pass on one example."""
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


class Attack:
    """One attack under one threat model (norm, eps).

    Subclasses set ``name`` and ``family`` (one of :data:`FAMILIES`) and implement ``_run``; ``settings()`` is
    what the report records, so every parameter that changes the result must appear there.
    """

    name: str = "attack"
    family: str = "white-box"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = vars(cls).get("kind")
        if isinstance(legacy, str) and "family" not in vars(cls):  # a subclass written before the rename
            warnings.warn(f"{cls.__name__}.kind is now {cls.__name__}.family (the attack's family)",
                          DeprecationWarning, stacklevel=2)
            cls.family = legacy

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255) -> None:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
        eps = float(eps)
        if not eps > 0 or eps != eps or eps == float("inf"):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.norm = norm
        self.eps = eps

    @property
    def seed_key(self) -> str:
        """Name the per-batch seed derives from; BPDA reuses its inner attack's so the two differ only
        in the backward pass."""
        return self.name

    def params(self) -> dict[str, Any]:
        return {}

    def settings(self) -> dict[str, Any]:
        # "kind" is the family's key in reports and resume files (their format predates the name)
        return {"name": self.name, "kind": self.family, "norm": self.norm, "eps": self.eps, **self.params()}

    #: budget attributes that ``scaled`` multiplies (each attack's own; wrappers scale what they wrap)
    scalable: tuple[str, ...] = ("steps", "queries")

    def scaled(self, factor: int) -> Attack:
        """A copy with ``factor`` times the budget (steps, queries) under the name ``<name>@x<factor>``, so it
        draws its own seeds: a rung of the budget ladder (:mod:`meansparse.evaluation.ladder`)."""
        new = copy.copy(self)
        for key in self.scalable:
            if hasattr(new, key):
                setattr(new, key, int(getattr(new, key)) * int(factor))
        new._rescale(factor)
        new.name = f"{self.name}@x{factor}"
        return new

    def _rescale(self, factor: int) -> None:
        """What else a larger budget changes (a step size derived from the steps, a wrapped attack)."""

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """Adversarial candidates for (x, y); same shape as x, detached."""
        if len(x) == 0:
            return x.clone()
        return self._run(model, x, y, seed).detach()

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


class Wrapper(Attack):
    """An attack that runs ``inner`` on another view of the model (BPDA, the surrogates): same threat model,
    same seeds as ``inner`` (so the two differ only in what the attack sees), a larger budget scales ``inner``."""

    def __init__(self, inner: Attack) -> None:
        super().__init__(norm=inner.norm, eps=inner.eps)
        self.inner = inner

    @property
    def seed_key(self) -> str:
        return self.inner.seed_key

    def _rescale(self, factor: int) -> None:
        self.inner = self.inner.scaled(factor)

    def params(self) -> dict[str, Any]:
        return {"inner": self.inner.settings()}


class SuccessTracker:
    """Keeps, per sample, the first iterate that the model misclassifies.

    PGD is usually reported at its last iterate; any iterate inside the threat model that fools the model is
    an equally valid adversarial example, so keeping it can only make the attack stronger.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.found = x.detach().clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def update(self, x_adv: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            new = (logits.argmax(1) != y) & ~self.fooled
            self.found[new] = x_adv.detach()[new]
            self.fooled |= new

    def merge(self, model: nn.Module, final: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            final_wrong = model(final).argmax(1) != y
        use_found = (self.fooled & ~final_wrong).view(-1, *[1] * (final.ndim - 1))
        return torch.where(use_found, self.found, final)
