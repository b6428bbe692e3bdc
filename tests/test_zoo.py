"""Model zoo: reference placements on robustbench / timm architectures (tiny, random weights, offline),
zoo.load wiring, the torchvision shim, and the generic output / residual-add sites they rely on."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch
from torch import nn

import meansparse as ms
from meansparse import zoo
from meansparse.placement import MeanSparseOutput, get_record
from meansparse.zoo import torchvision_shim


# ------------------------------------------------------------------------------------------ fixtures
def _imported(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the shim's warning, pkg_resources deprecation
            return fn()
    except ImportError as e:  # the [zoo] extra is not installed: report it as a skip with the reason
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def timm():
    return _imported(zoo.import_timm)


@pytest.fixture(scope="module")
def robustbench():
    return _imported(zoo.import_robustbench)


def tiny_dm_wrn():
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    return DMWideResNet(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU)  # 3 blocks, 16/32/64 ch


def tiny_rawrn():
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import NormalizedWideResNet

    # Peng2023Robust's configuration (SiLU, SE ratio 0.25 with ReLU, se_order 2) at tiny widths / depths
    return NormalizedWideResNet(
        (0.4914, 0.4822, 0.4465),
        (0.2471, 0.2435, 0.2616),
        stem_width=8,
        depth=[1, 1, 1],
        stage_width=[8, 16, 32],
        groups=[1, 1, 1],
        activation_fn=nn.SiLU,
        se_ratio=0.25,
        se_activation=nn.ReLU,
        se_order=2,
        num_classes=10,
    )


def tiny_swin(timm):
    # swin_large_patch4_window7_224's block structure with 2 stages of 1 block, 16 / 32 channels, 28 px
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        img_size=28,
        window_size=7,
        num_classes=10,
    )


def tiny_convnext(timm, **kw):
    # convnext_large's block structure (conv_mlp=False: the MLP runs on NHWC) with 8..64 channels
    dims, depths = (8, 16, 32, 64), (1, 1, 1, 1)
    return timm.create_model(
        "convnext_atto", pretrained=False, conv_mlp=False, dims=dims, depths=depths, num_classes=10, **kw
    )


def build(family, seed=0):
    torch.manual_seed(seed)
    if family == "dm_wrn":
        model = tiny_dm_wrn()
    elif family == "rawrn":
        model = tiny_rawrn()
    elif family == "swin":
        model = tiny_swin(zoo.import_timm())
    else:
        model = tiny_convnext(zoo.import_timm())
    for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained model
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def inputs(family, n=3):
    torch.manual_seed(1)
    size = 28 if family == "swin" else 32
    return torch.rand(n, 3, size, size)


# family -> expected (kind, layout, channels) per site, in execution order
def _dm_like(stem, widths):
    out, cin = [], stem
    for w in widths:
        out += [("module", "NCHW", cin), ("module", "NCHW", w), ("add", "NCHW", w)]
        cin = w
    return out + [("module", "NCHW", widths[-1])]


EXPECTED = {
    "dm_wrn": _dm_like(16, [16, 32, 64]),
    "rawrn": _dm_like(8, [8, 16, 32]),
    "swin": [
        site
        for c in (16, 32)
        for site in (("add", "NHWC", c), ("module", "NLC", 4 * c), ("output", "NLC", c), ("add", "NLC", c))
    ],
    "convnext": [site for c in (8, 16, 32, 64) for site in (("function", "NHWC", 4 * c), ("output", "NCHW", c))],
}
METHOD = {"dm_wrn": "fx", "rawrn": "modules", "swin": "fx", "convnext": "fx"}
FAMILIES = list(EXPECTED)


# ------------------------------------------------------------------------------------------ placements
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_placement(family, robustbench):
    base, x = build(family), inputs(family)
    with torch.no_grad():
        ref = base(x)
    assert zoo.detect_preset(base) == family
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fx fallback, no uncovered activation or add
        model = ms.prepare(base, preset="auto", example_inputs=x)
    rec = get_record(model)
    assert rec.config["preset"] == family and rec.config["method"] == METHOD[family]
    got = [(s.kind, s.layout, s.channels) for s in ms.sites(model)]
    assert got == EXPECTED[family]
    names = [s.name for s in ms.sites(model)]
    assert not any(".se." in n for n in names)  # RaWRN: nothing inside Squeeze-and-Excitation
    assert not any(".attn." in n or n.endswith(".attn") for n in names)  # Swin: nothing inside attention
    assert all(s.after_residual_add == (s.kind == "add") for s in ms.sites(model))
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # alpha = 0: bit-identical
    # every kind of site is wired in: sparsifying only those sites changes the output
    ms.calibrate(model, [x[:2], x[2:]], progress=False)
    for kind in {k for k, _, _ in EXPECTED[family]}:
        ms.set_alpha(model, 0.0)
        ms.set_alpha(model, {s.name: 2.0 for s in ms.sites(model) if s.kind == kind})
        with torch.no_grad():
            assert not torch.equal(model(x), ref), kind
    assert ms.remove(model) is base


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_onto_fresh_architecture(family, robustbench, tmp_path):
    x = inputs(family)
    model = ms.prepare(build(family), preset=family, example_inputs=x)
    ms.calibrate(model, [x], progress=False)
    ms.set_alpha(model, 0.5)
    with torch.no_grad():
        expected = model(x)
    ms.save(model, tmp_path / "state.safetensors")
    fresh = build(family)  # the same weights from wherever the user gets them (here: the same seed)
    loaded = ms.load(fresh, tmp_path / "state.safetensors")
    assert [s.name for s in ms.sites(loaded)] == [s.name for s in ms.sites(model)]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_generic_placement_differs(robustbench):
    """Without the preset: no after-add sites, and RaWRN keeps the SE ReLUs (fx fails: modules fallback)."""
    x = inputs("rawrn")
    with pytest.warns(UserWarning, match="falling back"):
        generic = ms.prepare(build("rawrn"), example_inputs=x)
    names = [s.name for s in ms.sites(generic)]
    assert len(names) == 10 and sum(".se." in n for n in names) == 3  # the preset has 3 adds instead
    assert not any(s.kind == "add" for s in ms.sites(generic))
    assert zoo.detect_preset(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == "generic"


def test_rawrn_preset_needs_example_inputs(robustbench):
    with pytest.raises(ValueError, match="example_inputs"):
        ms.prepare(build("rawrn"), preset="rawrn")


def test_convnext_drop_path_module_is_a_site(timm):
    """With drop_path_rate > 0 the branch ends in timm's DropPath (a no-op in eval): still one site each
    (the rate grows linearly from 0, so the first block keeps an Identity)."""
    torch.manual_seed(0)
    model = ms.prepare(tiny_convnext(timm, drop_path_rate=0.1).eval(), preset="convnext", example_inputs=inputs("c"))
    outs = [s for s in ms.sites(model) if s.kind == "output"]
    assert [s.activation for s in outs] == ["Identity"] + ["DropPath"] * 3
    assert [s.channels for s in outs] == [8, 16, 32, 64]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ms.prepare(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), preset="resnet")


# ------------------------------------------------------------------------------------------ generic sites
@pytest.mark.parametrize("method", ["fx", "modules"])
def test_outputs_and_residual_adds_on_plain_models(method, build_model, images):
    """The mechanism under the presets, on the suite's miniature pre-activation WRN (no zoo packages)."""
    base = build_model("preact_wrn")
    with torch.no_grad():
        ref = base(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ms.prepare(base, method=method, example_inputs=images, residual_adds=True, outputs=r"^fc$")
    s = ms.sites(model)
    assert [x.name for x in s if x.kind == "add"] == ["blocks.0.add", "blocks.1.add", "blocks.2.add"]
    assert [(x.kind, x.layout, x.channels) for x in s][-1] == ("output", "NC", 10)
    assert len(s) == 7 + 3 + 1 and [x.index for x in s] == list(range(11))
    with torch.no_grad():
        assert torch.equal(model(images), ref)
    if method == "modules":
        assert sum(isinstance(m, MeanSparseOutput) for m in model.modules()) == 4
        assert not any(isinstance(m, MeanSparseOutput) for m in base.modules())
    original = ms.remove(model)
    assert not ms.operators(original)
    with torch.no_grad():
        assert torch.equal(original(images), ref)


def test_same_sites_with_both_methods(build_model, images):
    kw = dict(example_inputs=images, residual_adds=True, outputs=r"\.conv2$")
    fx_sites = ms.sites(ms.prepare(build_model("preact_wrn"), method="fx", **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod_sites = ms.sites(ms.prepare(build_model("preact_wrn"), method="modules", **kw))
    assert [(s.name, s.kind, s.layout, s.channels) for s in fx_sites] == [
        (s.name, s.kind, s.layout, s.channels) for s in mod_sites
    ]


def test_only_add_sites_and_inplace_add(build_model, images):
    base = build_model("resnet18")  # `out += shortcut` then F.relu: in-place adds
    with torch.no_grad():
        ref = base(images)
    model = ms.prepare(base, activations=(), residual_adds=True, example_inputs=images)
    s = ms.sites(model)
    assert len(s) == 8 and all(x.kind == "add" and x.after_residual_add for x in s)
    with torch.no_grad():
        assert torch.equal(model(images), ref)
    ms.calibrate(model, [images], progress=False)
    ms.set_alpha(model, 1.0)
    with torch.no_grad():
        assert not torch.equal(model(images), ref)


def test_residual_adds_with_modules_needs_probe(build_model):
    with pytest.raises(ValueError, match="example_inputs"):
        ms.prepare(build_model("preact_wrn"), method="modules", residual_adds=True)


def test_modules_warns_about_adds_it_cannot_reach(build_model, images):
    # TinyViT's block adds twice inside one forward: only the returned add gets an operator
    with pytest.warns(UserWarning, match="not covered: adds inside"):
        model = ms.prepare(build_model("vit"), method="modules", residual_adds=True, example_inputs=images)
    assert [s.name for s in ms.sites(model) if s.kind == "add"] == ["blocks.0.add", "blocks.1.add"]


# ------------------------------------------------------------------------------------------ zoo.load
def test_load_timm_wraps_normalization(timm):
    model = zoo.load("convnext_atto", pretrained=False, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10)
    assert isinstance(model, ms.models.Normalized) and not model.training
    cfg = model.net.pretrained_cfg
    assert torch.allclose(model.mean.flatten(), torch.tensor(cfg["mean"]))
    assert torch.allclose(model.std.flatten(), torch.tensor(cfg["std"]))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert zoo.detect_preset(model) == "convnext"


def test_load_robustbench(robustbench, monkeypatch, tmp_path):
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = {"model": tiny_dm_wrn, "gdrive_id": "not-used"}
    monkeypatch.setitem(model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")], "Tiny2024_WRN-10-1", entry)
    model = zoo.load("Tiny2024_WRN-10-1", "cifar10", "Linf", pretrained=False)  # architecture only
    assert not model.training and zoo.detect_preset(model) == "dm_wrn"

    calls = {}

    def fake_load_model(**kw):  # robustbench's downloader is not reachable here: check what it is given
        calls.update(kw)
        return tiny_dm_wrn().train()

    monkeypatch.setattr("robustbench.utils.load_model", fake_load_model)
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path))
    model = zoo.load("Tiny2024_WRN-10-1")
    assert not model.training
    assert calls == {
        "model_name": "Tiny2024_WRN-10-1",
        "model_dir": str(tmp_path / "robustbench"),
        "dataset": "cifar10",
        "threat_model": "Linf",
    }
    with pytest.raises(KeyError, match="not a robustbench cifar100 Linf model"):
        zoo.load("Nobody2099", "cifar100", "Linf", source="robustbench", pretrained=False)
    with pytest.raises(KeyError, match="no cifar100 L2 models; known: cifar10 L2"):
        zoo.load("Nobody2099", "cifar100", "L2", pretrained=False)


class _NotATensor:  # a pickled object a checkpoint should not be able to smuggle in
    pass


def test_robustbench_reads_a_cached_checkpoint_with_weights_only(robustbench, monkeypatch, tmp_path):
    """robustbench's own load_model on a checkpoint already in its cache (no download): plain tensors load
    (torch >= 2.6 loads with weights_only=True by default), a pickled object is refused."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = {"model": tiny_dm_wrn, "gdrive_id": "not-used"}
    monkeypatch.setitem(model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")], "Tiny2024_WRN-10-1", entry)
    torch.manual_seed(1)
    trained = tiny_dm_wrn()
    path = tmp_path / "cifar10" / "Linf" / "Tiny2024_WRN-10-1.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    model = zoo.load("Tiny2024_WRN-10-1", model_dir=tmp_path)
    assert not model.training
    for (k, a), b in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    torch.save({"state_dict": trained.state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        zoo.load("Tiny2024_WRN-10-1", model_dir=tmp_path)


def test_paper_ids_are_known(robustbench):
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    ids = {
        ("cifar10", "Linf"): ["Bartoldson2024Adversarial_WRN-94-16", "Peng2023Robust", "Wang2023Better_WRN-70-16"],
        ("cifar10", "L2"): ["Wang2023Better_WRN-70-16"],
        ("cifar100", "Linf"): ["Wang2023Better_WRN-70-16"],
        ("imagenet", "Linf"): ["Liu2023Comprehensive_Swin-L", "Liu2023Comprehensive_ConvNeXt-L"],
    }
    for (dataset, threat), names in ids.items():
        models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
        assert all(n in models for n in names)


def test_load_checkpoint(tmp_path):
    net = ms.models.create_model("small_cnn", num_classes=10, normalization="digits", width=4)
    ms.models.save_checkpoint(
        net,
        tmp_path / "cnn",
        {"model": "small_cnn", "model_kwargs": {"num_classes": 10, "normalization": "digits", "width": 4}},
    )
    model = zoo.load(tmp_path / "cnn")  # auto: an existing checkpoint path
    assert not model.training
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()(x))


def test_load_arguments():
    with pytest.raises(ValueError, match="source"):
        zoo.load("x", source="hub")
    with pytest.raises(TypeError, match="only apply to source='timm'"):
        zoo.load("x", source="checkpoint", num_classes=3)


def test_missing_extra_names_it(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("timm", "robustbench") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"\[zoo\]"):
        zoo.import_timm()
    with pytest.raises(ImportError, match=r"\[zoo\]"):
        zoo.import_robustbench()


# ------------------------------------------------------------------------------------------ shim
def test_shim_imports_torchvision_and_fakes_nothing(timm):
    tv = torchvision_shim.import_torchvision()
    assert tv is sys.modules["torchvision"]
    if torchvision_shim.shimmed():  # this machine's torchvision cannot load its C++ operators
        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


class _Failing:
    """A meta-path finder making `import torchvision` raise a chosen error."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise self.error
        return None


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA driver version is insufficient"),
        RuntimeError("operator torchvision::frobnicate does not exist"),  # not an operator the shim knows
    ],
)
def test_shim_reraises_other_failures(error, monkeypatch):
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards by monkeypatch
    monkeypatch.setattr(sys, "meta_path", [_Failing(error), *sys.meta_path])
    with pytest.raises(RuntimeError) as info:
        torchvision_shim.import_torchvision()
    assert info.value is error
