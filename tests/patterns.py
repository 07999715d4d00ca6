"""Tiny instances of the patterns of modern CNNs, for tests/test_architectures.py and test_patterns.py:
grouped convs inside a bottleneck (ResNeXt / RegNet), channel split + shuffle (ShuffleNetV2),
squeeze-excite (MobileNetV3 / EfficientNet), inception concatenation (GoogLeNet), fire modules
(SqueezeNet). Random weights; each builder takes ``num_classes`` only."""

from __future__ import annotations

import torch
from torch import nn


def _cbr(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class GroupedBottleneck(nn.Module):
    """ResNeXt / RegNet block: 1x1 -> grouped 3x3 -> 1x1, plus the identity."""

    def __init__(self, c: int, width: int, groups: int):
        super().__init__()
        self.a, self.b = _cbr(c, width), _cbr(width, width, 3, groups=groups)
        self.c = _cbr(width, c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c(self.b(self.a(x))))


class TinyResNeXt(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.blocks = nn.Sequential(GroupedBottleneck(16, 16, 4), GroupedBottleneck(16, 16, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit, stride 1: split the channels in half, transform one half, concat, shuffle."""

    def __init__(self, c: int):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_cbr(h, h), _cbr(h, h, 3, groups=h, act=False), _cbr(h, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


class TinyShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.conv_last = _cbr(16, 24)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_last(self.units(self.stem(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class MBConvSE(nn.Module):
    """EfficientNet MBConv: expand 1x1 -> depthwise 3x3 -> squeeze-excite -> project 1x1 (+ identity)."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand, self.dw = _cbr(c, h), _cbr(h, h, 3, groups=h)
        self.se, self.project = SqueezeExcite(h), _cbr(h, c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class TinyEfficientNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = _cbr(3, 8, 3, 2)
        self.blocks = nn.Sequential(MBConvSE(8), MBConvSE(8))
        self.head = nn.Sequential(_cbr(8, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Inception(nn.Module):
    """GoogLeNet module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | pool -> 1x1, concatenated."""

    def __init__(self, c_in: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = _cbr(c_in, c1)
        self.b2 = nn.Sequential(_cbr(c_in, c3r), _cbr(c3r, c3, 3))
        self.b3 = nn.Sequential(_cbr(c_in, c5r), _cbr(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(c_in, cp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class TinyGoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.inc1, self.inc2 = Inception(16, 8, 8, 12, 4, 6, 6), Inception(32, 8, 8, 12, 4, 6, 6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inc2(self.inc1(self.stem(x))))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1 feeding expand 1x1 and expand 3x3, concatenated."""

    def __init__(self, c_in: int, s: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(c_in, s, 1), nn.ReLU(inplace=True))
        self.expand1x1 = nn.Sequential(nn.Conv2d(s, e1, 1), nn.ReLU(inplace=True))
        self.expand3x3 = nn.Sequential(nn.Conv2d(s, e3, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class TinySqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
                                      Fire(16, 4, 2, 14), Fire(16, 4, 8, 8))  # fmt: skip
        self.classifier = nn.Sequential(nn.Conv2d(16, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


PATTERNS = {
    "grouped": TinyResNeXt,
    "shuffle": TinyShuffleNet,
    "squeeze-excite": TinyEfficientNet,
    "inception": TinyGoogLeNet,
    "fire": TinySqueezeNet,
}
