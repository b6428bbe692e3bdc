"""Activation factory, including the parametric PSiLU / PSSiLU of Dai et al. (2022).

Dai, Mahloujifar, Mittal, "Parameterizing Activation Functions for Adversarial Robustness", IEEE S&P
Workshops 2022: PSiLU(x) = x * sigmoid(beta * x) with learnable beta > 0, and the shifted
PSSiLU(x) = x * (sigmoid(beta * x) - alpha) / (1 - alpha) with learnable beta > 0 and alpha in [0, 1).
Written by hand: neither torch nor timm ships these.
"""

from __future__ import annotations

import torch
from torch import nn


class PSiLU(nn.Module):
    """x * sigmoid(beta x), one learnable beta per layer (beta kept positive)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta.abs() * x)


class PSSiLU(nn.Module):
    """x * (sigmoid(beta x) - alpha) / (1 - alpha), learnable beta > 0 and alpha clamped to [0, 1)."""

    def __init__(self, beta: float = 1.0, alpha: float = 0.01) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.clamp(0.0, 0.99)
        return x * (torch.sigmoid(self.beta.abs() * x) - a) / (1.0 - a)


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=False),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "psilu": PSiLU,
    "pssilu": PSSiLU,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}") from None
