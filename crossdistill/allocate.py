"""Per-layer sensitivity curves from the few images, and a global allocator over them.

Signals (``signal=``), both label-free and computed on the *teacher*:

- ``recon`` (default): for each pruned layer, the least-squares elimination
  path of :func:`crossdistill.solvers.solve_structured` walked on the
  teacher's own input (h^S = h^T, the NC objective), from all channels down
  to ``min_keep``: at each kept count, the layer's best reconstruction error
  after re-solving, divided by the energy of its output. One Gram matrix per
  layer, no extra forward pass: the cheapest signal, and it is exactly the
  quantity the re-fit will minimise. Blind to how much a layer's error
  matters downstream (every layer's relative error counts alike).
- ``penultimate``: the same path, but each solution is written into the
  teacher (that layer alone narrowed) and the error is measured at the
  penultimate features (input of the last Linear, or the output if there is
  none), relative to their energy. Sees how errors propagate and how much
  the rest of the network absorbs, at the price of one forward pass of the
  few images per (layer, count).

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
    teacher = teacher.eval()
    pruned = [p for p in plan if p.keep is not None]
    hT_all = capture_inputs(teacher, [p.name for p in pruned], images, batch_size)
    tap = None
    if signal == "penultimate":
        order = forward_order(teacher, images[:1])
        linears = [n for n in order if isinstance(teacher.get_submodule(n), nn.Linear)]
        tap = linears[-1] if linears else None
        ref = _features(teacher, images, tap, batch_size)
        ref_energy = float(ref.double().pow(2).sum()) or 1.0
    terms = objective_terms("nc")
    curves = []
    for p in pruned:
        layer = teacher.get_submodule(p.name)
        wT = layer.weight.detach()
        hT = hT_all.pop(p.name)
        stats = LayerStats(layer)
        for j in range(0, len(hT), batch_size):
            stats.add_batch(hT[j : j + batch_size], hT[j : j + batch_size])
        system = stats.system(terms, wT)
        c_in = wT.shape[1]
        kk = wT[0, 0].numel() if wT.dim() == 4 else 1
        W0 = wT.flatten(1).double()  # (C_out, C_in*kk)
        energy = system.loss(torch.zeros_like(W0)) or 1.0
        prunable = torch.arange(c_in) if p.channels is None else torch.tensor(p.channels)
        pinned = torch.ones(c_in, dtype=torch.bool)
        pinned[prunable] = False
        n = len(prunable)
        counts = _grid(n, max(1, math.ceil(min_keep * n)), points)
        keep = torch.arange(c_in, device=wT.device)
        W = W0  # the solution for the current channel set (all channels: the teacher's weights)
        errors = []
        for count in counts:
            n_now = int((~pinned[keep.cpu()]).sum())
            if count < n_now:  # eliminate by the current solution, then re-solve (solve_structured's rule)
                cols = (keep[:, None] * kk + torch.arange(kk, device=wT.device)).flatten()
                scores = channel_scores(W[:, cols], system, cols, kk, "energy")
                scores = scores.masked_fill(pinned[keep.cpu()].to(scores.device), float("inf"))
                keep = keep[scores.topk(len(keep) - (n_now - count)).indices.sort().values]
                cols = (keep[:, None] * kk + torch.arange(kk, device=wT.device)).flatten()
                W = torch.zeros_like(W0)
                W[:, cols] = system.solve(cols, W0, ridge).T
            if signal == "recon":
                errors.append(system.loss(W) / energy if count < n else 0.0)
            elif count == n:
                errors.append(0.0)
            else:
                saved = layer.weight.detach().clone()
                layer.weight.copy_(W.reshape(wT.shape).to(wT.dtype))
                try:
                    out = _features(teacher, images, tap, batch_size)
                finally:
                    layer.weight.copy_(saved)
                errors.append(float((out.double() - ref.double()).pow(2).sum()) / ref_energy)
        stats.free()
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
    error: greedy on the flattest hull segments first, the last one cut at channel granularity."""
    segments = hull_segments(curves)
    counts = {c.name: c.prunable for c in curves}
    left = saving
    for _, c, k_from, k_to in segments:
        if left <= 0:
            break
        take = min(k_from - k_to, math.ceil(left / c.cost))
        counts[c.name] = k_from - take
        left -= take * c.cost
    return counts


def max_saving(curves: list[LayerCurve]) -> float:
    """Cost saved (cost model) with every layer at the lowest count of its curve."""
    return sum((c.prunable - c.counts[-1]) * c.cost for c in curves)
