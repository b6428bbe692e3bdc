"""Pre-activation WideResNet (Zagoruyko & Komodakis 2016), the family of most RobustBench CIFAR models."""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        return skip + self.conv2(self.act2(self.bn2(self.conv1(o))))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, activation: str = "relu",
                 in_channels: int = 3, base: int = 16) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [base, base * widen, 2 * base * widen, 4 * base * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[WideBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0
                                                    else 1, activation) for j in range(n)]))
            cin = cout
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.act(self.bn(out))), 1))
