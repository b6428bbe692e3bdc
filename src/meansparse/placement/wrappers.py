"""The modules ``prepare(method="modules")`` puts in a model: an activation with its operator, and a module
whose output gets an operator."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core import MeanSparse

__all__ = ["MeanSparseActivation", "MeanSparseOutput", "WRAPPERS"]


class MeanSparseActivation(nn.Module):
    """Replacement for an activation module: ``activation(meansparse(x))`` (``method="modules"``)."""

    def __init__(self, activation: nn.Module, meansparse: MeanSparse) -> None:
        super().__init__()
        self.meansparse = meansparse
        self.activation = activation

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.activation(self.meansparse(x), *args, **kwargs)


class MeanSparseOutput(nn.Module):
    """Wrapper putting an operator on a module's output: ``meansparse(module(...))`` (``method="modules"``)."""

    def __init__(self, module: nn.Module, meansparse: MeanSparse) -> None:
        super().__init__()
        self.module = module
        self.meansparse = meansparse

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.meansparse(self.module(*args, **kwargs))


#: Modules of this package that placement never treats as part of the user's model.
WRAPPERS: tuple[type[nn.Module], ...] = (MeanSparse, MeanSparseActivation, MeanSparseOutput)
