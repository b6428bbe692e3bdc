"""Registry, architectures, activations and safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch

from meansparse import models
from meansparse.models import PSiLU, PSSiLU, create_model, list_models, load, save_checkpoint


@pytest.mark.parametrize("activation", ["relu", "elu", "gelu", "silu", "psilu", "pssilu"])
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_resnets_build_and_run(name, activation):
    model = create_model(name, width=4, activation=activation).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_wideresnet_and_small_cnn():
    wrn = create_model("wideresnet", depth=10, widen=1, num_classes=100, normalization="cifar100").eval()
    assert wrn(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    cnn = create_model("small_cnn", normalization="digits").eval()
    assert cnn(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wideresnet", depth=11)


def test_registry_errors():
    assert {"resnet18", "preact_resnet18", "wideresnet", "small_cnn"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg")
    with pytest.raises(ValueError, match="unknown activation"):
        create_model("resnet18", activation="tanhh")
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("resnet18")(lambda **k: None)


def test_parametric_activations_follow_their_definitions():
    x = torch.linspace(-4, 4, 101)
    p = PSiLU(beta=2.0)
    assert torch.allclose(p(x), x * torch.sigmoid(2 * x))
    q = PSSiLU(beta=1.5, alpha=0.2)
    assert torch.allclose(q(x), x * (torch.sigmoid(1.5 * x) - 0.2) / 0.8)
    assert sum(1 for _ in q.parameters()) == 2  # both learnable


def test_normalization_is_inside_the_model():
    model = create_model("small_cnn", normalization="digits")
    assert torch.allclose(model.mean, torch.tensor(0.5)) and isinstance(model.net, torch.nn.Module)


def test_checkpoint_roundtrip_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", width=4, activation="pssilu").eval()
    cfg = {"model": "resnet18", "model_kwargs": {"width": 4, "activation": "pssilu"}}
    path = save_checkpoint(model, tmp_path / "m", cfg)
    assert path.suffix == ".safetensors" and (tmp_path / "m.json").exists()
    again = load(tmp_path / "m.safetensors")
    assert not again.training
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_kwargs"):
        save_checkpoint(model, tmp_path / "bad", {"model": "resnet18"})
