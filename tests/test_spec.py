"""Model specs (:mod:`meansparse.zoo.spec`): every command loads a checkpoint, a RobustBench or timm model,
or the user's own module with its weights; a bad spec is one clear error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from meansparse.cli import main
from meansparse.zoo import ModelSpec, load_model_spec, parse_model_spec, read_weights

MODULE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
'''


@pytest.fixture
def user_model(tmp_path):
    """A user's architecture file and its trained weights (here: other random weights) in three formats."""
    (tmp_path / "mynet.py").write_text(MODULE)
    torch.manual_seed(1)
    trained = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    save_file(trained.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model_state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    torch.save(trained, tmp_path / "pickled.pt")  # a whole pickled module: must never be unpickled
    return tmp_path, trained


def test_parse_model_spec():
    assert parse_model_spec("robustbench:Carmon2019Unlabeled") == ModelSpec("robustbench", "Carmon2019Unlabeled")
    assert parse_model_spec("timm:convnext_tiny") == ModelSpec("timm", "convnext_tiny")
    assert parse_model_spec("python:models/net.py:build") == ModelSpec("python", "models/net.py", "build")
    assert parse_model_spec("python:pkg.mod:make_model") == ModelSpec("python", "pkg.mod", "make_model")
    assert parse_model_spec("checkpoints/cifar10-resnet18-gelu-pgd").kind == "checkpoint"
    for bad, words in [("", "empty"), ("timm:", "names no model"), ("python:net.py", "python:<file"),
                       ("python:net.py:not-a-name", "python:<file"), ("hub:resnet", "unknown prefix 'hub'")]:
        with pytest.raises(ValueError, match=words):
            parse_model_spec(bad)


@pytest.mark.parametrize("weights", ["w.safetensors", "w.pt"])
def test_python_spec_builds_the_users_module_with_its_weights(user_model, weights):
    folder, trained = user_model
    model = load_model_spec(f"python:{folder / 'mynet.py'}:build", weights=folder / weights)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))
    assert not model.training


def test_python_spec_errors(user_model):
    folder, _ = user_model
    spec = f"python:{folder / 'mynet.py'}:build"
    with pytest.raises(ValueError, match="needs --weights"):
        load_model_spec(spec)
    assert isinstance(load_model_spec(spec, pretrained=False), nn.Sequential)  # random weights, offline
    with pytest.raises(ValueError, match="weights_only"):
        load_model_spec(spec, weights=folder / "pickled.pt")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_model_spec(f"python:{folder / 'mynet.py'}:nope", pretrained=False)
    with pytest.raises(ValueError, match="does not exist"):
        load_model_spec(f"python:{folder / 'missing.py'}:build", pretrained=False)
    torch.manual_seed(0)
    save_file(nn.Linear(3, 3).state_dict(), folder / "other.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        load_model_spec(spec, weights=folder / "other.safetensors")
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        read_weights(folder / "junk.safetensors")
    with pytest.raises(ValueError, match="--weights applies to python"):
        load_model_spec("timm:test_byobnet", weights=folder / "w.pt", pretrained=False)


def test_zoo_specs_build_random_weights_offline():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision shim and robustbench's pkg_resources warn
        timm_model = load_model_spec("timm:test_byobnet", pretrained=False)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert timm_model(x).shape == (2, 1000)
        again = load_model_spec("timm:test_byobnet", pretrained=False)
        assert all(torch.equal(a, b) for a, b in zip(timm_model.state_dict().values(), again.state_dict().values()))
        rb = load_model_spec("robustbench:Standard", dataset="cifar10", threat_model="Linf", pretrained=False)
        assert not rb.training and sum(p.numel() for p in rb.parameters()) > 10**6
        with pytest.raises(ValueError, match="is not a robustbench cifar10 Linf model"):
            load_model_spec("robustbench:NoSuchModel2030", pretrained=False)
        with pytest.raises(ValueError, match="timm has no model"):
            load_model_spec("timm:no_such_net", pretrained=False)


def test_every_command_takes_a_python_spec(user_model, capsys):
    folder, trained = user_model
    spec = ["--model", f"python:{folder / 'mynet.py'}:build", "--weights", str(folder / "w.safetensors")]
    assert main(["evaluate", *spec, "--data", "digits", "--n-examples", "8", "--attacks", "apgd-ce",
                 "--option", "apgd-ce.steps=2", "--no-progress", "--out", str(folder / "eval")]) == 0
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["n_examples"] == 8 and report["metadata"]["command"]["checkpoint"] == spec[1]
    assert main(["calibrate", *spec, "--preset", "none", "--data", "digits", "--n-examples", "32",
                 "--no-progress", "--out", str(folder / "state.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sites"] == 1
    assert main(["sweep", *spec, "--data", "digits", "--alphas", "0,0.5", "--n-holdout", "20", "--n-sweep-robust",
                 "8", "--calibration-batches", "1", "--sweep-attacks", "apgd-ce", "--option", "apgd-ce.steps=2",
                 "--quiet", "--out", str(folder / "sweep")]) == 0
    assert (folder / "sweep" / "meansparse.safetensors").exists()


def test_a_bad_spec_is_one_error_line(capsys, tmp_path):
    assert main(["evaluate", "--model", "hub:resnet", "--data", "digits", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused before the output folder is made
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["meansparse evaluate: error: model spec 'hub:resnet': unknown prefix 'hub'; use robustbench:, "
                   "timm:, python: or a checkpoint path"]


def test_a_robustbench_model_streams_through_its_own_preprocessing():
    """``--preprocessing auto`` on a streamed path: what RobustBench feeds the model (Swin-L: bicubic resize to
    256, centre crop 224); CIFAR models get ToTensor only; an explicit name wins."""
    import argparse

    from meansparse.cli.common import resolve_preprocessing

    def args(**kw):
        return argparse.Namespace(**{"preprocessing": "auto", "data": "/images/tree", "dataset": "imagenet",
                                     "threat_model": "Linf", **kw})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_preprocessing(args(), "robustbench:Liu2023Comprehensive_Swin-L") == "BicubicRes256Crop224"
        assert resolve_preprocessing(args(dataset="cifar10"), "robustbench:Standard") is None
    assert resolve_preprocessing(args(preprocessing="Res224"), "robustbench:Liu2023Comprehensive_Swin-L") == "Res224"
    assert resolve_preprocessing(args(data="cifar10-jpg"), "robustbench:Liu2023Comprehensive_Swin-L") is None


PREPARED = '''
import torch
from torch import nn

import meansparse as ms


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()
    return ms.prepare(net, example_inputs=(torch.rand(2, 1, 8, 8),))  # arrives with MeanSparse, like the authors'
'''


def test_sweep_on_a_model_that_arrives_prepared_uses_the_network_underneath(tmp_path, capsys):
    (tmp_path / "prepared.py").write_text(PREPARED)
    spec = f"python:{tmp_path / 'prepared.py'}:build"
    assert main(["sweep", "--model", spec, "--pretrained", "false", "--data", "digits", "--alphas", "0,0.5",
                 "--n-holdout", "20",
                 "--n-sweep-robust", "8", "--calibration-batches", "1", "--sweep-attacks", "apgd-ce", "--option",
                 "apgd-ce.steps=2", "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "came with 1 MeanSparse sites: this run calibrates its own on the network underneath" in out
    assert "meansparse evaluate --model" in out
    assert (tmp_path / "sweep" / "meansparse.safetensors").exists()
