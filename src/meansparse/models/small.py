"""A small CNN for 8x8 digits: the embedded offline default, trains adversarially in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, activation: str = "relu", in_channels: int = 1,
                 width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.act2 = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * width, 4 * width)
        self.act3 = make_activation(activation)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc2(self.act3(self.fc1(torch.flatten(self.pool(out), 1))))
