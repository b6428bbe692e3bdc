"""CIFAR ResNet-18 (He et al. 2016) and its pre-activation variant, with a width knob (64 = standard)."""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = make_activation(activation)  # after the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], width: int = 64, num_classes: int = 10,
                 activation: str = "relu", in_channels: int = 3, preact: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        stages, cin = [], width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1, activation))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.act_final = make_activation(activation) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv1(x)
        else:
            out = self.act1(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act_final(self.bn_final(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(width: int = 64, num_classes: int = 10, activation: str = "relu", in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes, activation, in_channels)


def preact_resnet18(width: int = 64, num_classes: int = 10, activation: str = "relu",
                    in_channels: int = 3) -> ResNet:
    model = ResNet(PreActBlock, (2, 2, 2, 2), width, num_classes, activation, in_channels, preact=True)
    del model.bn1, model.act1  # the stem of a pre-activation network has no BN/activation
    return model
