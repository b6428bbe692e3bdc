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
    assert isinstance(op, FusedMeanSparse) and op.fused_activation == ("generic", (), False)
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


class TorchActivations(nn.Module):
    """Every main activation of torch.nn that timm and user models use besides the ReLU / GELU family."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else c, c, 3, padding=1) for i in range(6))
        self.bn = nn.BatchNorm2d(c)
        self.acts = nn.ModuleList([nn.ReLU6(inplace=True), nn.Hardtanh(-2.0, 2.0), nn.SELU(), nn.CELU(0.5),
                                   nn.RReLU()])
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.acts[0](self.bn(self.convs[0](x)))
        x = torch.nn.functional.relu6(self.convs[1](x))
        for conv, act in zip(self.convs[2:], self.acts[1:], strict=True):
            x = act(conv(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("compiled", [False, True])
def test_relu6_and_the_other_torch_activations_get_sites_and_fuse(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setenv(ENV_VAR, "0")
    torch.manual_seed(0)
    x = torch.rand(32, 3, 24, 24)
    base = TorchActivations().eval()
    model = ms.prepare(base, example_inputs=x[:2])
    assert [s.activation for s in ms.sites(model)] == ["ReLU6", "F.relu6", "Hardtanh", "SELU", "CELU", "RReLU"]
    ms.calibrate(model, [x], progress=False)
    ms.set_alpha(model, 0.4)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [s.name for s in ms.sites(model)]
    for mode in ("exact", "straight_through"):
        for a, b in zip(outputs_and_grads(model, x, mode), outputs_and_grads(ref, x, mode), strict=True):
            assert torch.equal(a, b)


class Gated(nn.Module):
    """A ReLU body with a squeeze-excitation gate (sigmoid) and a tanh-bounded output head."""

    def __init__(self, main: type[nn.Module] | None = nn.ReLU) -> None:
        super().__init__()
        self.conv, self.se = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.act = main() if main is not None else nn.Identity()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        return torch.tanh(self.fc(x.mean((2, 3))))


class StarReLU(nn.Module):  # a user activation meansparse does not know
    def forward(self, x):
        return 0.8 * x.clamp(min=0) ** 2


def test_tanh_and_sigmoid_are_sites_only_without_a_main_activation(images):
    with_relu = ms.prepare(Gated().eval(), example_inputs=images)
    assert [s.activation for s in ms.sites(with_relu)] == ["ReLU"]  # the gate and the head are not sites
    only_gates = ms.prepare(Gated(None).eval(), example_inputs=images)
    assert [s.activation for s in ms.sites(only_gates)] == ["torch.sigmoid", "torch.tanh"]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    assert [s.activation for s in ms.sites(ms.prepare(mlp, example_inputs=images))] == ["Tanh"]


def test_a_model_without_a_known_activation_warns_and_names_lookalikes(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), StarReLU(), nn.Conv2d(4, 4, 3), StarReLU()).eval()
    with pytest.warns(UserWarning, match=r"no known activation.*StarReLU x2.*register_activation"):
        prepared = ms.prepare(model, example_inputs=images)
    assert not ms.operators(prepared)
