"""Record and restore the layer widths of a (physically pruned) model.

A structurally pruned student has the same module tree as its teacher with
narrower Conv2d / Linear / BatchNorm layers. ``layer_widths`` records every
such layer's shape; ``apply_widths`` rebuilds those layers in a freshly built
model, so a student is rebuilt from ``(model name, widths, state dict)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["layer_widths", "apply_widths", "DroppedBlock"]


class DroppedBlock(nn.Module):
    """What is left of a dropped residual block: its shortcut (identity or a fitted 1x1 adaptor)."""

    def __init__(self, adaptor: nn.Module | None = None):
        super().__init__()
        self.adaptor = adaptor if adaptor is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adaptor(x)


def layer_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, DroppedBlock):  # a residual block replaced by its shortcut (crossdistill.blockdrop)
            a = m.adaptor
            out[name] = {
                "type": "dropped_block",
                "adaptor": None
                if isinstance(a, nn.Identity)
                else {"in": a.in_channels, "out": a.out_channels, "stride": a.stride[0]},
            }
        elif isinstance(m, nn.Conv2d):
            out[name] = {"type": "conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out[name] = {"type": type(m).__name__, "num_features": m.num_features}
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_widths(model: nn.Module, widths: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize the layers of ``model`` in place to the recorded ``widths``."""
    for name, w in widths.items():
        if w["type"] == "dropped_block":
            a = w["adaptor"]
            _replace(model, name, DroppedBlock(a and nn.Conv2d(a["in"], a["out"], 1, a["stride"], bias=True)))
            continue
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d) and (m.in_channels, m.out_channels, m.groups) != (w["in"], w["out"], w["groups"]):
            new = nn.Conv2d(
                w["in"],
                w["out"],
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                w["groups"],
                m.bias is not None,
                m.padding_mode,
            )
            _replace(model, name, new)
        elif isinstance(m, nn.Linear) and (m.in_features, m.out_features) != (w["in"], w["out"]):
            _replace(model, name, nn.Linear(w["in"], w["out"], m.bias is not None))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.num_features != w["num_features"]:
            _replace(model, name, type(m)(w["num_features"], m.eps, m.momentum, m.affine, m.track_running_stats))
    return model
