"""What a compression achieved against what was asked: layers left whole, and why, and a shortfall warning.

After every structured run (:func:`crossdistill.run.finish`) the FLOPs and
parameter ratios are compared with the keep ratio. A network whose channels
cannot be removed (squeeze-excite gates, residual sums everywhere, Linear
blocks with ``include_linear`` off, grouped convs) would otherwise be
reported as compressed while it barely changed. A reduction below half of
what ``keep`` asks for (keep 0.5: FLOPs or parameters above x0.75) gives a
warning naming the layers left whole (neither input nor output channels
removed) with the reason read off torch-pruning's dependency graph; it is
also written to the report (``CompressReport.shortfall``, ``left_whole``).
The per-layer records are checked too: a layer whose input width after the
run differs from its recorded kept count (coupled channels removed together)
is named.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .capture import eval_mode, removing
from .config import CompressConfig
from .plan import input_shapes, spatial_size, unsupported_reason
from .pruning import ChannelRemover, is_depthwise

__all__ = [
    "ShortfallWarning",
    "left_whole_layers",
    "shortfall_message",
    "width_mismatches",
    "heldout_errors",
    "first_tensor",
    "SHORTFALL_FRACTION",
    "OVERFIT_FACTOR",
]


class ShortfallWarning(UserWarning):
    """Compression reached much less than asked (the CLI prints it under the before/after table)."""


SHORTFALL_FRACTION = 0.5  # warn when less than this share of the asked reduction (1 - keep) is reached
OVERFIT_FACTOR = 3.0  # warn when the held-out output error exceeds this multiple of the fitted images' one
OVERFIT_FLOOR = 0.05  # ... and is above this relative error (tiny errors on both sides are no concern)


def _spatial_inputs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """H*W of each Conv2d's input on ``example`` (SE convs see 1x1 maps), keyed by module."""
    shapes = input_shapes(model, example)
    return {model.get_submodule(n): spatial_size(shape) for n, shape in shapes.items()}


def left_whole_layers(
    teacher: nn.Module, student: nn.Module, example: torch.Tensor, cfg: CompressConfig, remover: ChannelRemover
) -> list[dict[str, Any]]:
    """Conv2d / Linear layers of ``student`` with the teacher's shape, each with why (``name``, ``type``,
    ``reason``). ``remover``: the run's dependency graph (built on ``student``)."""
    sizes = _spatial_inputs(student, example)
    out = []
    for name, m in student.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        try:
            t = teacher.get_submodule(name)
        except AttributeError:  # a module the teacher does not have (the adaptor of a dropped block)
            continue
        if m.weight.shape != t.weight.shape:
            continue
        out.append({"name": name, "type": type(m).__name__, "reason": _reason(name, m, cfg, remover, sizes)})
    return out


def _reason(name: str, m: nn.Module, cfg: CompressConfig, remover: ChannelRemover, sizes: dict) -> str:
    if cfg.include and not any(fnmatch(name, p) for p in cfg.include):
        return "not matched by --include"
    if any(fnmatch(name, p) for p in cfg.exclude or []):
        return "excluded (--exclude)"
    problem = unsupported_reason(m)
    if problem:
        return f"traced as unsupported: {problem}"
    if isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m):
        return f"grouped conv (groups={m.groups}): its channels are removed only group-wise, not supported"
    linear_off = not cfg.include_linear
    if isinstance(m, nn.Linear) and linear_off:
        return "Linear layer (include_linear is off)"
    return _coupling_reason(m, remover, sizes, linear_off)


def _coupling_reason(m: nn.Module, remover: ChannelRemover, sizes: dict, linear_off: bool) -> str:
    """Why the output channels of ``m`` stay: what else the dependency graph ties them to."""
    fn = tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels
    try:
        group = remover.pruning_group(m, fn, [0])
    except Exception:  # noqa: BLE001 - a module torch-pruning did not trace
        return "traced as unsupported: not in the dependency graph"
    own = sizes.get(m, 0)
    producers, found = 0, set()
    for item in group:
        mod, handler = item.dep.target.module, item.dep.handler
        if isinstance(mod, tp.ops._OutputOp):
            found.add("output")
        elif isinstance(mod, (tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._SliceOp)):
            found.add("concat")
        elif isinstance(mod, (tp.ops._ReshapeOp, tp.ops._UnbindOp, tp.ops._ExpandOp)):
            found.add("reshape")
        elif isinstance(mod, nn.Conv2d) and remover.graph.is_in_channel_pruning_fn(handler) and not is_depthwise(mod):
            if sizes.get(mod, 0) == 1 and own > 1:  # a conv on the pooled 1x1 map of these channels
                found.add("se")
            elif mod.groups > 1:
                found.add("grouped")
        elif isinstance(mod, nn.Linear) and remover.graph.is_in_channel_pruning_fn(handler) and linear_off:
            found.add("linear")
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and remover.graph.is_out_channel_pruning_fn(handler):
            producers += 0 if is_depthwise(mod) else 1
    if "se" in found:
        return "squeeze-excite gated"
    if "grouped" in found:
        return "feeds a grouped conv"
    if "output" in found:
        return "its outputs are the model's output"
    if producers > 1:
        return "residual sum (tied to other layers' outputs)"
    if "concat" in found:
        return "concatenated (reused by several layers)"
    if "linear" in found:
        return "feeds a Linear layer (include_linear is off)"
    if "reshape" in found:
        return "flattened or reshaped downstream"
    return "its channels feed several layers (not prunable)"


def shortfall_message(
    cfg: CompressConfig,
    flops_ratio: float,
    params_ratio: float,
    left_whole: list[dict[str, Any]],
    mismatches: list[str],
) -> str | None:
    """The warning text, or None when the run reached what ``keep`` asked for (or nothing was asked)."""
    parts = []
    if cfg.prune == "structured" and cfg.keep < 1.0 and not cfg.include and not cfg.keep_overrides:
        bound = 1.0 - SHORTFALL_FRACTION * (1.0 - cfg.keep)
        if flops_ratio > bound or params_ratio > bound:
            whole = ", ".join(f"{d['name']} ({d['reason']})" for d in left_whole[:12])
            more = f" and {len(left_whole) - 12} more" if len(left_whole) > 12 else ""
            parts.append(
                f"compression fell short: keep {cfg.keep} reached FLOPs x{flops_ratio:.2f}, parameters "
                f"x{params_ratio:.2f} (expected about x{cfg.keep:.2f} or less); layers left whole: "
                f"{whole or 'none'}{more}"
            )
    if mismatches:
        parts.append("kept counts differ from the widths reached: " + "; ".join(mismatches))
    return " | ".join(parts) or None


def width_mismatches(student: nn.Module, records: list) -> list[str]:
    """Pruned layers whose input width after a structured run is not their recorded kept count."""
    out = []
    names = dict(student.named_modules())
    for r in records:
        m = names.get(r.name)
        if m is None or r.kept >= r.total or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if getattr(m, "groups", 1) != 1:
            continue
        width = m.weight.shape[1]
        if width != r.kept:
            out.append(f"{r.name}: {r.kept} recorded, {width} reached (coupled channels went together)")
    return out


@torch.no_grad()
def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    with removing([mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach())) for n in names]):
        with eval_mode(model):
            y = model(x)
    return got, y


def first_tensor(out: Any) -> torch.Tensor:
    """A model's output, or the first tensor of a dict / tuple output (the one compared with the teacher's)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(first_tensor(v) for v in values)


def _rel(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in double precision (``||a - b||`` when ``b`` is zero), as run.output_error."""
    a, b = first_tensor(a).double(), first_tensor(b).double()
    diff, ref = float((a - b).pow(2).sum()), float(b.pow(2).sum())
    return math.sqrt(diff / ref) if ref > 0 else math.sqrt(diff)


def heldout_errors(
    teacher: nn.Module, student: nn.Module, fit: torch.Tensor, held: torch.Tensor, names: list[str]
) -> dict[str, Any]:
    """Relative output error ||F^S - F^T|| / ||F^T|| of ``student`` on the fitted and the held-out images: at
    the model output and per layer of ``names`` whose output width is the teacher's. ``warning``: text when the
    held-out error is much worse (x OVERFIT_FACTOR) than the fitted one, else None."""
    tf, yf = _outputs(teacher, names, fit)
    sf, sf_y = _outputs(student, names, fit)
    th, yh = _outputs(teacher, names, held)
    sh, sh_y = _outputs(student, names, held)
    layers = {
        n: {"fit": _rel(sf[n], tf[n]), "heldout": _rel(sh[n], th[n])}
        for n in names
        if n in sf and n in tf and sf[n].shape == tf[n].shape
    }
    fit_err, held_err = _rel(sf_y, yf), _rel(sh_y, yh)
    warning = None
    # the model output first, then the layer with the largest gap (pooling can hide a layer's overfit)
    candidates = [("output", fit_err, held_err)] + sorted(
        ((n, e["fit"], e["heldout"]) for n, e in layers.items()), key=lambda t: -t[2] / max(t[1], 1e-12)
    )
    for where, f, h in candidates:
        if h > OVERFIT_FACTOR * f and h > OVERFIT_FLOOR:
            warning = (
                f"the student fits the images it was fitted on far better than {len(held)} held-out images "
                f"({'output' if where == 'output' else 'layer ' + where} error {f:.3g} vs {h:.3g}): it may not "
                "generalise; give more images, raise ridge, or use a method that keeps closer to the teacher"
            )
            break
    return {
        "images": len(held),
        "output_error": held_err,
        "fit_output_error": fit_err,
        "layers": layers,
        "warning": warning,
    }
