"""Small faithful re-definitions of the architecture patterns of torchvision / timm networks.

Self-contained (torch only): tests and ``benchmarks/bench_coverage.py`` load them with
``load_model_file("tests/zoo.py:<name>")``, and a saved student copies this file into its folder.
Every builder returns a randomly initialised model for 3x16x16 images and 5 classes:

- ``bn_act``: timm's ``BatchNormAct2d`` pattern, a BatchNorm subclass owning its activation
  (SiLU, ReLU6, Identity): constructor state a rebuild from the class would lose;
- ``inverted_residual``: MobileNetV2 (expand 1x1, depthwise 3x3, project 1x1, residual);
- ``efficientnet``: MBConv blocks with squeeze-excite (SiLU, sigmoid gate), as efficientnet_b0;
- ``mobilenet_v3``: inverted residuals with and without SE (hardswish, hardsigmoid gate);
- ``convnext``: depthwise 7x7, channels-last LayerNorm, Linear 4x MLP, layer scale, residual;
- ``densenet``: dense blocks (concatenation), transitions;
- ``ghostnet``: ghost modules (primary 1x1 + cheap depthwise, concatenated);
- ``squeezenet``: fire modules (squeeze 1x1, expand 1x1 and 3x3, concatenated).

Below them, the one shared set of tiny torchvision-style classes the other tests build directly:
``PATTERNS`` (grouped bottleneck, ShuffleNetV2 split + shuffle, MBConv + SE, inception, fire;
tests/test_patterns.py), ``BottleneckResNet``, ``TinySENet``, ``TinyMobileNetV2`` (two configurations),
``TinyDenseNet`` and ``pooled_mlp_head`` (tests/test_target.py, tests/test_architectures.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 5


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by its own activation (timm.layers.BatchNormAct2d, reduced)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, act_layer=nn.ReLU):
        super().__init__(num_features, eps, momentum)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def bn_act() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), BatchNormAct2d(16, eps=1e-3, act_layer=nn.ReLU6),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), BatchNormAct2d(16, act_layer=None),
        nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=False), BatchNormAct2d(12, act_layer=nn.SiLU),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, NUM_CLASSES),
    )  # fmt: skip


class SqueezeExcite(nn.Module):
    """x * gate(excite(act(reduce(mean(x))))): the SE block of EfficientNet / MobileNetV3."""

    def __init__(self, c: int, reduced: int, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, reduced, 1)
        self.act = act()
        self.conv_expand = nn.Conv2d(reduced, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: [expand 1x1] -> depthwise k x k -> [SE] -> project 1x1 (+ identity)."""

    def __init__(self, c_in, c_out, expand, k=3, stride=1, se=0.25, act=nn.SiLU, gate=nn.Sigmoid, se_act=None):
        super().__init__()
        h = c_in * expand
        self.expand = (
            nn.Sequential(nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), act()) if expand != 1 else None
        )
        self.dw = nn.Sequential(nn.Conv2d(h, h, k, stride, k // 2, groups=h, bias=False), nn.BatchNorm2d(h), act())
        self.se = SqueezeExcite(h, max(1, int(c_in * se)), se_act or act, gate) if se else None
        self.project = nn.Sequential(nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class _Net(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.Sequential(*blocks), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), act())


def _pooled_head(c: int, hidden: int, act=nn.SiLU) -> nn.Sequential:
    return nn.Sequential(_conv_bn(c, hidden, 1, act=act), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(hidden, NUM_CLASSES))  # fmt: skip


def inverted_residual() -> nn.Module:
    act = nn.ReLU6
    blocks = [MBConv(8, 8, 4, se=0, act=act), MBConv(8, 12, 4, 3, 2, se=0, act=act), MBConv(12, 12, 4, se=0, act=act)]
    return _Net(_conv_bn(3, 8, stride=1, act=act), blocks, _pooled_head(12, 32, act))


def efficientnet() -> nn.Module:
    blocks = [
        MBConv(8, 8, 1, se=0.25),  # efficientnet_b0's first block: no expansion
        MBConv(8, 12, 6, stride=2),
        MBConv(12, 12, 6),
        MBConv(12, 16, 6, k=5, stride=2),
        MBConv(16, 16, 6, k=5),
    ]
    return _Net(_conv_bn(3, 8, act=nn.SiLU), blocks, _pooled_head(16, 64))


def mobilenet_v3() -> nn.Module:
    hs, relu, hsig = nn.Hardswish, nn.ReLU, nn.Hardsigmoid
    blocks = [
        MBConv(8, 8, 1, stride=2, se=0.25, act=relu, gate=hsig, se_act=relu),  # as mobilenet_v3_small
        MBConv(8, 12, 4, stride=2, se=0, act=relu),
        MBConv(12, 12, 4, se=0, act=relu),
        MBConv(12, 16, 4, k=5, stride=2, act=hs, gate=hsig, se_act=relu),
        MBConv(16, 16, 6, k=5, act=hs, gate=hsig, se_act=relu),
    ]
    return _Net(_conv_bn(3, 8, act=hs), blocks, _pooled_head(16, 64, hs))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's downsampling norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> channels-last LayerNorm -> Linear(c, 4c) -> GELU -> Linear(4c, c) -> gamma -> + x."""

    def __init__(self, c: int):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def convnext() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 32, 2, stride=2), LayerNorm2d(32, eps=1e-6))
    blocks = [
        ConvNeXtBlock(32), ConvNeXtBlock(32),
        nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, stride=2)),
        ConvNeXtBlock(64), ConvNeXtBlock(64),
    ]  # fmt: skip
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(64, eps=1e-6), nn.Linear(64, NUM_CLASSES))
    return _Net(stem, blocks, head)


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))], 1)


def densenet() -> nn.Module:
    g = 6
    blocks = [DenseLayer(8, g), DenseLayer(8 + g, g), DenseLayer(8 + 2 * g, g)]
    c = 8 + 3 * g
    transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 12, 1, bias=False), nn.AvgPool2d(2))
    head = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, NUM_CLASSES))  # fmt: skip
    return _Net(nn.Conv2d(3, 8, 3, padding=1, bias=False), [*blocks, transition], head)


class GhostModule(nn.Module):
    """Primary 1x1 conv to half the outputs, a cheap depthwise 3x3 for the rest, concatenated."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True):
        super().__init__()
        init = (c_out + 1) // 2
        act = nn.ReLU() if relu else nn.Identity()
        self.c_out = c_out
        self.primary = nn.Sequential(nn.Conv2d(c_in, init, 1, bias=False), nn.BatchNorm2d(init), act)
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init),
                                   nn.ReLU() if relu else nn.Identity())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)[:, : self.c_out]


class GhostBottleneck(nn.Module):
    def __init__(self, c_in: int, mid: int, c_out: int, stride: int = 1):
        super().__init__()
        self.ghost1 = GhostModule(c_in, mid)
        self.dw = (
            nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
            if stride > 1 else None
        )  # fmt: skip
        self.ghost2 = GhostModule(mid, c_out, relu=False)
        self.shortcut = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.dw is not None:
            y = self.dw(y)
        return self.ghost2(y) + self.shortcut(x)


def ghostnet() -> nn.Module:
    blocks = [GhostBottleneck(8, 16, 8), GhostBottleneck(8, 24, 12, stride=2), GhostBottleneck(12, 36, 12)]
    return _Net(_conv_bn(3, 8), blocks, _pooled_head(12, 32, nn.ReLU))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1 feeding expand 1x1 and expand 3x3, concatenated."""

    def __init__(self, c_in: int, squeeze: int, expand: int, expand3x3: int | None = None):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand if expand3x3 is None else expand3x3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


def squeezenet() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    blocks = [Fire(16, 4, 8), Fire(16, 4, 8), nn.MaxPool2d(2), Fire(16, 6, 12), Fire(24, 6, 12)]
    head = nn.Sequential(nn.Conv2d(24, NUM_CLASSES, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _Net(stem, blocks, head)


ALL = ["bn_act", "inverted_residual", "efficientnet", "mobilenet_v3", "convnext", "densenet", "ghostnet", "squeezenet"]


# --------------------------------------------------------------------------- pattern models
# Classes used directly by tests/test_patterns.py, tests/test_target.py and tests/test_architectures.py
# (one definition each; the builders above are for load_model_file).


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


class MBConvSE(nn.Module):
    """EfficientNet MBConv: expand 1x1 -> depthwise 3x3 -> squeeze-excite -> project 1x1 (+ identity)."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand, self.dw = _cbr(c, h), _cbr(h, h, 3, groups=h)
        self.se, self.project = SqueezeExcite(h, h // 4, nn.ReLU), _cbr(h, c, act=False)

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


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 -> 1x1 (x4), downsample = conv1x1 + BN where shapes differ."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class BottleneckResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 8), Bottleneck(32, 8))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 2), Bottleneck(64, 16), Bottleneck(64, 16))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SEBlock(nn.Module):
    """Conv-BN-ReLU x2 with squeeze-excitation on the second output, then a residual sum."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return F.relu(out * scale + x)


class TinySENet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.blocks = nn.Sequential(SEBlock(24), SEBlock(24), SEBlock(24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1 (+ identity when shapes agree)."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int = 1):
        super().__init__()
        h = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class TinyMobileNetV2(nn.Module):
    """Three inverted residuals (the second strided); the defaults are tests/test_architectures.py's,
    :func:`tiny_mobilenet_v2_head` is tests/test_target.py's (stride-1 stem, expand 6, a 1x1 head conv)."""

    def __init__(self, num_classes: int = 5, stem_stride: int = 2, expand: int = 4, width: int = 12, head: int = 0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        blocks = [InvertedResidual(8, 8, expand), InvertedResidual(8, width, expand, 2),
                  InvertedResidual(width, width, expand)]  # fmt: skip
        self.blocks = nn.Sequential(*blocks)
        conv = [nn.Conv2d(width, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()] if head else []
        self.head = nn.Sequential(*conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head or width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def tiny_mobilenet_v2_head(num_classes: int = 5) -> TinyMobileNetV2:
    return TinyMobileNetV2(num_classes, stem_stride=1, expand=6, width=16, head=64)


class TinyDenseNet(nn.Module):
    def __init__(self, num_classes: int = 5, growth: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = nn.Sequential(DenseLayer(8, growth), DenseLayer(8 + growth, growth))
        c = 8 + 2 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 10, 1, bias=False))
        self.head = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(10, num_classes))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.transition(self.block(self.stem(x))))


def pooled_mlp_head() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5),
    )  # fmt: skip


def _resnet20() -> nn.Module:
    from crossdistill.models import resnet20

    return resnet20(5)


# a registry model and three zoo patterns (dense concat, inverted residual, ghost), for the tests of what a
# compression caches or skips (tests/test_pruning.py, tests/test_passes.py)
CACHE_NETS = {"resnet20": _resnet20, "densenet": TinyDenseNet, "mobilenet": TinyMobileNetV2, "ghost": ghostnet}


def cache_net(name: str) -> nn.Module:
    """``CACHE_NETS[name]`` with seeded weights, in eval mode."""
    torch.manual_seed(0)
    return CACHE_NETS[name]().eval()


def noise_batch(n: int = 1) -> torch.Tensor:
    """``n`` seeded N(0, 1) images of 3x16x16."""
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
