"""Which layers are re-fitted and how much of each is kept: one default rule for any CNN.

Structured (docs/method.md): every Conv2d but the first (and, with
``include_linear``, every Linear) is re-fitted, pruned or not. A layer's
*input channels* are pruned where they can be removed together with the
output channels of the one layer producing them and nothing else
(:meth:`ChannelRemover.prunable_channels`, from torch-pruning's dependency
graph), unless the layer is in the model's ``prune_skip`` list (ResNet-56:
the official sensitive blocks). What that gives:

- plain chains (VGG convs 2-13), the inner conv of a residual block, the
  second conv of a bottleneck: all input channels are prunable;
- residual sums, the input image, a flatten of a spatial map: nothing, the
  layer is re-fitted only (block outputs are never narrowed);
- MobileNetV2 inverted residuals: the project 1x1 is pruned; its input
  channels go with the expand 1x1's outputs and the depthwise conv's
  channels in between (depthwise convs are pass-throughs, never pruned by
  themselves; they are re-fitted per channel, grouped convs per group);
- concatenation (DenseNet): only the slices of the concat that come from a
  producer feeding this consumer alone are prunable (in a dense block, the
  newest layer's features at the transition conv); ``keep`` then applies to
  those slices, the other channels are kept (``LayerPlan.channels``);
- Linear layers (``include_linear``): input features, i.e. the neurons of
  the Linear (or the channels of the conv, after global pooling) before it.

Unstructured: every Conv2d but the first keeps ``keep`` of its weights
(grouped convs: of their grouped weight); Linear layers stay dense unless
``include_linear``.

Layers the solvers cannot handle (non-zero padding modes, ConvTranspose,
Conv1d/3d) raise a :class:`UserError` naming them, or are left untouched
with a warning when ``skip_unsupported``.

Users override with fnmatch patterns: ``include`` / ``exclude`` restrict the
layers considered, ``keep_overrides`` maps a pattern to its own keep ratio
(the last matching pattern wins; :func:`load_keep_file` reads them from YAML).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from .capture import eval_mode, forward_order, removing
from .config import CompressConfig
from .errors import UserError
from .pruning import ChannelRemover, is_depthwise
from .solvers import explicit_padding

__all__ = [
    "LayerPlan",
    "make_plan",
    "keep_count",
    "round_count",
    "load_keep_file",
    "unsupported_reason",
    "input_shapes",
    "se_gated_channels",
]

# weighted layers the solvers do not handle: named in an error, never silently left dense
_UNSUPPORTED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv1d, nn.Conv3d)


@dataclass
class LayerPlan:
    name: str
    keep: float | None  # fraction of input channels (structured) or weights (unstructured); None: re-fit only
    channels: list[int] | None = None  # structured: the prunable input channels (None: all); keep applies to these
    round_to: int = 1  # structured: the kept count is rounded to a multiple of this (see round_count)
    tie: int = 1  # structured: channels per unit (GhostNet twins: 2); kept counts are whole units

    def prunable(self, model: nn.Module) -> int:
        """The input channels ``keep`` applies to: ``channels``, else all of the layer's in ``model``."""
        return len(self.channels) if self.channels is not None else model.get_submodule(self.name).weight.shape[1]

    def n_keep(self, total: int) -> int:
        """Kept input channels / weights out of ``total``: channels outside ``channels`` are always kept."""
        if self.keep is None:
            return total
        free = total if self.channels is None else len(self.channels)
        fixed = total - free
        if self.tie > 1:  # whole units (ChannelRemover.channel_ties), at least one
            n = fixed + self.tie * keep_count(free // self.tie, self.keep)
            rounded = round_count(n, self.round_to, fixed + 1, total)
            return fixed + self.tie * max(1, round((rounded - fixed) / self.tie))
        return round_count(fixed + keep_count(free, self.keep), self.round_to, fixed + 1, total)


def keep_count(total: int, keep: float) -> int:
    """Kept channels/weights for a ratio: ``floor(keep * total)``, at least 1."""
    return max(1, math.floor(keep * total + 1e-9))


def round_count(n: int, multiple: int, low: int, high: int) -> int:
    """``n`` rounded to the nearest multiple of ``multiple`` inside ``[low, high]`` (ties: down); ``n`` itself
    when no multiple lies there (a layer narrower than the multiple): never zero, never above the width."""
    if multiple <= 1:
        return n
    lo, hi = -(-low // multiple) * multiple, high // multiple * multiple
    if lo > hi:
        return n
    nearest = round(n / multiple - 1e-9) * multiple
    return min(max(nearest, lo), hi)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why the least-squares solvers cannot handle ``layer``, or None."""
    if isinstance(layer, _UNSUPPORTED_TYPES):
        return f"{type(layer).__name__} layers cannot be re-fitted (only Conv2d and Linear)"
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} is not supported (only zero padding)"
        try:
            explicit_padding(layer)  # the solvers' im2col needs symmetric padding
        except TypeError as e:
            return str(e)
    return None


def load_keep_file(path: str | Path) -> dict[str, float]:
    """Per-layer keep ratios from a YAML mapping ``pattern: ratio`` (fnmatch patterns, ratios in (0, 1]).

    Example file::

        "features.*": 0.5
        "blocks.3.project": 0.25
        classifier.fc1: 1.0
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"keep file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"keep file {path} is not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"keep file {path} must map layer-name patterns to keep ratios, e.g. 'layer1.*: 0.5'")
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
            raise UserError(f"keep file {path}: ratio for {k!r} must be a number in (0, 1], got {v!r}")
        out[str(k)] = float(v)
    return out


def _match(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch(name, p) for p in patterns or [])


def make_plan(
    model: nn.Module, example: torch.Tensor, cfg: CompressConfig, remover: ChannelRemover | None = None
) -> list[LayerPlan]:
    """The layers to process, in forward order, with their keep ratio (rule: module docstring).

    Reads ``cfg.prune``, ``keep``, ``include``, ``exclude``, ``keep_overrides``,
    ``include_linear``, ``refit_unpruned``, ``skip_unsupported`` and ``round_to``. A layer the
    solvers cannot handle (non-zero padding mode, ConvTranspose, Conv1d/3d)
    raises a :class:`UserError` naming it, or is left untouched with a warning
    when ``skip_unsupported``. ``remover``: the model's :class:`ChannelRemover`
    (built here when needed and not given).
    """
    prune, keep, include, exclude = cfg.prune, cfg.keep, cfg.include, cfg.exclude
    if prune not in ("structured", "unstructured"):
        raise UserError(f"prune must be 'structured' or 'unstructured', got {prune!r}")
    if not 0.0 < keep <= 1.0:
        raise UserError(f"keep must lie in (0, 1], got {keep}; e.g. 0.5 keeps half the channels")
    types = (nn.Conv2d, nn.Linear) if cfg.include_linear else (nn.Conv2d,)
    order = forward_order(model, example, types=(nn.Conv2d, nn.Linear, *_UNSUPPORTED_TYPES))
    shapes = input_shapes(model, example) if prune == "structured" or cfg.prune_pointwise_linear else {}
    pointwise = {n for n, s in shapes.items() if isinstance(model.get_submodule(n), nn.Linear) and len(s) > 2}
    if not cfg.prune_pointwise_linear or cfg.include_linear:
        pointwise = set()
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    if not convs:
        raise UserError("the model has no Conv2d layer; crossdistill compresses convolutional networks")
    first = convs[0]
    skip = set(getattr(model, "prune_skip", ()))
    has_squeeze = any(spatial_size(s) == 1 for s in shapes.values())
    plan: list[LayerPlan] = []
    untouched: set[str] = set()  # unsupported layers left alone: neither re-fitted nor narrowed as producers
    for name in order:
        layer = model.get_submodule(name)
        if name == first or not (isinstance(layer, (*types, *_UNSUPPORTED_TYPES)) or name in pointwise):
            continue
        if include and not _match(name, include):
            continue
        if _match(name, exclude):
            continue
        problem = unsupported_reason(layer)
        if problem:
            if not cfg.skip_unsupported:
                raise UserError(
                    f"layer {name} ({type(layer).__name__}) cannot be compressed: {problem}; "
                    f"exclude it (--exclude '{name}') or allow skipping (skip_unsupported=True)"
                )
            warnings.warn(f"leaving layer {name} untouched: {problem}", stacklevel=2)
            untouched.add(name)
            continue
        ratio = keep
        for pattern, r in (cfg.keep_overrides or {}).items():
            if fnmatch(name, pattern):
                ratio = r
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"keep for {name} must lie in (0, 1], got {ratio}")
        if prune == "structured":
            channels: list[int] = []
            if name not in skip and ratio < 1.0:
                remover = remover or ChannelRemover(model, example)
                channels = remover.prunable_channels(name, untouched)
                # an SE squeeze conv reads a 1x1 map: without one (or with every channel free already)
                # se_gated_channels finds nothing, and its dependency walk is most of the plan's time
                if cfg.prune_se and has_squeeze and len(channels) < layer.weight.shape[1]:
                    gated = se_gated_channels(remover, name, shapes, untouched)
                    if gated:  # their twins (a ghost module behind the gate) go with them: counted too
                        channels = remover.tie_channels(name, sorted(set(channels) | set(gated)))
            if channels:
                whole = len(channels) == layer.weight.shape[1]
                tie = remover.tie_size(name, channels) if remover is not None else 1
                plan.append(LayerPlan(name, ratio, None if whole else channels, cfg.round_to, tie))
            elif cfg.refit_unpruned:
                plan.append(LayerPlan(name, None))
        else:
            plan.append(LayerPlan(name, ratio if ratio < 1.0 else None))
    return plan


# --------------------------------------------------------------------------- squeeze-excite, pointwise Linear


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape of every Conv2d and Linear on ``example``. A Linear with more than 2 input dims acts on
    channels-last maps or token grids (ConvNeXt / MLP blocks): a *pointwise* Linear, pruned like a 1x1 conv
    even without ``include_linear``; a conv on a 1x1 map of a larger one is a squeeze-excite conv."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: shapes.__setitem__(n, tuple(args[0].shape)))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with removing(hooks), eval_mode(model), torch.no_grad():
        model(example)
    return shapes


def spatial_size(shape: tuple[int, ...] | None) -> int:
    return shape[-1] * shape[-2] if shape is not None and len(shape) == 4 else 0


def se_gated_channels(
    remover: ChannelRemover,
    name: str,
    shapes: dict[str, tuple[int, ...]],
    frozen: set[str] | frozenset[str] = frozenset(),
) -> list[int]:
    """Input channels of ``name`` that :meth:`ChannelRemover.prunable_channels` refuses only because a
    squeeze-excite block gates them, removable together with the SE convs.

    Such a channel has two producers, the main conv M (groups 1; depthwise convs in between pass
    through) and the SE excite conv E, and one other consumer, the SE squeeze conv S, with E fed by S
    alone, and S reads a pooled 1x1 map of the layer's larger input (``shapes``: :func:`input_shapes`;
    the pooling is what tells an SE gate from a residual block, whose first conv reads the full map).
    Removing it drops M's output, the depthwise channel, S's input and E's output together
    (EfficientNet, MobileNetV3). Nothing else may touch it (no residual sum, no model output).
    """
    import torch_pruning as tp

    layer = remover.model.get_submodule(name)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or getattr(layer, "groups", 1) != 1:
        return []
    if spatial_size(shapes.get(name)) <= 1:
        return []
    c_in = layer.weight.shape[1]
    fn = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
    try:
        group = remover.pruning_group(layer, fn, list(range(c_in)))
    except (IndexError, ZeroDivisionError, KeyError):  # torch-pruning cannot follow these channels
        return []
    producers: list[list[nn.Module]] = [[] for _ in range(c_in)]
    consumers: list[list[nn.Module]] = [[] for _ in range(c_in)]
    blocked = [False] * c_in
    for item in group:
        mod, handler = item.dep.target.module, item.dep.handler
        roots = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
        if isinstance(mod, (tp.ops._OutputOp, tp.ops._ReshapeOp, tp.ops._UnbindOp, tp.ops._ExpandOp)):
            for r in roots:
                blocked[r] = True
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod is layer or is_depthwise(mod):
            continue
        ok = getattr(mod, "groups", 1) == 1 and remover.names.get(mod) not in frozen
        if remover.graph.is_out_channel_pruning_fn(handler):
            ok = ok and len({int(i) for i in item.idxs}) == len(roots)
            for r in roots:
                producers[r].append(mod)
                blocked[r] |= not ok
        elif remover.graph.is_in_channel_pruning_fn(handler):
            for r in roots:
                consumers[r].append(mod)
                blocked[r] |= not ok
    fed_by: dict[nn.Module, list[str]] = {}
    out = []
    for j in range(c_in):
        if blocked[j] or len(producers[j]) != 2 or len(consumers[j]) != 1:
            continue
        squeeze = remover.names.get(consumers[j][0])
        if spatial_size(shapes.get(squeeze)) != 1:
            continue
        for p in producers[j]:
            if p not in fed_by:
                fed_by[p] = remover.coupled_layers(p)[1]  # the layers producing p's input channels
        if sum(fed_by[p] == [squeeze] for p in producers[j]) == 1:
            out.append(j)
    return out
