"""Producer fusion (:mod:`meansparse.accel.producer`): a fused site also computes the eval BatchNorm / residual
add feeding it.  Outputs and gradients must stay bit-identical to the eager model, and every case the
compiled path cannot honour (train-mode BN, hooks, parameters that need gradients, a kernel that disagrees
with ATen) must fall back to the same values."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from test_fused import compiled_or_skip, same, special_values
from torch import nn

import meansparse as ms
from meansparse.accel import producer
from meansparse.models import create_model


def prepared(model, x, alpha=0.3):
    """Prepared and calibrated on a finite stand-in of ``x`` (which may hold NaN/Inf)."""
    clean = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(memory_format=_format(x))
    model = ms.prepare(model.eval(), example_inputs=(clean[:2],))
    ms.calibrate(model, [clean], progress=False, check_inputs=False)  # block inputs: any real values
    ms.set_alpha(model, alpha)
    return model


def _format(x):
    return torch.channels_last if not x.is_contiguous() else torch.contiguous_format


def run(model, inputs, mode):
    """Output, input gradients (grad mode) and the no-grad output."""
    for o in ms.operators(model):
        o.gradient = mode
    xs = [x.clone().requires_grad_() for x in inputs]
    out = model(*xs)
    up = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, xs, up)
    with torch.no_grad():
        plain = model(*inputs)
    return out.detach(), grads, plain


def assert_same_runs(eager, fused, inputs):
    for mode in ("exact", "straight_through"):
        (a, ga, pa), (b, gb, pb) = run(eager, inputs, mode), run(fused, inputs, mode)
        assert same(a, b) and same(pa, pb) and same(a, pa)
        assert all(same(x, y) for x, y in zip(ga, gb, strict=True))


def compiled_producer_used() -> bool:
    return any(producer.compiled_kernels().values()) and any(producer.verdicts().values())


class BnAdd(nn.Module):
    """act(bn(x) + conv(x)) with an in-place add on the BatchNorm's private output, then relu(bn2(.))."""

    def __init__(self, act: str, c: int = 16) -> None:
        super().__init__()
        self.bn, self.bn2, self.act = nn.BatchNorm2d(c), nn.BatchNorm2d(c, affine=False), act
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = self.bn(x)
        h += self.conv(x)
        h = F.gelu(h) if self.act == "gelu" else F.relu(h)
        return torch.relu(self.bn2(h))


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.05)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))  # negative scales flip -0.0
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


# ---------------------------------------------------------------------------------------------- compiled path


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bn_add_sites_are_bit_identical_with_special_values(act):
    compiled_or_skip()
    torch.manual_seed(0)
    x = special_values(torch.randn(8, 16, 16, 16) * 2)
    eager = prepared(randomize_bn(BnAdd(act)), x)
    fused = ms.fuse(copy.deepcopy(eager))
    assert [o.fused_producer for o in ms.operators(fused)] == ["bn+add", "bn"]
    assert "+bn+add" in repr(fused)
    assert_same_runs(eager, fused, (x,))
    assert compiled_producer_used()


@pytest.mark.parametrize("act,memory_format", [("relu", torch.contiguous_format), ("gelu", torch.contiguous_format),
                                               ("gelu", torch.channels_last)])
def test_resnet18_with_producers_is_bit_identical(act, memory_format):
    """Every site of a ResNet-18 absorbs its BatchNorm, and the residual ones the add (and the shortcut's BN);
    the later stages are below the compile threshold, so the fallback runs in the same model."""
    compiled_or_skip()
    torch.manual_seed(0)
    base = create_model("resnet18", width=8, activation=act).to(memory_format=memory_format)
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=memory_format)
    eager = prepared(randomize_bn(base), x)
    fused = ms.fuse(copy.deepcopy(eager))
    producers = [o.fused_producer for o in ms.operators(fused)]
    assert producers[:3] == ["bn", "bn", "bn+add"] and len(producers) == 17 and all(producers)
    assert_same_runs(eager, fused, (x,))
    assert compiled_producer_used()


# ---------------------------------------------------------------------------------------------- fallbacks


def test_train_mode_batchnorm_runs_the_modules(quiet):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    eager = prepared(BnAdd("gelu"), x)
    fused = ms.fuse(copy.deepcopy(eager))
    eager.train(), fused.train()
    with torch.no_grad():
        assert torch.equal(eager(x), fused(x))
    assert torch.equal(eager.bn.running_mean, fused.bn.running_mean) and not torch.equal(
        fused.bn.running_mean, torch.zeros(16))


def test_hooks_on_the_operator_see_its_real_input():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    eager = prepared(BnAdd("relu"), x)
    fused = ms.fuse(copy.deepcopy(eager))
    seen = []
    for model in (eager, fused):
        op = ms.operators(model)[0]
        h = op.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        with torch.no_grad():
            model(x)
        h.remove()
    assert torch.equal(seen[0], seen[1])


def test_parameters_that_need_gradients_get_them():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    eager = prepared(randomize_bn(BnAdd("gelu")), x)
    fused = ms.fuse(copy.deepcopy(eager))
    grads = []
    for model in (eager, fused):
        model.bn.weight.requires_grad_(True)
        model(x).square().sum().backward()
        grads.append(model.bn.weight.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])


def test_a_kernel_that_disagrees_with_aten_is_not_used(monkeypatch, caplog):
    """The first-use probe catches a producer kernel that differs from ATen (here: mul + add, no FMA)."""
    compiled_or_skip()
    monkeypatch.setattr(producer, "_fma", lambda a, b, c: a * b + c)  # inject a kernel that rounds differently
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16) * 3
    eager = prepared(randomize_bn(BnAdd("gelu")), x)
    fused = ms.fuse(copy.deepcopy(eager))
    with producer.separate_cache(), caplog.at_level(logging.WARNING, logger=producer.log.name):
        with torch.no_grad():
            assert torch.equal(eager(x), fused(x))
        verdicts = producer.verdicts()
    assert "differs from the eager reference" in caplog.text
    assert verdicts and not any(verdicts.values())


def test_inplace_add_into_a_view_is_not_absorbed():
    """``v.add_(bn(x))`` writes through a view into a tensor read later: only in-place adds into private
    tensors are absorbed.  (fx traces ``v += w`` as an out-of-place add, so only ``add_`` is in place.)"""

    class AddIntoView(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1)

        def forward(self, x):
            c = self.conv(x)
            v = c.transpose(2, 3)
            v.add_(self.bn(x))
            return F.relu(v) + c.mean()  # c.mean() sees the add

    x = torch.randn(8, 16, 16, 16)
    eager = prepared(AddIntoView(), x)
    model = ms.fuse(copy.deepcopy(eager))
    assert ms.fused_sites(model) and [o.fused_producer for o in ms.operators(model)] == [None]
    with torch.no_grad():
        assert torch.equal(eager(x), model(x))


def test_producers_false_and_unfuse(quiet):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    eager = prepared(BnAdd("gelu"), x)
    plain = ms.fuse(copy.deepcopy(eager), producers=False)
    assert ms.fused_sites(plain) and not any(o.fused_producer for o in ms.operators(plain))
    fused = ms.unfuse(ms.fuse(copy.deepcopy(eager)))
    assert not ms.fused_sites(fused) and not any(o.fused_producer for o in ms.operators(fused))
    with torch.no_grad():
        assert torch.equal(eager(x), fused(x)) and torch.equal(eager(x), plain(x))


def test_an_outer_torch_compile_traces_the_modules():
    """Under an outer torch.compile the producer path steps aside (the modules are traced as they are)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    eager = prepared(randomize_bn(BnAdd("gelu")), x)
    fused = ms.fuse(copy.deepcopy(eager))
    compiled = torch.compile(fused, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), eager(x))


def test_calibrate_save_load_and_alpha_changes_on_a_producer_fused_model(tmp_path):
    """Calibrating a fused model observes the real pre-activation (the absorbed modules run while observing),
    and state files move between fused and unfused models."""
    compiled_or_skip()
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    base = randomize_bn(BnAdd("relu")).eval()
    eager = prepared(copy.deepcopy(base), x)
    fused = ms.fuse(copy.deepcopy(eager))
    data = [torch.randn(8, 16, 16, 16) * 2 + 1]
    ms.calibrate(eager, data, progress=False, check_inputs=False)  # block inputs: any real values
    ms.calibrate(fused, data, progress=False, check_inputs=False)
    for a, b in zip(ms.operators(eager), ms.operators(fused), strict=True):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    ms.set_alpha(fused, 0.5)
    ms.save(fused, tmp_path / "s.safetensors")
    loaded = ms.load(copy.deepcopy(base), tmp_path / "s.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    assert producer.verdicts() and all(producer.verdicts().values())


def test_token_features_absorb_a_residual_add():
    """Channels last (NLC): ``gelu(x + fc(x))`` absorbs the add; the probe uses the token layout."""
    compiled_or_skip()

    class TokenAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return F.gelu(x + self.fc(x))

    torch.manual_seed(0)
    x = torch.randn(64, 64, 32)
    model = TokenAdd().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    eager = prepared(model, x)
    fused = ms.fuse(copy.deepcopy(eager))
    assert [o.fused_producer for o in ms.operators(fused)] == ["add"]
    assert_same_runs(eager, fused, (x,))
    keys = [k for k, v in producer.verdicts().items() if v and k[0].layout == ("contiguous", 3, 2)]
    assert keys
