"""Small architectures for the core tests (defined here so the core does not depend on meansparse.models).

Each is a miniature of a family MeanSparse is used on; widths and inputs are tiny so tests run in seconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# The test tensors are tiny: extra intra-op threads only add OpenMP contention (14 s vs 2.5 s measured on a
# busy 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained for a few seconds (standard training), so that attacks have examples to attack."""
    from meansparse.training import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 8}, dataset="digits",
                      method="standard", epochs=3, batch_size=64, lr=0.05, n_holdout=100, eval_n=50, eval_steps=0,
                      augment=False)
    train(cfg, out, progress=False)
    return out / "best"


# ----------------------------------------------------------------------------------- CIFAR ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet18(nn.Module):
    """kuangliu-style CIFAR ResNet-18 (functional ReLU): 17 activations, 8 after a residual add."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ----------------------------------------------------------------------------------- pre-act WRN
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu2(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class PreActWRN(nn.Module):
    """WRN-10-1-style pre-activation network: bn->relu->conv blocks and a final bn->relu (7 sites)."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(
            PreActBlock(width, width, 1), PreActBlock(width, 2 * width, 2), PreActBlock(2 * width, 4 * width, 2)
        )
        self.bn = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = self.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------------- SE block
class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class SENet(nn.Module):
    """conv-bn-SiLU, SE (ReLU inside), conv-bn-SiLU: 3 sites, 2 outside the SE module."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU()
        self.se = SqueezeExcite(c)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU()
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.se(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------------- ViT-like
class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), Mlp(d, 4 * d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding + 2 transformer blocks: 2 GELU sites on NLC tokens with 4*dim channels."""

    def __init__(self, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*[TransformerBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


# ----------------------------------------------------------------------------------- ConvNeXt-like
class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """2 ConvNeXt blocks: 2 GELU sites on NHWC tensors with 4*C channels."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, 4)
        self.stages = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# ----------------------------------------------------------------------------------- functional / reuse
class FunctionalNet(nn.Module):
    """F.relu, torch.relu, x.relu(), F.gelu and an in-place x.relu_() whose input is used afterwards."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.fc1, self.fc2 = nn.Linear(c, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        y = self.c3(x)
        y.relu_()  # result discarded: later code relies on the in-place mutation of y
        x = (x + y).relu()
        return self.fc2(F.gelu(self.fc1(x.mean((2, 3)))))


class ReusedActNet(nn.Module):
    """One nn.ReLU module called at three call sites (fx gives three operators)."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = self.act(self.c2(x) + x)
        x = self.act(self.c3(x))
        return self.fc(x.mean((2, 3)))


class UntraceableNet(nn.Module):
    """Data-dependent control flow defeats torch.fx; also has one functional ReLU that modules miss."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.act1, self.fc1, self.act2 = nn.PReLU(c), nn.Linear(c, 12), nn.ELU()
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = self.act1(self.bn(self.c1(x)))
        if x.sum() > -1e9:  # a data-dependent branch: not traceable
            x = F.relu(x)
        return self.fc2(self.act2(self.fc1(x.mean((2, 3)))))


MODELS = {
    "resnet18": ResNet18,
    "preact_wrn": PreActWRN,
    "se": SENet,
    "vit": TinyViT,
    "convnext": TinyConvNeXt,
    "functional": FunctionalNet,
    "reused": ReusedActNet,
    "untraceable": UntraceableNet,
}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A deterministic instance in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = MODELS[name](**kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def build_model():
    return build


@pytest.fixture
def images():
    """Images as the package takes them: float NCHW in [0, 1] (calibrate checks this)."""
    torch.manual_seed(1)
    return torch.rand(4, 3, 16, 16)


@pytest.fixture
def quiet():
    """Silence expected warnings (e.g. the fx fallback) in tests that are not about them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
