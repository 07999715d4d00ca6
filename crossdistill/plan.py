"""Which layers are re-fitted and how much of each is kept (the official defaults).

Structured (METHOD.md): every Conv2d but the first is re-fitted, pruned or
not; a conv's input channels are pruned when it is independently prunable
(VGG-16: convs 2-13; CIFAR ResNets: the inner conv of each block, since
block outputs are tied by the residual sum) and it is not in the model's
``prune_skip`` list (ResNet-56: the official sensitive blocks).
Unstructured: every Conv2d but the first keeps ``keep`` of its weights;
Linear layers stay dense unless ``include_linear``.

Users override with fnmatch patterns: ``include`` / ``exclude`` restrict the
layers considered, ``keep_overrides`` maps a pattern to its own keep ratio.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from .capture import forward_order
from .errors import UserError
from .pruning import ChannelRemover

__all__ = ["LayerPlan", "make_plan", "keep_count"]


@dataclass
class LayerPlan:
    name: str
    keep: float | None  # fraction of input channels (structured) or weights (unstructured); None: re-fit only


def keep_count(total: int, keep: float) -> int:
    """Kept channels/weights for a ratio: ``floor(keep * total)``, at least 1."""
    return max(1, math.floor(keep * total + 1e-9))


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why the least-squares solvers cannot handle ``layer``, or None."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}) is not supported yet"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return "only explicit zero padding is supported"
    return None


def _match(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch(name, p) for p in patterns or [])


def make_plan(
    model: nn.Module,
    example: torch.Tensor,
    prune: str = "structured",
    keep: float = 0.5,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_overrides: dict[str, float] | None = None,
    include_linear: bool = False,
    refit_unpruned: bool = True,
    remover: ChannelRemover | None = None,
    skip_unsupported: bool = False,
) -> list[LayerPlan]:
    """The layers to process, in forward order, with their keep ratio.

    A layer the solvers cannot handle (grouped/depthwise conv, non-zero padding
    mode, string padding) raises a :class:`UserError` naming it, or is left
    untouched with a warning when ``skip_unsupported``.
    """
    if prune not in ("structured", "unstructured"):
        raise UserError(f"prune must be 'structured' or 'unstructured', got {prune!r}")
    if not 0.0 < keep <= 1.0:
        raise UserError(f"keep must lie in (0, 1], got {keep}; e.g. 0.5 keeps half the channels")
    types = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    order = forward_order(model, example, types=(nn.Conv2d, nn.Linear))
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    if not convs:
        raise UserError("the model has no Conv2d layer; crossdistill compresses convolutional networks")
    first = convs[0]
    skip = set(getattr(model, "prune_skip", ()))
    plan: list[LayerPlan] = []
    for name in order:
        layer = model.get_submodule(name)
        if name == first or not isinstance(layer, types):
            continue
        if include and not _match(name, include):
            continue
        if _match(name, exclude):
            continue
        problem = unsupported_reason(layer)
        if problem:
            if not skip_unsupported:
                raise UserError(
                    f"layer {name} ({type(layer).__name__}) cannot be compressed: {problem}; "
                    f"exclude it (--exclude '{name}') or allow skipping (skip_unsupported=True)"
                )
            warnings.warn(f"leaving layer {name} untouched: {problem}", stacklevel=2)
            continue
        ratio = keep
        for pattern, r in (keep_overrides or {}).items():
            if fnmatch(name, pattern):
                ratio = r
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"keep for {name} must lie in (0, 1], got {ratio}")
        if prune == "structured":
            prunable = name not in skip and ratio < 1.0
            if prunable:
                remover = remover or ChannelRemover(model, example)
                prunable = remover.independently_prunable(name)
            if prunable or refit_unpruned:
                plan.append(LayerPlan(name, ratio if prunable else None))
        else:
            plan.append(LayerPlan(name, ratio if ratio < 1.0 else None))
    return plan
