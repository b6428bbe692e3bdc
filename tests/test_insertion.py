"""Automatic insertion on miniature architectures: site lists, alpha = 0 equivalence, selection, removal."""

from __future__ import annotations

import dataclasses
import inspect
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meansparse as ms
from meansparse import MeanSparse, SiteInfo
from meansparse.placement import MeanSparseActivation
from meansparse.placement.candidates import Candidate, make_operator
from meansparse.placement.fx_strategy import prepare_fx
from meansparse.placement.module_strategy import prepare_modules
from meansparse.placement.prepare import PrepareOptions, prepare

# name -> (sites, sites after a residual add, expected (layout, channels) of the first site)
EXPECTED = {
    "resnet18": (17, 8, ("NCHW", 4)),
    "preact_wrn": (7, 0, ("NCHW", 4)),
    "se": (3, 0, ("NCHW", 8)),
    "vit": (2, 0, ("NLC", 32)),
    "convnext": (2, 0, ("NHWC", 32)),
    "functional": (5, 1, ("NCHW", 6)),
    "reused": (3, 1, ("NCHW", 6)),
}


def calibrate_quick(model, x):
    ms.calibrate(model, [x[:3], x[3:]], progress=False)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sites_and_alpha_zero_equivalence(name, build_model, images):
    base = build_model(name)
    with torch.no_grad():
        ref = base(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traceable models must not fall back
        model = ms.prepare(base, example_inputs=images)
    n, n_res, (layout, channels) = EXPECTED[name]
    s = ms.sites(model)
    assert len(s) == n
    assert sum(x.after_residual_add for x in s) == n_res
    assert [x.index for x in s] == list(range(n))
    assert len({x.name for x in s}) == n
    assert (s[0].layout, s[0].channels) == (layout, channels)
    with torch.no_grad():
        assert torch.equal(model(images), ref)
    # operators are wired in: a large alpha after calibration changes the output
    calibrate_quick(model, images)
    ms.set_alpha(model, 3.0)
    with torch.no_grad():
        assert not torch.equal(model(images), ref)
    ms.set_alpha(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(images), ref)
    original = ms.remove(model)
    assert original is base and not ms.operators(original)
    with torch.no_grad():
        assert torch.equal(original(images), ref)


def test_layouts_without_probe_are_inferred_on_first_data(build_model, images):
    model = ms.prepare(build_model("convnext"))
    assert [s.layout for s in ms.sites(model)] == [None, None]
    with torch.no_grad():
        model(images)
    assert [(s.layout, s.channels) for s in ms.sites(model)] == [("NHWC", 32)] * 2


def test_functional_names_kinds_and_inplace(build_model, images):
    model = ms.prepare(build_model("functional"), example_inputs=images)
    s = ms.sites(model)
    assert [x.activation for x in s] == ["F.relu", "torch.relu", "Tensor.relu_", "Tensor.relu", "F.gelu"]
    assert [x.kind for x in s] == ["function", "function", "method", "method", "function"]
    assert s[4].layout == "NC" and s[4].channels == 16


def test_inplace_activation_semantics_with_alpha(build_model, images):
    """y.relu_() whose result is discarded: later users of y must see relu(sparsify(y))."""
    base = build_model("functional")
    model = ms.prepare(base, example_inputs=images)
    calibrate_quick(model, images)
    ms.set_alpha(model, 0.5)
    ops = ms.operators(model)

    def manual(x):
        x = F.relu(ops[0](base.c1(x)))
        x = torch.relu(ops[1](base.c2(x)))
        y = F.relu(ops[2](base.c3(x)))
        x = F.relu(ops[3](x + y))
        return base.fc2(F.gelu(ops[4](base.fc1(x.mean((2, 3))))))

    with torch.no_grad():
        assert torch.equal(model(images), manual(images))


def test_reused_module_gets_one_operator_per_call_site(build_model, images):
    model = ms.prepare(build_model("reused"), example_inputs=images)
    assert [s.name for s in ms.sites(model)] == ["act", "act:1", "act:2"]
    assert [s.module_path for s in ms.sites(model)] == ["act"] * 3
    assert len({id(o) for o in ms.operators(model)}) == 3


def test_exclude_se_include_indices_and_residual_selection(build_model, images):
    se = ms.prepare(build_model("se"), exclude=r"(^|\.)se\.")
    assert [s.name for s in ms.sites(se)] == ["act1", "act2"]
    base = build_model("resnet18")
    assert len(ms.sites(ms.prepare(base, include=r"^layer4\."))) == 4
    picked = ms.prepare(base, include=r"^layer[34]\.", indices=[0, -1])
    assert [s.name for s in ms.sites(picked)] == ["layer3.0.F.relu", "layer4.1.F.relu:1"]
    assert [s.index for s in ms.sites(picked)] == [0, 1]
    res = ms.prepare(base, after_residual_add=True)
    assert len(ms.sites(res)) == 8 and all(s.after_residual_add for s in ms.sites(res))
    main = ms.prepare(base, after_residual_add=False, indices=3)
    assert [s.name for s in ms.sites(main)] == ["layer2.0.F.relu"]
    with pytest.raises(IndexError, match="out of range"):
        ms.prepare(base, indices=[17])
    with torch.no_grad():
        assert torch.equal(picked(images), base(images))


def test_activations_argument_restricts_kinds(build_model):
    model = ms.prepare(build_model("se"), activations=[nn.SiLU])
    assert [s.activation for s in ms.sites(model)] == ["SiLU", "SiLU"]
    model = ms.prepare(build_model("functional"), activations=["F.gelu", F.relu])
    assert [s.activation for s in ms.sites(model)] == ["F.relu", "F.gelu"]


def test_preparing_twice_is_an_error(build_model):
    model = ms.prepare(build_model("preact_wrn"))
    with pytest.raises(ValueError, match="already prepared"):
        ms.prepare(model)
    with pytest.raises(ValueError, match="already prepared"):
        ms.prepare(nn.Sequential(model))


def test_untraceable_model_falls_back_with_warnings(build_model, images):
    base = build_model("untraceable")
    with torch.no_grad():
        ref = base(images)
    with pytest.warns(UserWarning) as record:
        model = ms.prepare(base, example_inputs=images)
    messages = [str(r.message) for r in record]
    assert any("tracing" in m and "falling back" in m and "control flow" in m for m in messages)
    uncovered = [m for m in messages if "not covered" in m]
    assert len(uncovered) == 1 and "F.relu" in uncovered[0]
    s = ms.sites(model)
    assert [(x.name, x.activation, x.layout, x.channels) for x in s] == [
        ("act1", "PReLU", "NCHW", 6),
        ("act2", "ELU", "NC", 12),
    ]
    assert isinstance(model.act1, MeanSparseActivation)
    assert "act1.activation.weight" in model.state_dict()  # PReLU weights stay findable
    assert model.act1.activation.weight is base.act1.weight  # shared, not copied
    with torch.no_grad():
        assert torch.equal(model(images), ref)
    assert ms.remove(model) is base and isinstance(base.act1, nn.PReLU)


def test_explicit_fx_on_untraceable_model_raises(build_model):
    with pytest.raises(RuntimeError, match="torch.fx could not prepare"):
        ms.prepare(build_model("untraceable"), method="fx")


def test_modules_method_inplace_and_remove(build_model, images):
    base = build_model("preact_wrn")
    with torch.no_grad():
        ref = base(images)
    with pytest.warns(UserWarning, match="without example_inputs"):
        model = ms.prepare(base, method="modules", inplace=True)
    assert model is base and len(ms.sites(model)) == 7
    calibrate_quick(model, images)
    ms.set_alpha(model, 1.0)
    with torch.no_grad():
        assert not torch.equal(model(images), ref)
    restored = ms.remove(model)
    assert restored is base and not ms.operators(base)
    assert not any(isinstance(m, MeanSparseActivation) for m in base.modules())
    with torch.no_grad():
        assert torch.equal(base(images), ref)


def test_modules_method_reused_module_warns(build_model, images):
    with pytest.warns(UserWarning, match="called more than once"):
        model = ms.prepare(build_model("reused"), method="modules", example_inputs=images)
    assert len(ms.sites(model)) == 1
    with pytest.raises(ValueError, match="needs example_inputs"):
        ms.prepare(build_model("reused"), method="modules", after_residual_add=True)


def test_modules_method_probe_orders_and_classifies(build_model, images, quiet):
    base = build_model("preact_wrn")
    model = ms.prepare(base, method="modules", example_inputs=images)
    names = [s.name for s in ms.sites(model)]
    assert names[-1] == "relu" and names[0] == "blocks.0.relu1"
    vit = ms.prepare(build_model("vit"), method="modules", example_inputs=images)
    assert [(s.layout, s.channels) for s in ms.sites(vit)] == [("NLC", 32)] * 2
    conv = ms.prepare(build_model("convnext"), method="modules", example_inputs=images)
    assert [(s.layout, s.channels) for s in ms.sites(conv)] == [("NHWC", 32)] * 2
    reused = ms.prepare(build_model("reused"), method="modules", example_inputs=images)
    assert ms.sites(reused)[0].after_residual_add is False  # first call is on the main path


def test_registered_activation_is_a_leaf_site(images):
    class PSiLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.beta = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return x * torch.sigmoid(self.beta * x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), PSiLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    assert len(ms.sites(ms.prepare(net))) == 1  # unregistered: traced through, only the ReLU
    ms.register_activation(PSiLU)
    model = ms.prepare(net, example_inputs=images)
    assert [s.activation for s in ms.sites(model)] == ["PSiLU", "ReLU"]
    assert "1.beta" in model.state_dict()
    with torch.no_grad():
        assert torch.equal(model(images), net(images))
    with pytest.raises(ValueError):
        ms.register_activation(MeanSparse)


def test_sites_of_unprepared_model_is_a_preview(build_model):
    base = build_model("preact_wrn")
    preview = ms.sites(base)
    assert len(preview) == 7 and not ms.operators(base)


def test_set_alpha_by_name_and_index_and_errors(build_model, images):
    model = ms.prepare(build_model("preact_wrn"), example_inputs=images)
    calibrate_quick(model, images)
    ms.set_alpha(model, {"relu": 0.3, 0: 0.1, -2: 0.2})
    assert [o.alpha_value for o in ms.operators(model)] == [0.1, 0, 0, 0, 0, 0.2, 0.3]
    with pytest.raises(KeyError, match="nope"):
        ms.set_alpha(model, {"nope": 0.1})
    with pytest.raises(IndexError):
        ms.set_alpha(model, {7: 0.1})
    with pytest.raises(ValueError, match="blocks.0.relu2"):
        ms.set_alpha(model, {"relu": 0.5, 1: -1.0})
    assert ms.operators(model)[6].alpha_value == 0.3  # nothing applied when one value is bad
    with pytest.raises(ValueError, match="no MeanSparse"):
        ms.set_alpha(build_model("se"), 0.1)


def test_straight_through_context_restores(build_model, images):
    model = ms.prepare(build_model("vit"), example_inputs=images)
    ops = ms.operators(model)
    ops[0].gradient = "straight_through"
    with ms.straight_through(model):
        assert all(o.gradient == "straight_through" for o in ops)
    assert [o.gradient for o in ops] == ["straight_through", "exact"]
    with pytest.raises(KeyError), ms.straight_through(model):
        raise KeyError("boom")
    assert [o.gradient for o in ops] == ["straight_through", "exact"]


def test_straight_through_gradient_through_model(build_model, images):
    base = build_model("convnext")
    model = ms.prepare(base, example_inputs=images)
    calibrate_quick(model, images)
    ms.set_alpha(model, 0.5)
    x = images.clone().requires_grad_()
    with ms.straight_through(model):
        (g,) = torch.autograd.grad(model(x).sum(), x)
    # identity backward at every site == gradient of the model where each operator is skipped,
    # evaluated at the sparsified activations; at least it must differ from the exact gradient
    (g_exact,) = torch.autograd.grad(model(x).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and not torch.equal(g, g_exact)


def test_operators_follow_model_device_and_dtype(build_model, images):
    model = ms.prepare(build_model("se").double(), example_inputs=images.double())
    assert all(o.running_mean.dtype == torch.float32 for o in ms.operators(model))  # stats stay float32
    calibrate_quick(model, images.double())
    ms.set_alpha(model, 0.4)
    assert model(images.double()).dtype == torch.float64


def test_fx_model_keeps_structure_state_dict_and_attributes(build_model, images):
    base = build_model("preact_wrn")
    base.num_classes = 10
    model = ms.prepare(base, example_inputs=images)
    assert model.blocks[1] is base.blocks[1]  # containers are the original objects
    assert model.num_classes == 10
    sd, ref = model.state_dict(), base.state_dict()
    assert all(sd[k] is ref[k] or torch.equal(sd[k], ref[k]) for k in ref)
    extra = set(sd) - set(ref)
    assert extra and all(k.startswith("meansparse.") for k in extra)
    assert "meansparse.0.running_mean" in extra and "meansparse.6.alpha" in extra


def test_fx_prepared_model_keeps_class_and_survives_copy_and_pickle(build_model, images):
    import copy
    import io

    base = build_model("resnet18")
    model = ms.prepare(base, example_inputs=images)
    assert isinstance(model, type(base)) and type(model).__name__ == "ResNet18"
    assert model.layer1 is base.layer1 and base.__class__.__name__ == "ResNet18"
    assert not ms.operators(base) and not hasattr(base, "meansparse")  # original untouched
    calibrate_quick(model, images)
    ms.set_alpha(model, {0: 0.5, 3: 1.0})
    with torch.no_grad():
        want = model(images)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    unpickled = torch.load(buf, weights_only=False)
    for other in (twin, unpickled):
        assert [s.name for s in ms.sites(other)] == [s.name for s in ms.sites(model)]
        with torch.no_grad():
            assert torch.equal(other(images), want)
        assert type(ms.remove(other)).__name__ == "ResNet18" and not ms.operators(ms.remove(other))


def test_fx_inplace_and_remove(build_model, images):
    base = build_model("vit")
    with torch.no_grad():
        ref = base(images)
    model = ms.prepare(base, inplace=True, example_inputs=images)
    assert model is base and len(ms.operators(base)) == 2
    calibrate_quick(model, images)
    ms.set_alpha(model, 2.0)
    with torch.no_grad():
        assert not torch.equal(model(images), ref)
    assert ms.remove(model) is base
    assert type(base) is type(build_model("vit")) and not ms.operators(base)
    with torch.no_grad():
        assert torch.equal(base(images), ref)


def test_modules_method_copies_only_the_path_to_activations(build_model, images, quiet):
    base = build_model("preact_wrn")
    model = ms.prepare(base, method="modules", example_inputs=images)
    assert model.blocks is not base.blocks and model.blocks[0] is not base.blocks[0]  # copied containers
    assert model.blocks[0].conv1 is base.blocks[0].conv1 and model.bn is base.bn  # shared leaves
    assert isinstance(base.blocks[0].relu1, nn.ReLU)  # the original is untouched


@pytest.mark.parametrize("method", ["fx", "modules"])
@pytest.mark.parametrize("training", [False, True])
def test_prepare_keeps_the_models_mode(method, training):
    """New operators/wrappers join in the model's mode: an eval model stays entirely in eval mode."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modules method warns that it cannot see functional calls
        prepared = ms.prepare(net, method=method)
    assert all(m.training == training for m in prepared.modules())


class CachedBias(nn.Module):
    """Caches a tensor computed in forward, as timm's LeViT / EfficientFormer cache their attention bias."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return x + self.cache[key]


class CachingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bias, self.act = nn.Conv2d(3, 4, 3, padding=1), CachedBias(), nn.ReLU()

    def forward(self, x):
        return self.act(self.bias(self.conv(x)))


@pytest.mark.parametrize("method,probe", [("fx", False), ("fx", True), ("modules", True)])
def test_prepare_sites_and_remove_leave_the_users_model_as_it_was(method, probe, images, quiet):
    """Tracing runs forward on proxies: a cache filled in forward must not keep one (nor the probe's tensor)."""
    import pickle

    torch.manual_seed(0)
    base = CachingNet().eval()
    before = {m: dict(m.__dict__) for m in base.modules()}
    assert len(ms.sites(base)) == 1
    model = ms.prepare(base, method=method, example_inputs=images if probe else None)
    assert ms.remove(model) is base
    assert base.bias.cache == {} and all(m.__dict__ == d for m, d in before.items())
    pickle.dumps(base)
    with torch.no_grad():
        out = base(images)
    assert isinstance(out, torch.Tensor) and torch.equal(out, model(images))


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass (fx traces into it) that reads ``self.training`` itself."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a random per-sample mask in train mode only."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ModeNet(nn.Module):
    """Every kind of ``self.training`` check that tracing bakes in: a BN-act module, drop-path, a dropout call
    in the model's own forward."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1, self.bnact = nn.Conv2d(3, c, 3, padding=1), BNAct(c)
        self.conv2, self.bn2, self.drop = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), DropPath(0.5)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bnact(self.conv1(x))
        x = F.relu(self.drop(self.bn2(self.conv2(x))) + x)
        return self.fc(F.dropout(x.mean((2, 3)), 0.3, training=self.training))


def _run_train_step(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    (g,) = torch.autograd.grad(out.square().sum(), model.conv1.weight)
    return out.detach(), g


@pytest.mark.parametrize("fused", [False, True])
def test_train_mode_equals_the_base_model_at_alpha_zero(fused, images):
    """Train-mode branches inside traced modules must run: BN statistics updates, drop-path, dropout."""
    import copy

    torch.manual_seed(0)
    base = ModeNet()
    model = ms.prepare(copy.deepcopy(base), method="fx", example_inputs=images)
    if fused:
        ms.fuse(model)
    base.train()
    model.train()
    for seed in (0, 1):
        for a, b in zip(_run_train_step(base, images, seed), _run_train_step(model, images, seed), strict=True):
            assert torch.equal(a, b)
    for (name, a), b in zip(base.state_dict().items(), (model.state_dict()[k] for k in base.state_dict()),
                            strict=True):
        assert torch.equal(a, b), name  # running statistics and num_batches_tracked updated alike
    base.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(base(images), model(images))


def test_a_model_in_mixed_modes_is_refused_not_run_wrong(images):
    model = ms.prepare(ModeNet(), method="fx", example_inputs=images)
    model.train()
    model.bnact.eval()  # its eval branch is not in the train-mode graph
    with pytest.raises(RuntimeError, match=r"bnact.*one mode"):
        model(images)


def test_numpy_constants_in_the_traced_code(images):
    """timm's drop-path rates are NumPy floats: the traced code must not name ``np``."""
    import numpy as np

    class NumpyRate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.p = nn.Conv2d(3, 4, 3), np.float64(0.25)

        def forward(self, x):
            return F.dropout(F.relu(self.conv(x)), self.p, training=self.training) * self.p

    torch.manual_seed(0)
    base = NumpyRate().eval()
    model = ms.prepare(base, method="fx", example_inputs=images)
    for training in (False, True):
        base.train(training)
        model.train(training)
        torch.manual_seed(1)
        want = base(images)
        torch.manual_seed(1)
        assert torch.equal(model(images), want)


class LayerDrop(nn.Module):
    """Skips its layer at random in train mode with Python's generator: tracing bakes one draw in."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if self.training and random.random() < 0.5:
            return F.relu(x)
        return F.relu(self.conv(x))


def test_a_train_graph_that_differs_from_the_model_is_not_used(images, monkeypatch):
    """A train-mode branch fx cannot see (a Python random draw) makes train mode an error, never a number."""
    draws = iter([0.1, 0.9, 0.9, 0.9])  # tracing skips the layer; the probes' model and graph run it
    monkeypatch.setattr(random, "random", lambda: next(draws, 0.9))
    base = nn.Sequential(nn.Conv2d(3, 4, 3), LayerDrop()).eval()
    model = ms.prepare(base, method="fx", example_inputs=images)
    with torch.no_grad():
        assert torch.equal(model(images), base(images))  # eval mode is fine
    model.train()
    with pytest.raises(RuntimeError, match="eval mode only.*does not reproduce"):
        model(images)


# ---------------------------------------------------------------------------------------------- the site record
def test_an_operator_takes_its_candidates_record_and_holds_no_copies_of_its_fields():
    assert list(inspect.signature(MeanSparse).parameters) == ["channels", "layout", "centering", "gradient", "site"]
    c = Candidate(SiteInfo(name="blocks.0.act", activation="GELU", module_path="blocks.0.act", inplace=True))
    op = make_operator(c, 3, "channel")
    assert op.site is c.site and op.site.index == 3 and op.site.inplace and op.name == "blocks.0.act"
    with pytest.raises(ValueError, match="site kind"):
        SiteInfo(kind="gelu")


class ResidualAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act1, self.act2 = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GELU()

    def forward(self, x):
        y = self.act1(self.conv(x))
        return self.act2(y + self.conv.weight.sum())  # a tensor + tensor add before the second activation


@pytest.mark.parametrize("strategy", ["fx", "modules"])
def test_candidates_operators_and_sites_share_one_record(strategy, images, quiet):
    """The record a candidate holds is the operator's (the same object, numbered and, for the modules strategy,
    completed by the probe) and ``ms.sites`` reads it back."""
    chosen: list[Candidate] = []

    def select(cands):
        chosen.extend(cands)
        return cands

    model = ResidualAct().eval()
    if strategy == "fx":
        prepared = prepare_fx(model, None, select, "channel").prepared
    else:
        prepared, _ = prepare_modules(model, None, select, "channel", images, inplace=False, needs_probe=True)
    ops = ms.operators(prepared)
    assert len(ops) == len(chosen) > 0
    by_index = {o.site.index: o for o in ops}
    assert all(by_index[k].site is c.site for k, c in enumerate(chosen))
    assert all(s.info is o.site for s, o in zip(ms.sites(prepared), ops, strict=True))
    assert [o.site.after_residual_add for o in ops] == [False, True]  # the modules strategy's probe found it


def test_prepare_options_hold_exactly_prepares_arguments():
    """``prepare`` passes its arguments on as one ``PrepareOptions`` value: the two lists must not drift apart."""
    params = list(inspect.signature(prepare).parameters)[1:]
    assert [f.name for f in dataclasses.fields(PrepareOptions)] == params
    assert all(f.default == inspect.signature(prepare).parameters[f.name].default
               for f in dataclasses.fields(PrepareOptions))


def test_prepare_warnings_point_at_the_callers_line():
    """The fallback and coverage warnings name the user's line, not a line inside the package (a fixed
    stacklevel drifted into the package when prepare was split into phases)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x + 1
            return self.act(self.conv(x))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ms.prepare(Branchy())
    assert len(caught) >= 2 and {Path(w.filename).name for w in caught} == {Path(__file__).name}, \
        [(w.filename, str(w.message)[:50]) for w in caught]
