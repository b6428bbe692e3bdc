"""Fusing (:mod:`meansparse.accel.fused`) and the fused kernels (:mod:`meansparse.accel.kernels`).

Fused outputs and gradients are compared with the eager reference (operator, then activation, through
autograd): bit-identical on the eager fallback path and on the compiled path, NaN/Inf/-0.0 included.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_operator import lean_op
from torch import nn

import meansparse as ms
from meansparse._compile import ENV_VAR, compile_disabled_reason, compile_enabled
from meansparse.accel import FusedMeanSparse, FusedMeanSparseActivation, FusedMeanSparseOutput, kernels
from meansparse.placement.registry import ActivationSpec

# ---------------------------------------------------------------------------------------------- helpers


def calibrated(model, x, alpha=0.4):
    ms.calibrate(model, [x], progress=False, check_inputs=False)  # kernel tests: arbitrary real inputs
    ms.set_alpha(model, alpha)
    return model


def outputs_and_grads(model, x, mode):
    for o in ms.operators(model):
        o.gradient = mode
    xr = x.clone().requires_grad_()
    out = model(xr)
    (g,) = torch.autograd.grad(out.square().sum(), xr)
    with torch.no_grad():
        nograd = model(x)
    return out.detach(), g, nograd


@pytest.fixture
def eager_only(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")


def compiled_or_skip():
    if not compile_enabled():
        pytest.skip(f"torch.compile unavailable here ({compile_disabled_reason()})")


def used_compiled(kernel, role, key, params=()):
    return bool(kernels.compiled_kernels().get((kernel, params, role, key))) and compile_disabled_reason() is None


# ---------------------------------------------------------------------------------------------- fusing pass


@pytest.mark.parametrize("name", ["resnet18", "preact_wrn", "se", "vit", "convnext", "reused"])
@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_fused_model_is_bit_identical_on_the_eager_path(name, mode, build_model, images, eager_only):
    model = calibrated(ms.prepare(build_model(name), example_inputs=images), images)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [o.site.name for o in ms.operators(model)]  # every site fused
    assert [o.site.name for o in ms.operators(model)] == [o.site.name for o in ms.operators(ref)]
    for a, b in zip(outputs_and_grads(model, images, mode), outputs_and_grads(ref, images, mode), strict=True):
        assert torch.equal(a, b)


def test_inplace_activation_whose_input_is_read_later_is_not_fused(build_model, images, eager_only):
    base = build_model("functional")  # y.relu_() result discarded: later code reads the mutated y
    model = calibrated(ms.prepare(base, example_inputs=images), images, 0.5)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    fused = {o.site.activation: o.fused_activation for o in ms.operators(model)}
    assert fused["Tensor.relu_"] is None
    assert fused["F.relu"] == ("relu", (), False) and fused["F.gelu"] == ("gelu", ("none",), False)
    with torch.no_grad():
        assert torch.equal(model(images), ref(images))


def test_inplace_module_activation_is_fused_when_private(build_model, images, eager_only):
    model = calibrated(ms.prepare(build_model("preact_wrn"), example_inputs=images), images)
    ms.fuse(model)
    assert all(o.site.inplace and o.fused_activation == ("relu", (), False) for o in ms.operators(model))


def test_modules_method_fuses_wrappers(build_model, images, quiet, eager_only):
    base = build_model("untraceable")  # PReLU (unsupported), ELU; functional relu not covered
    model = calibrated(ms.prepare(base, method="modules", example_inputs=images), images)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert [o.fused_activation for o in ms.operators(model)] == [None, ("elu", (1.0,), False)]
    assert isinstance(model.act2, FusedMeanSparseActivation)
    assert isinstance(model.act2, ms.placement.MeanSparseActivation)
    for a, b in zip(outputs_and_grads(model, images, "exact"), outputs_and_grads(ref, images, "exact"), strict=True):
        assert torch.equal(a, b)
    assert isinstance(ms.remove(model).act2, nn.ELU)


def test_modules_wrapper_with_inplace_activation_writes_back(eager_only):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 5, 5)
    model = calibrated(ms.prepare(seq, method="modules", example_inputs=x), x)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    conv_out = model[0](x)
    with torch.no_grad():
        got = model[1](conv_out)
        want = ref[1](ref[0](x))
    assert got is conv_out and torch.equal(got, want)  # in place, like the activation it replaces


def test_unfuse_alpha_zero_calibrate_save_load(build_model, images, tmp_path, eager_only):
    base = build_model("resnet18")
    model = ms.fuse(ms.prepare(base, example_inputs=images))
    with torch.no_grad():
        assert torch.equal(model(images), base(images))  # alpha 0: the original model
    ms.calibrate(model, [images], progress=False)  # observing through fused calls
    ref = ms.prepare(base, example_inputs=images)
    ms.calibrate(ref, [images], progress=False)
    for a, b in zip(ms.operators(model), ms.operators(ref), strict=True):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    ms.set_alpha(model, 0.3)
    ms.save(model, tmp_path / "s.safetensors")
    loaded = ms.load(build_model("resnet18"), tmp_path / "s.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        ms.unfuse(model)
        assert not ms.fused_sites(model)
        assert torch.equal(model(images), loaded(images))
    assert ms.fuse(ms.fuse(model)) is model and len(ms.fused_sites(model)) == 17  # idempotent
    assert ms.remove(model) is base


@pytest.mark.parametrize("method,name", [("fx", "resnet18"), ("modules", "untraceable")])
def test_prepare_fuse_true_equals_prepare_then_fuse(method, name, build_model, images, quiet, eager_only):
    with pytest.warns(DeprecationWarning, match=r"ms.fuse\(model\)"):  # kept for old callers, off the signature
        model = calibrated(ms.prepare(build_model(name), method=method, example_inputs=images, fuse=True), images)
    ref = calibrated(ms.fuse(ms.prepare(build_model(name), method=method, example_inputs=images)), images)
    assert ms.fused_sites(model) == ms.fused_sites(ref) and ms.fused_sites(model)
    for a, b in zip(outputs_and_grads(model, images, "exact"), outputs_and_grads(ref, images, "exact"), strict=True):
        assert torch.equal(a, b)
    assert not ms.fused_sites(ms.prepare(build_model(name), method=method, example_inputs=images))


def test_uncalibrated_fused_site_raises(build_model, images):
    model = ms.fuse(ms.prepare(build_model("se"), example_inputs=images))
    ms.set_alpha(model, 0.2)
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(images)


# ---------------------------------------------------------------------------------------------- compiled path


def make_op(c=16, layout="NCHW", seed=0):
    return lean_op(c, layout, seed, cls=FusedMeanSparse)


def reference(op, x, spec, mode):
    """Eager reference: the unfused operator, then the activation, through autograd."""
    op.gradient = mode
    xr = x.clone().requires_grad_()
    y = kernels.act_eager(op(xr), spec)
    up = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (g,) = torch.autograd.grad(y, xr, up)
    return y.detach(), g, up


def fused_result(op, x, spec, mode, up):
    op.gradient = mode
    xr = x.clone().requires_grad_()
    y = op(xr, activation=spec)
    (g,) = torch.autograd.grad(y, xr, up)
    with torch.no_grad():
        y0 = op(x, activation=spec)
    return y.detach(), g, y0


def same(a, b):
    """Bit-identical, NaN in the same places (NaN != NaN for torch.equal, so both are mapped to 7)."""
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def special_values(x):
    x = x.clone()
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30])
    return x


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_relu_is_bit_identical(memory_format):
    compiled_or_skip()
    op = make_op()
    x = special_values(torch.randn(8, 16, 16, 16) * 2).contiguous(memory_format=memory_format)
    spec = ActivationSpec("relu", (), False)
    for mode in ("exact", "straight_through"):
        y, g, up = reference(op, x, spec, mode)
        fy, fg, fy0 = fused_result(op, x, spec, mode, up)
        assert same(fy, y)
        assert same(fy0, fy)
        assert same(fg, g)
        assert fy.is_contiguous(memory_format=memory_format)
    layout = "contiguous" if memory_format == torch.contiguous_format else "channels_last"
    assert used_compiled("relu", "forward", (layout, 4, 1))
    assert used_compiled("relu", "exact_from_output", (layout, 4, 1))


@pytest.mark.parametrize("kernel,params", [("leaky_relu", (0.1,)), ("softplus", (1.0, 20.0))])
def test_compiled_in_kernel_activations_are_bit_identical(kernel, params):
    compiled_or_skip()
    op = make_op()
    x = special_values(torch.randn(8, 16, 16, 16) * 3)
    spec = ActivationSpec(kernel, params, False)
    y, g, up = reference(op, x, spec, "exact")
    fy, fg, _ = fused_result(op, x, spec, "exact", up)
    assert same(fy, y) and same(fg, g)
    assert used_compiled(kernel, "exact", ("contiguous", 4, 1), params)


def test_compiled_relu_gradient_from_its_output_handles_edge_cases():
    """ReLU saves only its output; the band is read back as z == m (m > 0, t > 0): check zero thresholds,
    inputs exactly at the mean and negative means."""
    compiled_or_skip()
    op = make_op(c=4)
    op.set_statistics(torch.tensor([0.5, 0.5, -0.3, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]), num_samples=3)
    x = torch.randn(8, 4, 32, 32)
    x[:, :2, :4] = 0.5  # exactly the mean: outside the (empty) band of channel 0, inside channel 1's
    spec = ActivationSpec("relu", (), False)
    for mode in ("exact", "straight_through"):
        y, g, up = reference(op, x, spec, mode)
        fy, fg, _ = fused_result(op, x, spec, mode, up)
        assert torch.equal(fy, y) and torch.equal(fg, g)
        if mode == "exact":
            assert fg[:, 0, :4].ne(0).all() and fg[:, 1, :4].eq(0).all()


@pytest.mark.parametrize("kernel,params", [("gelu", ("none",)), ("silu", ()), ("hardswish", ())])
def test_compiled_split_activations_are_bit_identical(kernel, params):
    """GELU/SiLU/Hardswish run ATen's kernels between a compiled sparsify and a compiled band mask."""
    compiled_or_skip()
    op = make_op(c=48, layout="NLC")
    x = special_values(torch.randn(4, 256, 48) * 2)
    spec = ActivationSpec(kernel, params, False)
    for mode in ("exact", "straight_through"):
        y, g, up = reference(op, x, spec, mode)
        fy, fg, fy0 = fused_result(op, x, spec, mode, up)
        assert same(fy, y)
        assert same(fy0, fy)
        assert same(fg, g)
    key = ("contiguous", 3, 2)  # the activation's gradient is a fresh tensor: the band is zeroed in place
    assert used_compiled("", "sparsify", key) and used_compiled("", "band_mask_in_place", key)


def test_user_errors_are_not_swallowed():
    op = make_op()
    with pytest.raises(ValueError, match="channels"):
        op(torch.randn(8, 15, 16, 16), activation=ActivationSpec("relu", (), False))


def test_fused_activation_in_extra_repr(build_model, images, eager_only):
    model = ms.fuse(ms.prepare(build_model("se"), example_inputs=images))
    assert "fused=silu" in repr(ms.operators(model)[0])
    assert F.silu(images).shape == images.shape


# ---------------------------------------------------------------------------------- sites with no activation


@pytest.mark.parametrize("name,kw", [
    ("preact_wrn", {"residual_adds": True}),                            # the dm_wrn placement: adds after blocks
    ("vit", {"residual_adds": True, "outputs": r"\.mlp\.fc2$"}),         # the swin placement: NLC tokens
    ("convnext", {"outputs": r"\.pwconv2$"}),                            # an output site on NHWC features
])
@pytest.mark.parametrize("compiled", [False, True])
def test_add_and_output_sites_are_fused_bit_identically(name, kw, compiled, build_model, monkeypatch):
    if not compiled:
        monkeypatch.setenv(ENV_VAR, "0")
    else:
        compiled_or_skip()
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)  # large enough for the compiled kernels at most sites
    model = calibrated(ms.prepare(build_model(name), example_inputs=x[:2], **kw), x, alpha=0.3)
    kinds = {o.site.kind for o in ms.operators(model)}
    assert kinds & {"add", "output"}
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [o.site.name for o in ms.operators(model)]  # every site of the placement
    for o in ms.operators(model):
        if o.site.kind in ("add", "output"):
            assert o.fused_activation == ("identity", (), False)
    if name == "preact_wrn":
        assert [o.fused_producer for o in ms.operators(model) if o.site.kind == "add"] == ["add"] * 3
    if name == "vit":  # fc1's output feeds only the GELU site, fc2's only its output site: sparsified in place
        owned = [o.site.name for o in ms.operators(model) if kernels.owns_input(o)]
        assert any("fc2" in n for n in owned) and len(owned) >= 2
    for mode in ("exact", "straight_through"):
        for a, b in zip(outputs_and_grads(model, x, mode), outputs_and_grads(ref, x, mode), strict=True):
            assert same(a, b)
    if name == "vit" and compiled:
        assert any(role == "sparsify_in_place" and done for (_, _, role, _), done in kernels.compiled_kernels().items())
    ms.unfuse(model)
    assert not ms.fused_sites(model) and not any(kernels.owns_input(o) for o in ms.operators(model))


class _SharedHidden(nn.Module):
    """fc1's output feeds the GELU site and, when ``shared``, a second reader too."""

    def __init__(self, shared: bool):
        super().__init__()
        self.shared = shared
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x):
        h = self.fc1(x)
        out = self.fc2(self.act(h))
        return out + h[..., :16] if self.shared else out


@pytest.mark.parametrize("shared", [False, True])
def test_a_private_input_is_sparsified_in_place_and_a_shared_one_is_not(shared):
    compiled_or_skip()
    torch.manual_seed(0)
    x = torch.randn(1024, 4, 16)  # hidden 1024 x 4 x 64 (NLC tokens): the compiled kernels
    model = calibrated(ms.prepare(_SharedHidden(shared).eval(), example_inputs=x[:2]), x, alpha=0.5)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    (op,) = ms.operators(model)
    assert kernels.owns_input(op) is not shared
    for mode in ("exact", "straight_through"):
        for a, b in zip(outputs_and_grads(model, x, mode), outputs_and_grads(ref, x, mode), strict=True):
            assert same(a, b)


def test_modules_method_fuses_output_wrappers(build_model, images, quiet, eager_only):
    model = calibrated(ms.prepare(build_model("preact_wrn"), method="modules", residual_adds=True,
                                  example_inputs=images), images)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [o.site.name for o in ms.operators(model)]
    assert isinstance(model.blocks[0], FusedMeanSparseOutput)
    for a, b in zip(outputs_and_grads(model, images, "exact"), outputs_and_grads(ref, images, "exact"), strict=True):
        assert torch.equal(a, b)
    ms.unfuse(model)
    assert type(model.blocks[0]) is ms.placement.MeanSparseOutput


class _BehindIdentity(nn.Module):
    """timm's pattern: BN, then a disabled drop-block (``nn.Identity``) or a dropout, then an in-place ReLU."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1, self.drop1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Identity()
        self.conv2, self.bn2, self.drop2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Dropout(0.2)
        self.conv3, self.bn3, self.drop3 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Identity()
        self.act1, self.act2, self.act3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act1(self.drop1(self.bn1(self.conv1(x))))
        y = self.act2(self.drop2(self.bn2(self.conv2(x))))
        return self.act3(self.drop3(self.bn3(self.conv3(y))) + x)


@pytest.mark.parametrize("compiled", [False, True])
def test_sites_behind_identity_like_modules_are_fused(compiled, monkeypatch):
    """An nn.Identity / eval Dropout between the producer and the site hides neither who owns the input nor
    (Identity) what produced it: every site fuses, bit-identically."""
    if not compiled:
        monkeypatch.setenv(ENV_VAR, "0")
    else:
        compiled_or_skip()
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    model = calibrated(ms.prepare(_BehindIdentity().eval(), example_inputs=x[:2]), x, alpha=0.3)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [o.site.name for o in ms.operators(model)]
    producers = [o.fused_producer for o in ms.operators(model)]
    assert producers[0] is not None and producers[1] is None and producers[2] is not None  # dropout: not absorbed
    for mode in ("exact", "straight_through"):
        for a, b in zip(outputs_and_grads(model, x, mode), outputs_and_grads(ref, x, mode), strict=True):
            assert same(a, b)
