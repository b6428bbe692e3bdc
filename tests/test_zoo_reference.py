"""``zoo.import_reference``: the authors' RobustBench MeanSparse models (``Amini2024MeanSparse_*``) as prepared
base architectures.  Offline, random weights, every family built by robustbench's own constructors at small
sizes (ConvNeXt: robustbench's wrapper hard-codes ConvNeXt-L's widths, so only the depth is small), plus one
full-size Swin-L through ``zoo.load``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import meansparse as ms
from meansparse import zoo
from meansparse.core import operators
from meansparse.placement import get_record

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", autouse=True)
def robustbench():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torchvision shim's warning, pkg_resources deprecation
            return zoo.import_robustbench()
    except ImportError as e:  # the [zoo] extra is not installed
        pytest.skip(str(e), allow_module_level=True)


def _arch(name):
    import importlib

    return importlib.import_module(f"robustbench.model_zoo.architectures.{name}")


# family -> (robustbench constructor at a small size, input size, number of sites)
def _wrn_70_16():  # the class of Amini2024MeanSparse_S-WRN-70-16, 2 blocks per stage, 16/16/32/64 channels
    return _arch("Meansparse_wrn_70_16").DMWideResNet(num_classes=10, depth=16, width=1, activation_fn=nn.SiLU)


def _wrn_94_16():  # the class of Amini2024MeanSparse_S-WRN-94-16
    return _arch("Meansparse_wrn_94_16").MeanSparse_DMWideResNet(
        num_classes=10, depth=16, width=1, activation_fn=nn.SiLU
    )


def _ra_wrn_70_16():  # Amini2024MeanSparse_Ra_WRN_70_16's configuration (SE, SiLU) at tiny widths / depths
    return _arch("Meansparse_ra_wrn_70_16").NormalizedWideResNet(
        mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), stem_width=8, depth=[2, 1, 1],
        stage_width=[8, 16, 32], groups=[1, 1, 1], activation_fn=nn.SiLU, se_ratio=0.25, se_activation=nn.ReLU,
        se_order=2, num_classes=10,
    )


def _swin_l():  # robustbench's Swin-L constructor (normalizer + Swin) with 2 stages of 2 blocks (one shifted)
    return _arch("Meansparse_swin_L").swin_large_patch4_window7_224_with_MeanSparse(
        pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
        embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=56, num_classes=10,
    )


def _convnext_l():  # robustbench's ConvNeXt-L recipe; its wrapper hard-codes ConvNeXt-L's widths: 1 block per stage
    timm = zoo.import_timm()
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model

    net = timm.create_model("convnext_large", pretrained=False, depths=(1, 1, 1, 1), num_classes=10)
    net = normalize_model(net, IMAGENET_MEAN, IMAGENET_STD)
    return _arch("sparsified_model").get_sparse_model(net, "imagenet-Linf")


FAMILIES = {
    "wrn_70_16": (_wrn_70_16, "dm_wrn", 32, 3 * 2 * 3 + 1),
    "wrn_94_16": (_wrn_94_16, "dm_wrn", 32, 3 * 2 * 3 + 1),
    "ra_wrn_70_16": (_ra_wrn_70_16, "rawrn", 32, 4 * 3 + 1),
    "swin_l": (_swin_l, "swin", 56, 4 * 4),
    "convnext_l": (_convnext_l, "convnext", 32, 4 * 2),
}


def _calibrate_reference(ref: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Non-trivial state with the reference's own code: BatchNorm statistics at random, the operators'
    statistics measured by their own calibration on ``x`` (so every band holds values), thresholds at random
    per site, site 0 at threshold 0 and site 1 at a negative threshold (both: identity)."""
    g = torch.Generator().manual_seed(seed)
    sites = zoo.reference_sites(ref)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
        for _, op in sites:
            op.flag_update_statistics.fill_(1)
            op.batch_num.fill_(1.0)
        ref(x)
        for i, (_, op) in enumerate(sites):
            op.flag_update_statistics.fill_(0)
            op.threshold.fill_(0.0 if i == 0 else -0.5 if i == 1 else 0.1 + 0.9 * float(torch.rand((), generator=g)))
    assert all(op.running_var.abs().sum() > 0 for _, op in sites)


def _build(family: str):
    build, preset, size, n_sites = FAMILIES[family]
    torch.manual_seed(0)
    ref = build().eval()
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    _calibrate_reference(ref, torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2)))
    return ref, x, preset, n_sites


# ------------------------------------------------------------------------------------------ every family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_reference_gives_the_same_logits(family, tmp_path):
    ref, x, preset, n_sites = _build(family)
    with torch.no_grad():
        expected = ref(x)
    assert zoo.reference_family(ref) == preset
    model = zoo.import_reference(ref)

    # the base architecture, not the reference's classes, prepared with the family's preset
    assert not any("Meansparse_" in type(m).__module__ or type(m).__name__ == "MeanSparse_imagenet"
                   for m in model.modules())
    assert get_record(model).config["preset"] == preset and not model.training
    ops, sites = operators(model), zoo.reference_sites(ref)
    assert len(ops) == len(sites) == n_sites
    for op, (name, r) in zip(ops, sites, strict=True):
        assert torch.equal(op.running_mean, r.running_mean) and torch.equal(op.running_var, r.running_var), name
        assert op.alpha_value == max(float(r.threshold), 0.0) and op.calibrated, name
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, expected)  # bit-identical on CPU
    state = [(op.site.name, op.alpha_value, op.running_mean.clone(), op.running_var.clone()) for op in ops]
    ms.set_alpha(model, 0.0)
    with torch.no_grad():
        assert not torch.equal(model(x), expected)  # the imported thresholds do sparsify
    ms.set_alpha(model, {i: alpha for i, (_, alpha, _, _) in enumerate(state)})

    # save / load onto a freshly built base architecture reproduces the imported state
    ms.save(model, tmp_path / "reference.safetensors")
    fresh = copy.deepcopy(ms.remove(model))
    loaded = ms.load(fresh, tmp_path / "reference.safetensors", example_inputs=x[:1])
    for op, (name, alpha, mean, var) in zip(operators(loaded), state, strict=True):
        assert op.site.name == name and op.alpha_value == alpha
        assert torch.equal(op.running_mean, mean) and torch.equal(op.running_var, var)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_import_reference_keeps_the_reference_unchanged():
    ref, x, _, _ = _build("wrn_70_16")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    zoo.import_reference(ref)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


# ------------------------------------------------------------------------------------------ refusals
def test_import_reference_refuses_a_model_without_reference_operators():
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    base = DMWideResNet(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU)
    assert zoo.reference_family(base) is None
    with pytest.raises(ValueError, match="contains none of the MeanSparse reference operators"):
        zoo.import_reference(base)


def test_a_site_mismatch_names_the_first_differing_site():
    ref, _, _, n = _build("wrn_70_16")
    ref.meansparse_end = nn.Identity()  # the reference now has one site fewer than the preset places
    with pytest.raises(ValueError, match=rf"reference has {n - 1} sites and the prepared base model {n}; they first "
                                         rf"differ at site {n - 1}: reference '<none>'"):
        zoo.import_reference(ref)


def test_thresholds_it_cannot_represent_and_collecting_statistics_are_refused():
    ref, _, _, _ = _build("wrn_94_16")
    name, op = zoo.reference_sites(ref)[3]
    op.threshold.fill_(float("inf"))
    with pytest.raises(ValueError, match=f"'{name}' has threshold inf"):
        zoo.import_reference(ref)
    op.threshold.fill_(0.5)
    op.flag_update_statistics.fill_(1)
    with pytest.raises(ValueError, match=f"'{name}' is still collecting statistics"):
        zoo.import_reference(ref)


# ------------------------------------------------------------------------------------------ zoo.load
def test_load_imports_an_uncalibrated_reference_as_uncalibrated(monkeypatch):
    """robustbench builds the reference with zero statistics and threshold 0 before loading weights: those
    sites stay uncalibrated, so sparsifying without calibrating fails loudly instead of doing nothing."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("L2")]
    entry = dict(models["Amini2024MeanSparse_S-WRN-70-16"], model=_wrn_70_16)  # its class, at a small size
    monkeypatch.setitem(models, "Amini2024MeanSparse_S-WRN-70-16", entry)
    model = zoo.load("Amini2024MeanSparse_S-WRN-70-16", "cifar10", "L2", pretrained=False)
    assert not model.training and get_record(model).config["preset"] == "dm_wrn"
    ops = operators(model)
    assert len(ops) == 19 and not any(op.calibrated or op.alpha_value for op in ops)
    ms.set_alpha(model, 0.5)
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(torch.rand(1, 3, 32, 32))


def test_load_full_size_swin_l(monkeypatch):
    """The real ``Amini2024MeanSparse_Swin-L`` constructor at full size (197 M parameters, about 10 s and
    2 GB here): ``zoo.load`` returns the prepared timm Swin-L with the reference's state and logits."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset("imagenet")][ThreatModel("Linf")]
    torch.manual_seed(0)
    ref = models["Amini2024MeanSparse_Swin-L"]["model"]().eval()  # robustbench's own constructor
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, op in zoo.reference_sites(ref):
            op.running_mean.normal_(0.0, 0.5, generator=g)
            op.running_var.uniform_(0.1, 2.0, generator=g)
            op.threshold.fill_(0.1 + 0.9 * float(torch.rand((), generator=g)))
    monkeypatch.setitem(models, "Amini2024MeanSparse_Swin-L", dict(models["Amini2024MeanSparse_Swin-L"],
                                                                    model=lambda: ref))
    model = zoo.load("Amini2024MeanSparse_Swin-L", "imagenet", "Linf", pretrained=False)
    assert type(model.model).__module__ == "timm.models.swin_transformer" and not model.training
    assert len(operators(model)) == 96  # docs/zoo.md: 24 GELU + 24 fc2 + 48 adds
    x = torch.rand(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
