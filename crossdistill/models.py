"""Model registry and the CIFAR-style networks of the paper.

Every model takes ``num_classes`` and ``in_channels`` so that the same code
serves Fashion-MNIST (1 channel, 28x28) and CIFAR (3 channels, 32x32).

- ResNet-20/32/56: He et al. 2016, section 4.2 (3 stages of 16/32/64 channels,
  option-A shortcuts: stride-2 subsampling plus zero-padded channels), as in
  the official cross-distillation release.
- VGG-16: the "network slimming" CIFAR form used by the official release
  (BN after every conv, classifier Linear(512,512)-BN-ReLU-Linear(512,C)).
  Global average pooling replaces the fixed 2x2 pool so 28x28 inputs work.
- LeNet-5: LeCun et al. 1998 with ReLU and max pooling.
- ResNet-18 and MobileNetV2: torchvision's layout and module names, adapted
  to 28x28 grey images (crossdistill/torchvision_style.py says how).
"""

from __future__ import annotations

import hashlib
import importlib.util
import operator
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .torchvision_style import MobileNetV2
from .torchvision_style import ResNet as TorchvisionResNet

__all__ = [
    "register_model",
    "get_model",
    "list_models",
    "load_model_file",
    "official_mu",
    "model_family",
    "ResNet",
    "BasicBlock",
    "VGG",
    "LeNet5",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its own name (timm-style entrypoint)."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a registered model by name, e.g. ``get_model("resnet56", 10, 1)`` (case, - and _ ignored)."""
    by_key = {_key(n): fn for n, fn in _MODELS.items()}
    if _key(name) not in by_key:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return by_key[_key(name)](num_classes=num_classes, in_channels=in_channels)


# mu of models without an official value: the VGG-16 setting (the release's default)
DEFAULT_MU = 0.6


def official_mu(model: nn.Module) -> float:
    """mu of Ours for ``model``: its class's ``official_mu`` (the release's ResNets 0.9, VGG-16 0.6; MobileNetV2
    0.2, chosen on validation images as the release has none), else 0.6."""
    return float(getattr(model, "official_mu", DEFAULT_MU))


_ADDS = (operator.add, operator.iadd, torch.add)


def model_family(model: nn.Module) -> str:
    """``"residual"`` when the forward adds two activations (a skip connection), else ``"plain"`` (a chain
    like VGG). End-to-end training settings differ between the two (crossdistill.mir, baselines): a
    pruned plain chain is badly conditioned and needs a smaller lr. Registry classes state it
    (``family``); other models are traced with torch.fx; one fx cannot trace counts as residual
    (most modern CNNs are)."""
    family = getattr(model, "family", None)
    if family in ("residual", "plain"):
        return family
    import torch.fx as fx  # only here: importing fx is slow

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow etc.: fx raises many kinds of errors
        return "residual"
    for node in graph.nodes:
        add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if add and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            return "residual"
    return "plain"


# --------------------------------------------------------------------------- a user's model file


def _split_spec(spec: str) -> tuple[Path, str]:
    path, sep, fn = str(spec).rpartition(":")
    if not sep or not path or not fn.isidentifier():
        raise UserError(f"--model-file must look like path/to/file.py:function, got {spec!r}")
    return Path(path), fn


def load_model_file(spec: str) -> nn.Module:
    """Import ``path.py`` and call its ``function()``: the user's (untrained or to-be-loaded) model."""
    path, fn = _split_spec(spec)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; check the path")
    name = "crossdistill_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    build = getattr(module, fn, None)
    if not callable(build):
        raise UserError(f"{path} has no function {fn!r}; name a function that returns the nn.Module")
    try:
        model = build()
    except Exception as e:
        raise UserError(f"{path}:{fn}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"{path}:{fn}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- ResNet


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels.

    Parameter-free, so block outputs keep their width and are never pruned.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    # Model-specific defaults of the official release (docs/method.md): mu of "ours", and per depth
    # the blocks whose inner conv is never narrowed (sensitive blocks of Li et al. 2017, conv
    # indices 16/20/38/54 of ResNet-56 = the inner conv of blocks 7, 9, 18, 26).
    official_mu = 0.9
    family = "residual"  # end-to-end training defaults (model_family)
    sensitive_blocks: dict[int, tuple[int, ...]] = {56: (7, 9, 18, 26)}

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layer1 = nn.Sequential(*blocks[:n])
        self.layer2 = nn.Sequential(*blocks[n : 2 * n])
        self.layer3 = nn.Sequential(*blocks[2 * n :])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        # layers the official release never narrows (plan.py reads prune_skip)
        self.prune_skip = [f"{self._block_name(b)}.conv2" for b in self.sensitive_blocks.get(depth, ())]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _block_name(self, b: int) -> str:
        n = len(self.layer1)
        return f"layer{b // n + 1}.{b % n}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(20, num_classes, in_channels)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(32, num_classes, in_channels)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(56, num_classes, in_channels)


# --------------------------------------------------------------------------- VGG

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG(nn.Module):
    official_mu = 0.6  # mu of "ours" in the official release
    family = "plain"  # end-to-end training defaults (model_family)

    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG16_CFG, num_classes, in_channels)


# --------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    family = "plain"  # end-to-end training defaults (model_family)

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(5)  # 28x28 and 32x32 inputs both end at 16x5x5
        self.classifier = nn.Sequential(
            nn.Linear(16 * 25, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    return LeNet5(num_classes, in_channels)


# --------------------------------------------------------------------------- torchvision families


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3) -> TorchvisionResNet:
    """torchvision's ResNet-18 with a 3x3 stride-2 stem and no max pool: 0.24 GFLOPs at 28x28."""
    return TorchvisionResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """torchvision's MobileNetV2 (``in_channels`` inputs) with a stride-1 stem: 0.044 GFLOPs at 28x28."""
    return MobileNetV2(num_classes, in_channels)
