"""MeanSparse-aware attacks: gradients through a soft stand-in for the band, not through the band itself.

The band's exact gradient is zero and BPDA's identity is the crudest backward there is.  These attacks use
the operator's structure (:func:`meansparse.core.band.soft_sparsify`, sharpness k):

- ``sg-X``: X with the soft threshold's derivative as the operators' backward; the forward is the real one,
  so X's own loss bookkeeping (step sizes, best point) runs on the real model's values.
- ``smooth-X``: X on the fully smooth surrogate model (the soft threshold forward too).
- ``ens-X``: X on the real model's values with the mean of the surrogate's and the base model's gradients.

Each tries its sharpness values in turn on the examples no earlier value broke.  Every candidate is still
judged on the real model by the runner.  Written by hand (wrappers around the library's attacks): only this
package knows its operators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ...core import check_sharpness
from ...placement import gradient_mode
from .base import Attack, Wrapper
from .transfer import zero_alphas

__all__ = ["SURROGATE_PREFIXES", "DEFAULT_SHARPNESS_SET", "GradientMix", "Surrogate", "sharpness_values"]

#: name prefix -> operator mode while the inner attack runs ("ens" mixes the surrogate with the base model)
SURROGATE_PREFIXES = {"sg": "surrogate", "smooth": "smooth", "ens": "surrogate"}
#: sharpness values tried by default (in turn, the second on what the first left): k = 4-16 broke the most on
#: the reference checkpoints, k = 1 and k = 64 clearly less (docs/evaluation.md, "MeanSparse-aware attacks")
DEFAULT_SHARPNESS_SET = (4.0, 8.0)


def sharpness_values(value: float | Sequence[float]) -> tuple[float, ...]:
    """One sharpness or several, each a finite number > 0 (a ValueError names the bad one)."""
    values = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else tuple(value)
    if not values:
        raise ValueError("sharpness needs at least one value")
    return tuple(check_sharpness(v) for v in values)


class GradientMix(nn.Module):
    """The real model's logits, with the gradient ``w * surrogate + (1 - w) * base``.

    value = a + (1-w)(b - a) - sg[(1-w)(b - a)] = a;  gradient = w ∇a + (1-w) ∇b.  ``base`` None: the same
    model with every alpha 0 for the base pass."""

    def __init__(self, model: nn.Module, base: nn.Module | None, weight: float, sharpness: float) -> None:
        super().__init__()
        self.model, self.base, self.weight, self.sharpness = model, base, weight, sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with gradient_mode(self.model, "surrogate", self.sharpness):
            a = self.model(x)
        if self.base is not None:
            b = self.base(x)
        else:
            with zero_alphas(self.model):
                b = self.model(x)
        mix = (1 - self.weight) * (b - a)
        return a + mix - mix.detach()


class Surrogate(Wrapper):
    """``inner`` with gradients from a soft threshold of each sharpness in turn (see module docstring)."""

    family = "surrogate"

    def __init__(self, inner: Attack, prefix: str = "sg", *,
                 sharpness: float | Sequence[float] = DEFAULT_SHARPNESS_SET, weight: float = 0.5,
                 base_model: nn.Module | None = None) -> None:
        super().__init__(inner)
        if prefix not in SURROGATE_PREFIXES:
            raise ValueError(f"unknown surrogate prefix {prefix!r}: use one of {', '.join(SURROGATE_PREFIXES)}")
        if not 0 <= float(weight) <= 1:
            raise ValueError(f"ensemble weight must lie in [0, 1], got {weight!r}")
        self.prefix = prefix
        self.sharpness = sharpness_values(sharpness)
        self.weight = float(weight)
        self.base_model = base_model
        self.name = f"{prefix}-{inner.name}"

    def params(self):
        out = {**super().params(), "surrogate": self.prefix, "sharpness": list(self.sharpness)}
        if self.prefix == "ens":
            out.update(weight=self.weight, base="base_model" if self.base_model is not None else "alpha=0")
        return out

    @contextlib.contextmanager
    def _target(self, model: nn.Module, k: float) -> Iterator[nn.Module]:
        """The model the inner attack sees for sharpness ``k``."""
        if self.prefix == "ens":
            yield GradientMix(model, self.base_model, self.weight, k).eval()
            return
        with gradient_mode(model, SURROGATE_PREFIXES[self.prefix], k):
            yield model

    def _run(self, model, x, y, seed):
        x_adv = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for j, k in enumerate(self.sharpness):
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            with self._target(model, k) as target:
                cand = self.inner.run(target, x[idx], y[idx], seed=seed + j)
            with torch.no_grad():  # judged on the real model: only a real break stops the next sharpness
                fooled = model(cand).argmax(1) != y[idx]
            x_adv[idx] = cand  # the last sharpness's candidate for examples nothing broke
            todo[idx[fooled]] = False
        return x_adv
