"""Per-layer sensitivity curves from the few images, and a global allocator over them.

Signals (``signal=``), all label-free and computed on the *teacher*:

- ``recon``: for each pruned layer, the least-squares elimination path of
  :func:`crossdistill.solvers.solve_structured` walked on the teacher's own
  input (h^S = h^T, the NC objective), from all channels down to
  ``min_keep``: at each kept count, the layer's best reconstruction error
  after re-solving, divided by the energy of its output. One Gram matrix per
  layer, no extra forward pass. Blind where it matters most: solved and
  scored on the same few images, a layer with fewer im2col rows than unknowns
  (late VGG-16 layers at K=1: 10 images x 2x2 positions vs 512x9 unknowns)
  reproduces them exactly at any width, so its curve is flat at 0 and the
  allocator strips it to ``min_keep`` (VGG-16 FLOPs 0.5: -12 pt vs uniform).
- ``penultimate``: the same path, but each solution is written into the
  teacher (that layer alone narrowed) and the error is measured at the
  penultimate features (input of the last Linear, or the output if there is
  none), relative to their energy: one forward pass of the few images per
  (layer, count). Same blindness as ``recon``.
- ``recon-cv`` / ``penultimate-cv``: cross-fitted: the path is solved on one
  half of the draw (alternate images, so classes split) and the error scored
  on the other half, both ways, averaged. Sees what the re-fit will not
  recover on images it did not fit.
- ``magnitude``: no images: removed channels' squared L2 weight norms (the
  consumer's input columns) in units of the layer's mean channel, the
  normalised-magnitude ranking Torch-Pruning's global pruning uses.
- ``greedy`` (:mod:`crossdistill.greedy`): not a per-layer curve but a
  NetAdapt-style iterative greedy in the network as already narrowed,
  cross-fitted, scored at the penultimate features.

The default, and the comparison that chose it on validation images, is
in :mod:`crossdistill.target`'s docstring.

Allocator (:func:`allocate`): greedy on marginal error per unit of cost
saved, taken along each curve's lower convex hull (so a flat stretch after a
steep one is not missed), which for separable costs is the Lagrangian
solution of the knapsack "minimise the sum of errors subject to the budget".
The last hull segment is cut at channel granularity so that the saving
asked is met exactly in the cost model; :mod:`crossdistill.target` then
counts the real pruned model and corrects the budget by bisection (costs
are not separable in chains: a VGG conv loses inputs and outputs).

Cost per channel (:func:`channel_costs`): what removing one prunable input
channel of a layer really removes, counted on a probe copy with torch-pruning
removal (the consumer's input channel, the producer's output channel and its
BN, depthwise convs in between): FLOPs via the FLOP counter, parameters, or
milliseconds from :mod:`crossdistill.latency`'s table.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .capture import capture_input, capture_inputs, forward_order
from .config import SIGNALS
from .errors import UserError
from .measure import count_flops
from .objectives import objective_terms
from .plan import LayerPlan
from .pruning import ChannelRemover
from .solvers import LayerStats, channel_scores

__all__ = [
    "CurveGrid",
    "LayerCurve",
    "SIGNALS",
    "sensitivity_curves",
    "channel_costs",
    "allocate",
    "hull_segments",
    "prune_to_counts",
]


@dataclass
class LayerCurve:
    name: str
    total: int  # input channels of the layer
    prunable: int  # of which prunable (the others are always kept)
    counts: list[int]  # kept prunable channels, descending from ``prunable``
    errors: list[float]  # relative error at each count (0 at full width)
    cost: float = 0.0  # cost saved per removed prunable channel (FLOPs, params or ms)
    floor: int = 1  # the allocator keeps at least this many prunable channels


def _grid(n: int, lowest: int, points: int) -> list[int]:
    """Descending kept counts from ``n`` to ``lowest``, about ``points`` of them, every integer if few."""
    if n - lowest <= points:
        return list(range(n, lowest - 1, -1))
    return sorted({round(n - (n - lowest) * i / points) for i in range(points + 1)}, reverse=True)


def _features(model: nn.Module, images: torch.Tensor, tap: str | None, batch_size: int) -> torch.Tensor:
    if tap is None:
        with torch.no_grad():
            return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return capture_input(model, tap, images, batch_size)


@dataclass(frozen=True)
class CurveGrid:
    """Where a sensitivity curve is sampled: kept fractions from ``min_keep`` to 1 in ``points`` steps."""

    min_keep: float = 0.1  # smallest kept fraction probed
    points: int = 16  # kept counts probed per layer
    ridge: float = 1e-3  # recon: ridge of the least-squares re-fit at each count (x mean diag of the Gram)


def _folds(n: int, cross: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fit, check) image indices: all/all, or (``cross``) the two halves of the draw, each way.
    The draw is in class order, so alternate images split every class that has two or more."""
    idx = torch.arange(n)
    if not cross or n < 2:
        return [(idx, idx)]
    a, b = idx[0::2], idx[1::2]
    return [(a, b), (b, a)]


def _magnitude_curve(wT: torch.Tensor, prunable: torch.Tensor, counts: list[int]) -> list[float]:
    """Summed squared L2 norm of the removed input channels (smallest first), in units of the layer's mean
    channel: Torch-Pruning's global magnitude ranking with its ``mean`` normaliser, as a curve."""
    imp = wT.detach().double().transpose(0, 1).flatten(1).pow(2).sum(1)[prunable]
    imp = imp / (imp.mean() or 1.0)
    cum = torch.cat([torch.zeros(1, dtype=imp.dtype), imp.sort().values.cumsum(0)])
    n = len(prunable)
    return [float(cum[n - k]) for k in counts]


def _walk(system, W0: torch.Tensor, pinned: torch.Tensor, counts: list[int], kk: int, ridge: float):
    """solve_structured's elimination path on ``system``: for each kept count (descending), the re-solved
    weights (zeros on removed channels). Yields (count, W)."""
    c_in = len(pinned)
    keep = torch.arange(c_in, device=W0.device)
    W = W0  # the solution for the current channel set (all channels: the teacher's weights)
    for count in counts:
        n_now = int((~pinned[keep.cpu()]).sum())
        if count < n_now:  # eliminate by the current solution, then re-solve
            cols = (keep[:, None] * kk + torch.arange(kk, device=W0.device)).flatten()
            scores = channel_scores(W[:, cols], system, cols, kk, "energy")
            scores = scores.masked_fill(pinned[keep.cpu()].to(scores.device), float("inf"))
            keep = keep[scores.topk(len(keep) - (n_now - count)).indices.sort().values]
            cols = (keep[:, None] * kk + torch.arange(kk, device=W0.device)).flatten()
            W = torch.zeros_like(W0)
            W[:, cols] = system.solve(cols, W0, ridge).T
        yield count, W


@torch.no_grad()
def sensitivity_curves(
    teacher: nn.Module,
    images: torch.Tensor,
    plan: list[LayerPlan],
    signal: str = "recon",
    batch_size: int = 128,
    grid: CurveGrid | None = None,
) -> list[LayerCurve]:
    """Error of each pruned layer of ``plan`` as it narrows alone (module docstring), on the teacher."""
    grid = grid or CurveGrid()
    min_keep, points, ridge = grid.min_keep, grid.points, grid.ridge
    if signal not in SIGNALS:
        raise UserError(f"unknown allocation signal {signal!r}; choose one of {', '.join(SIGNALS)}")
    if signal == "greedy":
        raise UserError("signal 'greedy' is not a per-layer curve: use crossdistill.greedy.greedy_order")
    teacher = teacher.eval()
    pruned = [p for p in plan if p.keep is not None]
    folds = _folds(len(images), cross=signal.endswith("-cv"))
    hT_all = {} if signal == "magnitude" else capture_inputs(teacher, [p.name for p in pruned], images, batch_size)
    tap, refs = None, {}
    if signal.startswith("penultimate"):
        order = forward_order(teacher, images[:1])
        linears = [n for n in order if isinstance(teacher.get_submodule(n), nn.Linear)]
        tap = linears[-1] if linears else None
        ref = _features(teacher, images, tap, batch_size)
        refs = {i: (ref[check], float(ref[check].double().pow(2).sum()) or 1.0) for i, (_, check) in enumerate(folds)}
    terms = objective_terms("nc")
    curves = []
    for p in pruned:
        layer = teacher.get_submodule(p.name)
        wT = layer.weight.detach()
        c_in = wT.shape[1]
        prunable = torch.arange(c_in) if p.channels is None else torch.tensor(p.channels)
        n = len(prunable)
        counts = _grid(n, max(1, math.ceil(min_keep * n)), points)
        if signal == "magnitude":
            curves.append(LayerCurve(p.name, c_in, n, counts, _magnitude_curve(wT, prunable, counts)))
            continue
        hT = hT_all.pop(p.name)
        pinned = torch.ones(c_in, dtype=torch.bool)
        pinned[prunable] = False
        kk = wT[0, 0].numel() if wT.dim() == 4 else 1
        W0 = wT.flatten(1).double()  # (C_out, C_in*kk)
        errors = [0.0] * len(counts)
        for i, (fit, check) in enumerate(folds):
            systems = []
            for rows in (fit,) if fit is check else (fit, check):
                stats = LayerStats(layer)
                for j in range(0, len(rows), batch_size):
                    h = hT[rows[j : j + batch_size]]
                    stats.add_batch(h, h)
                systems.append(stats.system(terms, wT))
                stats.free()
            check_system = systems[-1]
            energy = check_system.loss(torch.zeros_like(W0)) or 1.0
            for at, (count, W) in enumerate(_walk(systems[0], W0, pinned, counts, kk, ridge)):
                if count == n:
                    continue
                if signal.startswith("recon"):
                    err = check_system.loss(W) / energy
                else:  # the layer alone narrowed in the teacher, error at the penultimate features
                    saved = layer.weight.detach().clone()
                    layer.weight.copy_(W.reshape(wT.shape).to(wT.dtype))
                    try:
                        out = _features(teacher, images[check], tap, batch_size)
                    finally:
                        layer.weight.copy_(saved)
                    ref_i, ref_energy = refs[i]
                    err = float((out.double() - ref_i.double()).pow(2).sum()) / ref_energy
                errors[at] += err / len(folds)
        curves.append(LayerCurve(p.name, c_in, n, counts, errors))
    return curves


def prune_to_counts(
    model: nn.Module, example: torch.Tensor, plan: list[LayerPlan], counts: dict[str, int]
) -> nn.Module:
    """A copy of ``model`` with ``counts[name]`` prunable input channels kept per layer (the last ones
    removed): the shapes :func:`crossdistill.compress.compress` will produce, for counting costs."""
    probe = copy.deepcopy(model).eval()
    remover = ChannelRemover(probe, example)
    for p in plan:
        if p.keep is None or p.name not in counts:
            continue
        c_in = probe.get_submodule(p.name).weight.shape[1]
        prunable = list(range(c_in)) if p.channels is None else p.channels
        drop = set(prunable[counts[p.name] :])
        if drop:
            remover.remove_input_channels(p.name, torch.tensor([j for j in range(c_in) if j not in drop]))
    return probe


def channel_costs(
    model: nn.Module,
    example: torch.Tensor,
    curves: list[LayerCurve],
    plan: list[LayerPlan],
    measure: Callable[[nn.Module], float],
) -> None:
    """Set each curve's ``cost``: ``measure`` saved per removed channel when the layer alone narrows by a
    quarter of its prunable channels, counted on a probe copy (module docstring)."""
    base = measure(model)
    for c in curves:
        drop = max(1, c.prunable // 4)
        probe = prune_to_counts(model, example, plan, {c.name: c.prunable - drop})
        c.cost = max((base - measure(probe)) / drop, 0.0)


def flops_measure(input_shape: torch.Size) -> Callable[[nn.Module], float]:
    return lambda m: float(count_flops(m, input_shape))


def _hull(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the lower convex hull of points sorted by increasing x (x: cost saved, y: error)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def hull_segments(curves: list[LayerCurve]) -> list[tuple[float, LayerCurve, int, int]]:
    """(error per cost saved, curve, from count, to count) of every lower-hull segment, flattest first."""
    segments = []
    for c in curves:
        if c.cost <= 0:
            continue
        xs = [(c.prunable - k) * c.cost for k in c.counts]
        hull = _hull(xs, c.errors)
        for a, b in zip(hull, hull[1:], strict=False):
            slope = (c.errors[b] - c.errors[a]) / (xs[b] - xs[a])
            segments.append((max(slope, 0.0), c, c.counts[a], c.counts[b]))
    # hull slopes increase along each curve, so a stable sort by slope keeps each layer's segments in order
    segments.sort(key=lambda s: s[0])
    return segments


def allocate(curves: list[LayerCurve], saving: float) -> dict[str, int]:
    """Kept prunable channels per layer that save ``saving`` (in the curves' cost units) at the least summed
    error: greedy on the flattest hull segments first (:func:`hull_segments`), the last one cut at channel
    granularity."""
    segments = hull_segments(curves)
    counts = {c.name: c.prunable for c in curves}
    left = saving
    for _, c, k_from, k_to in segments:
        if left <= 0:
            break
        if k_from <= c.floor:
            continue
        take = min(k_from - max(k_to, c.floor), math.ceil(left / c.cost))
        counts[c.name] = k_from - take
        left -= take * c.cost
    return counts


def max_saving(curves: list[LayerCurve]) -> float:
    """Cost saved (cost model) with every layer at the lowest count of its curve (or its floor)."""
    return sum((c.prunable - max(c.counts[-1], c.floor)) * c.cost for c in curves)
