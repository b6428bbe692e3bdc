"""Fused operator+activation, the lean eager operator and the fast calibration statistics.

Fused outputs and gradients are compared with the eager reference (operator, then activation, through
autograd): bit-identical on the eager fallback path and on the compiled path, NaN/Inf/-0.0 included.
"""

from __future__ import annotations

import copy
import logging
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meansparse as ms
from meansparse import MeanSparse, Moments, fused

# ---------------------------------------------------------------------------------------------- helpers


def calibrated(model, x, alpha=0.4):
    ms.calibrate(model, [x], progress=False)
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
    monkeypatch.setenv(fused.ENV_VAR, "0")


def compiled_or_skip():
    if not fused.compile_enabled():
        pytest.skip(f"torch.compile unavailable here ({fused.compile_disabled_reason()})")


def used_compiled(kind, role, key, params=()):
    k = fused._KERNELS.get((kind, params, role, key))
    return k is not None and k._compiled is not None and fused.compile_disabled_reason() is None


# ---------------------------------------------------------------------------------------------- fusing pass


@pytest.mark.parametrize("name", ["resnet18", "preact_wrn", "se", "vit", "convnext", "reused"])
@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_fused_model_is_bit_identical_on_the_eager_path(name, mode, build_model, images, eager_only):
    model = calibrated(ms.prepare(build_model(name), example_inputs=images), images)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert ms.fused_sites(model) == [o.site_name for o in ms.operators(model)]  # every site fused
    assert [o.site_name for o in ms.operators(model)] == [o.site_name for o in ms.operators(ref)]
    for a, b in zip(outputs_and_grads(model, images, mode), outputs_and_grads(ref, images, mode), strict=True):
        assert torch.equal(a, b)


def test_inplace_activation_whose_input_is_read_later_is_not_fused(build_model, images, eager_only):
    base = build_model("functional")  # y.relu_() result discarded: later code reads the mutated y
    model = calibrated(ms.prepare(base, example_inputs=images), images, 0.5)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    kinds = {o.activation: o.fused_activation for o in ms.operators(model)}
    assert kinds["Tensor.relu_"] is None
    assert kinds["F.relu"] == ("relu", (), False) and kinds["F.gelu"] == ("gelu", ("none",), False)
    with torch.no_grad():
        assert torch.equal(model(images), ref(images))


def test_inplace_module_activation_is_fused_when_private(build_model, images, eager_only):
    model = calibrated(ms.prepare(build_model("preact_wrn"), example_inputs=images), images)
    ms.fuse(model)
    assert all(o.inplace and o.fused_activation == ("relu", (), False) for o in ms.operators(model))


def test_modules_method_fuses_wrappers(build_model, images, quiet, eager_only):
    base = build_model("untraceable")  # PReLU (unsupported), ELU; functional relu not covered
    model = calibrated(ms.prepare(base, method="modules", example_inputs=images), images)
    ref = copy.deepcopy(model)
    ms.fuse(model)
    assert [o.fused_activation for o in ms.operators(model)] == [None, ("elu", (1.0,), False)]
    assert isinstance(model.act2, fused.FusedMeanSparseActivation) and isinstance(model.act2, ms.MeanSparseActivation)
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
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(c, layout=layout, site_name="s")
    op.set_statistics(torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5, num_samples=10)
    op.set_alpha(0.5)
    return op


def reference(op, x, spec, mode):
    """Eager reference: the unfused operator, then the activation, through autograd."""
    op.gradient = mode
    xr = x.clone().requires_grad_()
    y = fused.act_eager(op(xr), spec)
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
    spec = ("relu", (), False)
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


@pytest.mark.parametrize("kind,params", [("leaky_relu", (0.1,)), ("softplus", (1.0, 20.0))])
def test_compiled_in_kernel_activations_are_bit_identical(kind, params):
    compiled_or_skip()
    op = make_op()
    x = special_values(torch.randn(8, 16, 16, 16) * 3)
    spec = (kind, params, False)
    y, g, up = reference(op, x, spec, "exact")
    fy, fg, _ = fused_result(op, x, spec, "exact", up)
    assert same(fy, y) and same(fg, g)
    assert used_compiled(kind, "exact", ("contiguous", 4, 1), params)


def test_compiled_relu_gradient_from_its_output_handles_edge_cases():
    """ReLU saves only its output; the band is read back as z == m (m > 0, t > 0): check zero thresholds,
    inputs exactly at the mean and negative means."""
    compiled_or_skip()
    op = make_op(c=4)
    op.set_statistics(torch.tensor([0.5, 0.5, -0.3, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]), num_samples=3)
    x = torch.randn(8, 4, 32, 32)
    x[:, :2, :4] = 0.5  # exactly the mean: outside the (empty) band of channel 0, inside channel 1's
    spec = ("relu", (), False)
    for mode in ("exact", "straight_through"):
        y, g, up = reference(op, x, spec, mode)
        fy, fg, _ = fused_result(op, x, spec, mode, up)
        assert torch.equal(fy, y) and torch.equal(fg, g)
        if mode == "exact":
            assert fg[:, 0, :4].ne(0).all() and fg[:, 1, :4].eq(0).all()


@pytest.mark.parametrize("kind,params", [("gelu", ("none",)), ("silu", ()), ("hardswish", ())])
def test_compiled_split_activations_are_bit_identical(kind, params):
    """GELU/SiLU/Hardswish run ATen's kernels between a compiled sparsify and a compiled band mask."""
    compiled_or_skip()
    op = make_op(c=48, layout="NLC")
    x = special_values(torch.randn(4, 256, 48) * 2)
    spec = (kind, params, False)
    for mode in ("exact", "straight_through"):
        y, g, up = reference(op, x, spec, mode)
        fy, fg, fy0 = fused_result(op, x, spec, mode, up)
        assert same(fy, y)
        assert same(fy0, fy)
        assert same(fg, g)
    assert used_compiled("", "sparsify", ("contiguous", 3, 2)) and used_compiled("", "band_mask", ("contiguous", 3, 2))


def test_compile_failure_falls_back_once_with_a_debug_log(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_disabled_reason", None)
    monkeypatch.setattr(fused, "_KERNELS", {})

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    op = make_op()
    x = torch.randn(8, 16, 16, 16)
    spec = ("relu", (), False)
    with caplog.at_level(logging.DEBUG, logger="meansparse.fused"):
        y, g, up = reference(op, x, spec, "exact")
        fy, fg, _ = fused_result(op, x, spec, "exact", up)
        fused_result(op, x, spec, "straight_through", up)
    assert torch.equal(fy, y) and torch.equal(fg, g)
    assert "no C++ compiler" in fused.compile_disabled_reason() and not fused.compile_enabled()
    assert len([r for r in caplog.records if r.name == "meansparse.fused"]) == 1


def test_env_var_disables_compilation(monkeypatch):
    monkeypatch.setenv(fused.ENV_VAR, "0")
    assert not fused.compile_enabled()
    monkeypatch.setenv(fused.ENV_VAR, "1")
    assert fused.compile_enabled() == (fused.compile_disabled_reason() is None)


def test_user_errors_are_not_swallowed():
    op = make_op()
    with pytest.raises(ValueError, match="channels"):
        op(torch.randn(8, 15, 16, 16), activation=("relu", (), False))


# ---------------------------------------------------------------------------------------------- lean operator


def test_centre_threshold_cache_follows_every_change():
    op = make_op(c=3, layout="NC")
    x = torch.randn(50, 3) * 2

    def fresh():
        m, t = (v.to(x.dtype) for v in op.center_threshold())
        return torch.where((x - m).abs() < t, m, x)

    assert torch.equal(op(x), fresh())
    op.set_alpha(1.5)
    assert torch.equal(op(x), fresh())
    op.set_statistics(torch.tensor([1.0, -1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0]), num_samples=5)
    assert torch.equal(op(x), fresh())
    with torch.no_grad():
        op.running_mean.add_(0.25)  # in-place edit of a buffer
    assert torch.equal(op(x), fresh())
    op.centering = "global"
    assert torch.equal(op(x), fresh())
    op.load_state_dict(make_op(c=3, layout="NC", seed=5).state_dict())
    assert torch.equal(op(x), fresh())
    op.double()  # new buffer objects
    x = x.double()
    assert torch.equal(op(x), fresh())
    with torch.inference_mode():  # inference tensors have no version counter: computed every call
        assert torch.equal(op(x), fresh())


def test_alpha_zero_returns_the_input_object():
    op = make_op()
    op.set_alpha(0.0)
    x = torch.randn(2, 16, 3, 3)
    assert op(x) is x


# ---------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("shape,cd", [((6, 5, 7, 3), 1), ((4, 9, 5), 2), ((300, 4), 1), ((3, 6, 2, 4), 3),
                                      ((2, 3, 1, 1), 1), ((1, 4, 257), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fast_batch_stats_match_the_float64_reference(shape, cd, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 30).to(dtype)  # |mean| = 15 sigma: a naive sum of squares would fail
    fast, exact = Moments.batch_stats_fast(x, cd), Moments.batch_stats(x, cd)
    assert torch.equal(fast.count, exact.count)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(fast.mean, exact.mean, rtol=tol, atol=0)
    torch.testing.assert_close(fast.var, exact.var, rtol=tol * 10, atol=0)


def test_fast_batch_stats_compiled_path_and_chunks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 16, 16) * 3 - 40
    exact = Moments.batch_stats(x, 1)
    monkeypatch.setattr("meansparse.moments.CHUNK_ELEMENTS", 1000)  # eager: many chunks
    for fast in (Moments.batch_stats_fast(x, 1), Moments.batch_stats_fast(x.permute(0, 2, 3, 1), 3)):
        torch.testing.assert_close(fast.mean, exact.mean, rtol=1e-9, atol=0)
        torch.testing.assert_close(fast.var, exact.var, rtol=1e-6, atol=0)
    if fused.compile_enabled():
        from meansparse import moments

        fast = Moments.batch_stats_fast(x, 1)
        assert moments._KERNELS["first"]._compiled is not None
        torch.testing.assert_close(fast.mean, exact.mean, rtol=1e-9, atol=0)
        torch.testing.assert_close(fast.var, exact.var, rtol=1e-6, atol=0)


def test_fused_moments_update_matches_the_reference_and_flags_non_finite():
    """``Moments.update_fast`` (batch moments + Chan merge + finiteness in one compiled call) equals the
    float64 reference over several batches of different sizes, and its flag catches NaN/Inf."""
    compiled_or_skip()
    from meansparse import moments

    torch.manual_seed(0)
    batches = [torch.randn(n, 8, 16, 16) * (1 + i) - 20 for i, n in enumerate([16, 17, 40])]
    acc, ref = Moments(), Moments()
    for b in batches:
        acc.update_fast(b, 1)
        ref.update(b, 1)
        assert acc.finite is not None and bool(acc.finite)
    assert moments._KERNELS["update_first"]._compiled is not None
    assert acc.total == ref.total == sum(b.numel() // 8 for b in batches)
    torch.testing.assert_close(acc.mean, ref.mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(acc.var, ref.var, rtol=1e-6, atol=0)
    bad = batches[0].clone()
    bad[2, 5, 3, 3] = float("inf")
    acc.update_fast(bad, 1)
    assert not bool(acc.finite)
    op = MeanSparse(8, layout="NCHW", site_name="s")
    op.start_observing()
    op(bad)
    assert not bool(op.observer_finite())


def test_calibration_keeps_batches_exact_and_merges_per_batch(build_model):
    torch.manual_seed(0)
    model = ms.prepare(build_model("vit"))
    batches = [torch.randn(n, 3, 16, 16) * (1 + i) for i, n in enumerate([3, 1, 4])]
    ms.calibrate(model, batches, progress=False)
    ref = ms.prepare(build_model("vit"))
    for op in ms.operators(ref):
        op.start_observing()
    feats = {i: [] for i in range(2)}
    hooks = [op.register_forward_pre_hook(lambda m, a, i=i: feats[i].append(a[0])) for i, op in
             enumerate(ms.operators(ref))]
    with torch.no_grad():
        for b in batches:
            ref(b)
    for h in hooks:
        h.remove()
    for i, op in enumerate(ms.operators(model)):
        whole = Moments()
        for f in feats[i]:
            whole.update(f, -1)
        torch.testing.assert_close(op.running_var.double(), whole.var, rtol=1e-6, atol=0)


def test_fused_activation_in_extra_repr(build_model, images, eager_only):
    model = ms.fuse(ms.prepare(build_model("se"), example_inputs=images))
    assert "fused=silu" in repr(ms.operators(model)[0])
    assert F.silu(images).shape == images.shape


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_cpu_allocator_applies_mallopt_in_a_fresh_process():
    """Run in a child: the setting is process-wide.  glibc accepts both thresholds; out-of-range is refused."""
    code = ("import meansparse as ms; "
            "print(ms.tune_cpu_allocator(), ms.tune_cpu_allocator(0), ms.tune_cpu_allocator(2**40))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]
