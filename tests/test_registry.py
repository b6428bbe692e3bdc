"""The one registry of activations, adds and layout rules (:mod:`meansparse.placement.registry`): what it
registers is both inserted by ``prepare`` and fused by ``fuse``."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fused import outputs_and_grads
from torch import nn

import meansparse as ms
from meansparse._compile import ENV_VAR
from meansparse.accel import FusedMeanSparse
from meansparse.placement.registry import (
    ActivationSpec,
    call_inplace,
    consumer_hint,
    module_spec,
    producer_hint,
    register_activation,
)


class Swishish(nn.Module):
    """A user's activation with a learnable parameter (not a torch built-in): x * sigmoid(beta * x)."""

    def __init__(self, beta: float = 1.5) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.full((), beta))

    def forward(self, x):
        return torch.sigmoid(self.beta * x).mul(x)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Swishish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("method", ["fx", "modules"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_registered_activation_class_is_inserted_and_fused(method, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setenv(ENV_VAR, "0")
    register_activation(Swishish)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)  # 32768 elements per site: large enough for the compiled kernels
    model = ms.prepare(net().eval(), method=method, example_inputs=x[:2])
    assert [s.activation for s in ms.sites(model)] == ["Swishish"]
    ms.calibrate(model, [x], progress=False, check_inputs=False)
    ms.set_alpha(model, 0.5)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == ["1"]
    op = ms.operators(model)[0]
    assert isinstance(op, FusedMeanSparse) and op.fused_activation == ("module", (), False)
    for mode in ("exact", "straight_through"):
        for a, b in zip(outputs_and_grads(model, x, mode), outputs_and_grads(ref, x, mode), strict=True):
            assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    ms.unfuse(model)
    assert not ms.fused_sites(model) and type(ms.operators(model)[0]) is ms.MeanSparse


def test_module_specs_come_from_the_registry():
    assert module_spec(nn.LeakyReLU(0.2, inplace=True)) == ActivationSpec("leaky_relu", (0.2,), True)
    assert module_spec(nn.GELU(approximate="tanh")) == ("gelu", ("tanh",), False)
    assert module_spec(nn.Softplus(beta=2, threshold=10)) == ("softplus", (2.0, 10.0), False)
    assert module_spec(nn.PReLU()) is None  # inserted, not fused
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *a: None)
    assert module_spec(hooked) is None  # a fused call would skip the hook


def test_layout_and_inplace_rules():
    assert producer_hint(nn.Linear(2, 2)) == "last" and producer_hint(nn.Conv2d(1, 1, 1)) == "first"
    assert producer_hint(nn.BatchNorm2d(3)) == "first" and producer_hint(nn.ReLU()) is None
    assert consumer_hint(nn.LayerNorm(4)) == "last" and consumer_hint(torch.nn.functional.conv2d) == "first"
    assert call_inplace(torch.relu_, (None,), {}) and not call_inplace(torch.relu, (None,), {})
    assert call_inplace(torch.nn.functional.relu, (None,), {"inplace": True})
