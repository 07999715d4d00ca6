"""ResNet-18 and MobileNetV2 in torchvision's layout, adapted to 28x28 grey images.

Module names follow torchvision 0.2x exactly (``conv1 bn1 maxpool layer1..4
avgpool fc`` with ``BasicBlock.downsample``; ``features.N.conv.M`` with
``Conv2dNormActivation`` and ``InvertedResidual``, ``classifier.1``), so a
torchvision state dict loads onto these models except for the adapted stem
and head (``tests/test_models.py`` checks the key names and shapes against
torchvision when it is importable). The adaptation:

- ResNet-18: a 3x3 stride-2 stem with ``in_channels`` inputs replaces the
  7x7 stride-2 one, and the 3x3 stride-2 max pool is left out (an
  ``nn.Identity`` keeps its name): 28x28 images give maps of 14 (stem and
  layer1), 7, 4 and 2 pixels (torchvision at 224x224: 112/56/28/14/7), a
  total stride of 16. 0.24 GFLOPs per 28x28 image (11.2M parameters;
  torchvision's resnet18 at 224x224: 3.6 GFLOPs). With the max pool (maps
  7/4/2/1, 0.065 GFLOPs, the teacher shipped until session 8) the network
  under-fit: 82 % on its own training images after 2 epochs.
- MobileNetV2 (width 1.0): torchvision's network but for the number of
  input channels and a stride-1 stem (torchvision: stride 2), as CIFAR
  adaptations do: 28x28 images give maps of 28 (stem and first stage),
  14/7/4/4/2/2 pixels over the other six stages and 2x2 before the pool.
  0.044 GFLOPs per 28x28 image (2.2M parameters; torchvision's mobilenet_v2
  at 224x224: 0.60 GFLOPs). With torchvision's stride-2 stem (1x1 maps from
  the sixth stage, 0.011 GFLOPs) it reached 85.1 % in 2 epochs and 83.9 % in 5.

The adapted stems are what ``scripts/train_teachers.py`` trains; one step of
batch 128 costs 1.4 s (ResNet-18) and 1.0 s (MobileNetV2) of one CPU thread here.

FLOPs are 2 x multiply-adds, counted by ``crossdistill.measure.count_flops``
(FlopCounterMode). The head is ``Linear(512 | 1280, num_classes)``. Initialisation as
torchvision (kaiming-normal fan-out convs, unit BN, N(0, 0.01) MobileNet
classifier). Forward passes are fx-traceable (capture and plan rely on it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "MobileNetV2", "InvertedResidual", "Conv2dNormActivation", "make_divisible"]


# --------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs, projection ``downsample`` when the shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet of :class:`BasicBlock` (``layers=(2, 2, 2, 2)``: ResNet-18), 3x3 stride-2 stem."""

    official_mu = 0.9  # the release's ResNet value (it has none for ResNet-18)

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 2, 1, bias=False)  # torchvision: 7x7, stride 2, padding 3
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # torchvision: MaxPool2d(3, 2, 1). Left out: at 28x28 it left 7x7 maps in layer1 and the network under-fit
        # (82 % on its own training images); an Identity keeps the name and torchvision's state dict
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- MobileNetV2


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (never more than 10 % below ``v``); benchmarks/tv_models.py uses it too."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision's conv-BN-ReLU6 unit (children ``0``, ``1``, ``2``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: expand 1x1 (when ``expand_ratio`` != 1), depthwise 3x3, linear 1x1."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's table
MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                        [6, 320, 1, 1]]  # fmt: skip


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0, dropout 0.2); ``in_channels`` inputs."""

    # The release has no MobileNet. mu chosen on validation images of the train split (session 8,
    # benchmarks/results/sweep_hparams_fashion-mnist.md, K=1 and 5, 3 seeds): 0.2 gives 78.5 / 84.4 %,
    # the VGG default 0.6 gives 75.6 / 81.3 (NC 81.9 / 88.5, Ours-S 80.7 / 88.4: both stay above Ours here)
    official_mu = 0.2

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        input_channel, self.last_channel = 32, 1280
        # torchvision: stride 2. Stride 1 on 28x28 images (as CIFAR adaptations do): 2x2 maps before the pool
        features: list[nn.Module] = [Conv2dNormActivation(in_channels, input_channel, stride=1)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            output_channel = make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        # torchvision pools functionally; a parameter-free module keeps the state dict identical and
        # gives MiR (crossdistill.mir.feature_point) the pool before the classifier by name
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
