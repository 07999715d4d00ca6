"""Record and restore the layer widths of a (physically pruned) model.

A structurally pruned student has the same module tree as its teacher with
narrower layers. ``layer_widths`` records, for every module owning parameters
or buffers, the shape of each of them and the width attributes pruning
changes (``in_channels``, ``num_features``, ``normalized_shape`` ...).
``apply_widths`` resizes those modules *in place* in a freshly built model:
the module objects are kept and only their tensors and width attributes
change, never re-constructed from the class. So subclasses with constructor
state of their own (timm's ``BatchNormAct2d`` with its activation, a conv
with a custom forward) come back exactly as built; a student is rebuilt from
``(model name or file, widths, state dict)``.
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


# width attributes torch-pruning rewrites when it narrows a module (the rest of a module's state is untouched)
_WIDTH_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_channels",
    "num_groups",
    "normalized_shape",
    "num_parameters",
)
# the short keys older sidecars used (and tests read)
_LEGACY = {"in_channels": "in", "out_channels": "out", "in_features": "in", "out_features": "out"}


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(m.named_parameters(recurse=False))
    out.update({k: v for k, v in m.named_buffers(recurse=False) if v is not None})
    return out


def layer_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module with own parameters/buffers: its type, width attributes and tensor shapes (JSON-able)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, DroppedBlock):  # a residual block replaced by its shortcut (crossdistill.blockdrop)
            a = m.adaptor
            adaptor = None if isinstance(a, nn.Identity) else {"in": a.in_channels, "out": a.out_channels}
            out[name] = {"type": "dropped_block", "adaptor": adaptor and {**adaptor, "stride": a.stride[0]}}
            continue
        tensors = _own_tensors(m)
        if not tensors or not name:
            continue
        rec: dict[str, Any] = {"type": _type_name(m)}
        for attr in _WIDTH_ATTRS:
            v = getattr(m, attr, None)
            if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
                rec[_LEGACY.get(attr, attr)] = list(v) if isinstance(v, (tuple, list)) else v
        rec["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
        out[name] = rec
    return out


def _type_name(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    return type(m).__name__


def apply_widths(model: nn.Module, widths: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize the modules of ``model`` in place to the recorded ``widths``; returns ``model``.

    Tensors get the recorded shapes (their values are to be loaded from the state dict after);
    width attributes the recorded values. Sidecars written before shapes were recorded
    (Conv2d / Linear / BatchNorm entries only) are read too.
    """
    for name, w in widths.items():
        if w["type"] == "dropped_block":  # recorded before its adaptor, so the adaptor's record finds it
            a = w["adaptor"]
            _replace(model, name, DroppedBlock(a and nn.Conv2d(a["in"], a["out"], 1, a["stride"], bias=True)))
            continue
        m = model.get_submodule(name)
        shapes = w.get("shapes") or _legacy_shapes(m, w)
        for tname, shape in shapes.items():
            _resize(m, tname, tuple(shape))
        for attr in _WIDTH_ATTRS:
            key = _LEGACY.get(attr, attr)
            if key in w and hasattr(m, attr):
                v = w[key]
                setattr(m, attr, tuple(v) if isinstance(v, list) else v)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _resize(m: nn.Module, tname: str, shape: tuple[int, ...]) -> None:
    t = getattr(m, tname, None)
    if t is None or tuple(t.shape) == shape:
        return
    new = torch.empty(shape, dtype=t.dtype, device=t.device)
    if isinstance(t, nn.Parameter):
        setattr(m, tname, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        m.register_buffer(tname, new, persistent=tname not in m._non_persistent_buffers_set)


def _legacy_shapes(m: nn.Module, w: dict[str, Any]) -> dict[str, list[int]]:
    """Tensor shapes implied by an old-format record (conv2d / linear / BatchNorm widths only)."""
    out: dict[str, list[int]] = {}
    if isinstance(m, nn.Conv2d):
        out["weight"] = [w["out"], w["in"] // w["groups"], *m.kernel_size]
        if m.bias is not None:
            out["bias"] = [w["out"]]
    elif isinstance(m, nn.Linear):
        out["weight"] = [w["out"], w["in"]]
        if m.bias is not None:
            out["bias"] = [w["out"]]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        n = w["num_features"]
        for k in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, k, None) is not None:
                out[k] = [n]
    return out
