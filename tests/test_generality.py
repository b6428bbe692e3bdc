"""Generality: prepare / calibrate / fuse / save / train / remove on many timm architectures (random weights,
small images), so a placement that is right on the miniatures is not silently wrong on users' real models.

Per architecture: ``prepare`` leaves the original untouched (state, attributes, pickle, outputs); alpha = 0 is
bit-identical; calibration statistics and the operator's output match an independent hook reference; save /
load round-trips; the fused model equals the unfused one (outputs and gradients) with every site fused; in
train mode at alpha = 0 the prepared model equals the base model (same seed: outputs, gradients, BatchNorm
statistics, stochastic depth); ``remove`` gives the untouched original back.

A few architectures run in the default suite; the rest are marked ``slow``:
``pytest -m slow tests/test_generality.py`` (about 2.5 minutes on 2 cores, see docs/zoo.md).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_zoo import _imported
from torch import nn

import meansparse as ms
from meansparse import zoo
from meansparse._compile import ENV_VAR

# name -> (image size, create_model keyword arguments); drop_path_rate is added where the model takes it
MODELS: dict[str, tuple[int, dict]] = {
    "resnet18": (32, {}),
    "resnetv2_50": (32, {}),
    "regnetx_002": (32, {}),
    "efficientnet_b0": (32, {}),
    "mobilenetv3_small_100": (32, {}),
    "convnext_atto": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
    "deit_tiny_patch16_224": (32, {"img_size": 32}),
    "swin_tiny_patch4_window7_224": (28, {"img_size": 28, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)}),
    "maxvit_nano_rw_256": (64, {"img_size": 64}),
    "levit_128s": (64, {"img_size": 64}),
    "efficientformer_l1": (224, {}),  # its attention bias is sized for 224 px
    "mobilevit_xxs": (64, {}),
    "densenet121": (32, {}),
    "inception_v3": (75, {}),
    "repvgg_a0": (32, {}),
    "nf_resnet26": (32, {}),
    "rexnet_100": (32, {}),
    "dla34": (32, {}),
    "cspresnet50": (32, {}),
    "ghostnet_100": (32, {}),
    "poolformer_s12": (32, {}),
    "mixer_s16_224": (32, {"img_size": 32}),
    "edgenext_xx_small": (64, {}),
}
#: in the default run: one per issue-22 failure mode (Identity fusion, a forward cache, ReLU6, BN-act in train)
FAST = ("resnet18", "levit_128s", "rexnet_100", "efficientnet_b0")
PARAMS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in MODELS]


@pytest.fixture(scope="module")
def timm():
    return _imported(zoo.import_timm)


def build(timm, name: str) -> nn.Module:
    """The architecture with random weights, stochastic depth on where it has it, non-trivial BN statistics."""
    size, kw = MODELS[name]
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.2, **kw)
    except TypeError:  # no stochastic depth in this architecture
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(name: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    size = MODELS[name][0]
    return torch.rand(n, 3, size, size)


def snapshot(model: nn.Module) -> tuple:
    """What "untouched" means: every attribute of every module (by identity) and every tensor's value."""
    attrs = [(m, dict(m.__dict__)) for m in model.modules()]
    return attrs, {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap: tuple, x: torch.Tensor, ref: torch.Tensor) -> None:
    attrs, state = snap
    for m, before in attrs:
        assert m.__dict__.keys() == before.keys() and all(m.__dict__[k] is v for k, v in before.items()), m
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    pickle.dumps(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def channel_dim(layout: str) -> int:
    return 1 if layout in ("NCHW", "NC", "NCL") else -1


def check_calibration_and_formula(model: nn.Module, x: torch.Tensor, alpha: float = 0.5) -> None:
    """Statistics are each site input's per-channel mean / variance; outputs follow the MeanSparse rule."""
    seen: dict[int, torch.Tensor] = {}
    ops = ms.operators(model)

    def record(op, args):  # returns None: the operator keeps its own input (in-place activations follow it)
        seen.setdefault(id(op), args[0].detach().clone())

    hooks = [op.register_forward_pre_hook(record) for op in ops]
    ms.calibrate(model, [x], progress=False)
    for h in hooks:
        h.remove()
    for op in ops:
        v = seen[id(op)].movedim(channel_dim(op.layout), 0).flatten(1).double()
        torch.testing.assert_close(op.running_mean.double(), v.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(op.running_var.double(), v.var(1, unbiased=False), rtol=1e-4, atol=1e-5)
    ms.set_alpha(model, alpha)
    checked = []

    def formula(op, args, out):
        xi, cd = args[0], channel_dim(op.layout)
        shape = [1] * xi.ndim
        shape[cd] = -1
        m = op.running_mean.view(shape)
        t = (op.alpha * op.running_var.sqrt()).view(shape)
        assert torch.equal(out, torch.where((xi - m).abs() < t, m, xi)), op.site.name
        checked.append(op)

    hooks = [op.register_forward_hook(formula) for op in ops]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(checked) >= len(ops)


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    out = model(xr)
    (g,) = torch.autograd.grad(out.square().sum(), xr)
    return out.detach(), g


def train_step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return outputs_and_grads(model, x)


def check_train_mode(timm, name: str, x: torch.Tensor) -> None:
    """At alpha = 0 a prepared model in train mode is the base model in train mode (same seed)."""
    base, twin = build(timm, name), build(timm, name)
    model = ms.prepare(twin, example_inputs=x[:2])
    base.train()
    model.train()
    for seed in (0, 1):
        for a, b in zip(train_step(base, x, seed), train_step(model, x, seed), strict=True):
            assert torch.equal(a, b)
    want, got = base.state_dict(), twin.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # BatchNorm statistics updated alike


@pytest.mark.parametrize("name", PARAMS)
def test_architecture(name, timm, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")  # the fused path's logic; its compiled kernels are test_fused's
    base, x = build(timm, name), images(name)
    with torch.no_grad():
        ref = base(x)
    snap = snapshot(base)
    assert ms.sites(base)
    model = ms.prepare(base, example_inputs=x[:2])
    assert_untouched(base, snap, x, ref)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # alpha = 0
    check_calibration_and_formula(model, x)

    ms.save(model, tmp_path / "state.safetensors")
    loaded = ms.load(build(timm, name), tmp_path / "state.safetensors")
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded(x), want)

    fused = copy.deepcopy(model)
    ms.fuse(fused)
    assert ms.fused_sites(fused) == [s.name for s in ms.sites(fused)]
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x), strict=True):
        assert torch.equal(a, b)

    check_train_mode(timm, name, x)
    assert ms.remove(model) is base
    assert_untouched(base, snap, x, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name,producers", [("resnet18", True), ("efficientnet_b0", False)])
def test_compiled_fusion_with_producers(name, producers, timm):
    """The compiled kernels, BatchNorm / add producers absorbed through timm's nn.Identity placeholders
    included, on real architectures: bit-identical outputs and input gradients."""
    from test_fused import compiled_or_skip

    compiled_or_skip()
    base = build(timm, name)
    torch.manual_seed(1)
    x = torch.rand(8, 3, 64, 64)  # big enough for the compiled kernels at the early stages
    model = ms.prepare(base, example_inputs=x[:2])
    ms.calibrate(model, [x], progress=False)
    ms.set_alpha(model, 0.5)
    fused = ms.fuse(copy.deepcopy(model))
    assert ms.fused_sites(fused) == [s.name for s in ms.sites(fused)]
    # resnet18: nn.BatchNorm2d behind nn.Identity; efficientnet: BatchNormAct2d calls F.batch_norm (not absorbed)
    assert any(o.fused_producer for o in ms.operators(fused)) is producers
    for a, b in zip(outputs_and_grads(fused, x), outputs_and_grads(model, x), strict=True):
        assert torch.equal(a, b)
