"""Builders of the real torchvision / timm architectures for benchmarks/bench_coverage.py --real.

One no-argument function per row, so that a saved student names it as ``real_models.py:<row>`` and
``load_checkpoint`` rebuilds it. Random init (no weights are downloaded); torchvision's
googlenet / inception_v3 without their auxiliary heads (unused at eval). torchvision and timm are
never crossdistill dependencies: run with an environment that has them (/work/tvenv here).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

# row -> (package, model name, input size): 64x64 where the model allows it
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "convnext_tiny", "densenet121", "squeezenet1_1", "googlenet", "inception_v3", "regnet_x_400mf",
               "shufflenet_v2_x1_0"]  # fmt: skip
TIMM = ["resnet18", "efficientnet_lite0", "mobilevit_xxs", "ghostnet_100"]
ROWS = [f"tv_{n}" for n in TORCHVISION] + [f"timm_{n}" for n in TIMM]
SIZE = {"tv_inception_v3": 80}  # torchvision's inception_v3 needs >= 75x75


def available(row: str) -> bool:
    """The package that defines ``row`` imports here."""
    try:
        importlib.import_module("torchvision" if row.startswith("tv_") else "timm")
    except ImportError:
        return False
    return True


def version(row: str) -> str:
    pkg = "torchvision" if row.startswith("tv_") else "timm"
    return f"{pkg} {importlib.import_module(pkg).__version__}"


def build(row: str) -> nn.Module:
    if row.startswith("tv_"):
        import torchvision

        name = row[3:]
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return getattr(torchvision.models, name)(weights=None, **kwargs)
    import timm

    return timm.create_model(row[5:], pretrained=False)


def _builder(row: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return build(row)

    make.__name__ = row
    return make


# the module-level functions load_checkpoint imports (real_models.py:tv_resnet18, ...)
globals().update({row: _builder(row) for row in ROWS})
