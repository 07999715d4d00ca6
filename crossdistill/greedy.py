"""Iterative greedy allocation (``signal="greedy"``), NetAdapt-style, label-free, cross-fitted.

The per-layer curves of :mod:`crossdistill.allocate` narrow each layer alone in
the full teacher, then add the errors as if they were independent. They are
not: on VGG-16 the curves send early layers to ~0.2 of their channels, and
errors compound downstream. Here the network is narrowed step by step, and
at each step the layer narrowed is the one whose next step (1/``points`` of
its prunable channels) adds the least error at the penultimate features
*of the network as already narrowed*, per unit of cost saved (FLOPs,
parameters or table milliseconds per channel, as for the curves).

Each candidate step takes the layer's weights from the least-squares
elimination path walked on the teacher's input to that layer (the NC
objective; :func:`crossdistill.allocate._walk`). The path is solved on one
half of the few images and the error measured on the other half, both ways
(two narrowed copies of the teacher): solved and scored on the same images,
a layer with fewer im2col rows than unknowns reproduces them exactly whatever
its width, which made the ``recon`` curves blind on late VGG layers.

Lazy evaluation keeps it cheap: candidates sit in a queue by their last
score; the best is re-scored in the current network and taken if it still
beats the next best stale score (scores mostly grow as the network narrows).
One step costs a few forward passes of the few images.

The result is an *order* of steps; :func:`follow` turns a saving asked (cost
model units) into kept counts by taking steps in that order, the last cut at
channel granularity, so :mod:`crossdistill.target`'s bisection works as with
the curves.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable

import torch
from torch import nn

from .allocate import CurveGrid, LayerCurve, _features, _folds, _grid, _walk
from .capture import capture_inputs, forward_order
from .objectives import objective_terms
from .plan import LayerPlan
from .solvers import LayerStats

__all__ = ["greedy_order", "follow", "layer_grids"]


def layer_grids(teacher: nn.Module, plan: list[LayerPlan], grid: CurveGrid) -> list[LayerCurve]:
    """One curve per pruned layer with its kept counts (errors zero until :func:`greedy_order` fills them)."""
    curves = []
    for p in plan:
        if p.keep is None:
            continue
        c_in = teacher.get_submodule(p.name).weight.shape[1]
        n = c_in if p.channels is None else len(p.channels)
        counts = _grid(n, max(1, math.ceil(grid.min_keep * n)), grid.points)
        curves.append(LayerCurve(p.name, c_in, n, counts, [0.0] * len(counts)))
    return curves


class _Paths:
    """Per layer and fold, the elimination path (a generator) and the weights of its next step."""

    def __init__(self, teacher, images, plan, curves, folds, batch_size):
        pruned = {p.name: p for p in plan}
        hT_all = capture_inputs(teacher, [c.name for c in curves], images, batch_size)
        terms = objective_terms("nc")
        self.paths: dict[tuple[str, int], object] = {}
        self.next: dict[tuple[str, int], tuple[int, torch.Tensor] | None] = {}
        for c in curves:
            layer = teacher.get_submodule(c.name)
            wT = layer.weight.detach()
            p = pruned[c.name]
            prunable = torch.arange(c.total) if p.channels is None else torch.tensor(p.channels)
            pinned = torch.ones(c.total, dtype=torch.bool)
            pinned[prunable] = False
            kk = wT[0, 0].numel() if wT.dim() == 4 else 1
            hT = hT_all.pop(c.name)
            for i, (fit, _) in enumerate(folds):
                stats = LayerStats(layer)
                for j in range(0, len(fit), batch_size):
                    h = hT[fit[j : j + batch_size]]
                    stats.add_batch(h, h)
                system = stats.system(terms, wT)
                stats.free()
                walk = _walk(system, wT.flatten(1).double(), pinned, c.counts, kk, CurveGrid().ridge)
                next(walk)  # full width: the teacher's own weights
                self.paths[(c.name, i)] = walk
                self.advance(c.name, i)

    def advance(self, name: str, fold: int) -> None:
        self.next[(name, fold)] = next(self.paths[(name, fold)], None)


@torch.no_grad()
def greedy_order(
    teacher: nn.Module,
    images: torch.Tensor,
    plan: list[LayerPlan],
    curves: list[LayerCurve],
    enough: Callable[[dict[str, int]], bool],
    batch_size: int = 128,
) -> list[tuple[str, int]]:
    """Steps (layer, kept count) in the order the greedy takes them (module docstring), until ``enough``
    (kept counts -> bool, checked every few steps) or every layer is at its lowest count. Fills each
    curve's ``errors`` with the error its steps added (for the bisection's single-channel fallback).
    ``curves`` need their ``cost`` (:func:`crossdistill.allocate.channel_costs`)."""
    teacher = teacher.eval()
    folds = _folds(len(images), cross=True)
    order = forward_order(teacher, images[:1])
    linears = [n for n in order if isinstance(teacher.get_submodule(n), nn.Linear)]
    tap = linears[-1] if linears else None
    ref = _features(teacher, images, tap, batch_size)
    refs = [(ref[check].double(), float(ref[check].double().pow(2).sum()) or 1.0) for _, check in folds]
    models = [copy.deepcopy(teacher).eval() for _ in folds]
    paths = _Paths(teacher, images, plan, curves, folds, batch_size)
    by_name = {c.name: c for c in curves}
    counts = {c.name: c.prunable for c in curves}
    reached = {c.name: [0.0] for c in curves}  # error added by each step taken, per layer

    def error() -> float:
        total = 0.0
        for model, (_, check), (r, energy) in zip(models, folds, refs, strict=True):
            out = _features(model, images[check], tap, batch_size)
            total += float((out.double() - r).pow(2).sum()) / energy
        return total / len(folds)

    def set_weights(name: str, weights: list[torch.Tensor]) -> None:
        for model, W in zip(models, weights, strict=True):
            layer = model.get_submodule(name)
            layer.weight.copy_(W.reshape(layer.weight.shape).to(layer.weight.dtype))

    def score(name: str) -> float | None:
        """Error added per cost saved by the layer's next step, in the current network; None: no step left."""
        steps = [paths.next[(name, i)] for i in range(len(folds))]
        if any(s is None for s in steps):
            return None
        saved = [m.get_submodule(name).weight.detach().clone() for m in models]
        set_weights(name, [W for _, W in steps])
        try:
            added = error() - now
        finally:
            for m, w in zip(models, saved, strict=True):
                m.get_submodule(name).weight.copy_(w)
        c = by_name[name]
        return max(added, 0.0) / (c.cost * (counts[name] - steps[0][0]))

    now = error()
    queue = []
    for c in curves:
        if c.cost > 0 and (s := score(c.name)) is not None:
            heapq.heappush(queue, (s, c.name))
    steps: list[tuple[str, int]] = []
    while queue:
        _, name = heapq.heappop(queue)
        s = score(name)  # re-scored in the network as it is now
        if s is None:
            continue
        if queue and s > queue[0][0]:
            heapq.heappush(queue, (s, name))
            continue
        step = [paths.next[(name, i)] for i in range(len(folds))]
        set_weights(name, [W for _, W in step])
        before, now = now, error()
        counts[name] = step[0][0]
        reached[name].append(max(now - before, 0.0))
        steps.append((name, counts[name]))
        for i in range(len(folds)):
            paths.advance(name, i)
        if (s := score(name)) is not None:
            heapq.heappush(queue, (s, name))
        if len(steps) % 4 == 0 and enough(counts):
            break
    for c in curves:  # each layer's curve: cumulative error its steps added, at the counts it reached
        k = len(reached[c.name])
        c.counts, c.errors = c.counts[:k], [sum(reached[c.name][: i + 1]) for i in range(k)]
    return steps


def follow(steps: list[tuple[str, int]], curves: list[LayerCurve], saving: float) -> dict[str, int]:
    """Kept counts after the greedy's steps that save ``saving`` (cost units), the last cut to channels."""
    by_name = {c.name: c for c in curves}
    counts = {c.name: c.prunable for c in curves}
    left = saving
    for name, count in steps:
        if left <= 0:
            break
        c = by_name[name]
        take = min(counts[name] - count, math.ceil(left / c.cost))
        counts[name] -= take
        left -= take * c.cost
    return counts


def steps_saving(steps: list[tuple[str, int]], curves: list[LayerCurve]) -> float:
    """Cost saved (cost model) once every step is taken."""
    by_name = {c.name: c for c in curves}
    return sum((c.prunable - min([k for n, k in steps if n == c.name], default=c.prunable)) * c.cost
               for c in by_name.values())  # fmt: skip
