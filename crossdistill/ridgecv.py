"""Per-layer ridge chosen by two-fold cross-validation over the few images (``ridge="cv"``).

A layer's exact fit generalises or not depending on its inputs, not only on
how many rows it has per weight: on trained VGG-16 with 10 images the late
layers (far fewer rows than weights) re-fit well with a tiny ridge, while on
random-init networks fed noise the same regime fits the images and misses
any other image by orders of magnitude. So the ridge is measured, not
guessed: the images are split in two halves (by image, since an image's
positions are not independent rows), the kept channels (chosen as usual on
all images) are solved on one half with each of :data:`CV_RIDGES` and scored
by the layer's objective on the other half, both ways; the ridge with the
smallest held-out objective re-solves on all images. The two halves'
statistics sum to the full ones, so the Grams are accumulated once.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .solvers import (
    GramSystem,
    LayerProblem,
    LayerStats,
    LeastSquares,
    LstsqOptions,
    RowSystem,
    SolveResult,
    effective_ridge,
    kept_columns,
    never_worse,
    solve_structured,
)

__all__ = ["CV_RIDGES", "cv_solve_structured"]

CV_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative ridges tried (x mean diag of the Gram), smallest first


def _as_gram(system: LeastSquares) -> GramSystem:
    if isinstance(system, GramSystem):
        return system
    A, B = system.A, system.B
    return GramSystem(A.T @ A, A.T @ B, float(B.pow(2).sum()), system.rows)


def _sum(a: LeastSquares, b: LeastSquares) -> LeastSquares:
    """The system of both image sets: the statistics add (rows stacked where both kept their rows)."""
    if isinstance(a, RowSystem) and isinstance(b, RowSystem):
        return RowSystem(torch.cat([a.A, b.A]), torch.cat([a.B, b.B]), a.rows + b.rows)
    ga, gb = _as_gram(a), _as_gram(b)
    return GramSystem(ga.G + gb.G, ga.C + gb.C, ga.const + gb.const, ga.rows + gb.rows)


class _Fixed:
    """A LayerStats stand-in whose ``system`` is already built (solve_structured only calls ``system``)."""

    def __init__(self, system: LeastSquares):
        self._system = system

    def system(self, terms, wT) -> LeastSquares:
        return self._system


def _half_stats(layer, problem: LayerProblem, hT, hS, idx: torch.Tensor, bs: int) -> LeastSquares:
    stats = LayerStats(layer, problem.terms, problem.wT)
    same = hS is hT
    for j in range(0, len(idx), bs):
        part = idx[j : j + bs]
        xT = hT[part]
        stats.add_batch(xT, xT if same else hS[part])
    system = stats.system(problem.terms, problem.wT)
    stats.free()
    return system


def _held_loss(train: LeastSquares, test: LeastSquares, cols, W0, ridge: float) -> float:
    W = torch.zeros_like(W0)
    W[:, cols] = train.solve(cols, W0, ridge).T
    return test.loss(W) * test.rows  # un-normalised by rows: the two folds add


def cv_solve_structured(
    layer, problem: LayerProblem, hT: torch.Tensor, hS: torch.Tensor, opts: LstsqOptions
) -> tuple[SolveResult, float]:
    """:func:`solve_structured` with the ridge of :data:`CV_RIDGES` that re-fits best across two image halves.

    Returns the result and the relative ridge chosen (``opts``' own ridge when there are fewer than 2 images).
    """
    n = len(hT)
    if n < 2:
        system = _Fixed(_half_stats(layer, problem, hT, hS, torch.arange(n), opts.batch_size))
        return solve_structured(system, problem, opts), opts.ridge
    perm = torch.arange(n)
    a, b = perm[0::2], perm[1::2]  # the caller's images are a random draw: alternate ones make the halves
    sys_a = _half_stats(layer, problem, hT, hS, a, opts.batch_size)
    sys_b = _half_stats(layer, problem, hT, hS, b, opts.batch_size)
    full = _sum(sys_a, sys_b)
    res = solve_structured(_Fixed(full), problem, opts)  # the channels, chosen at the run's own ridge
    W0 = problem.w0.flatten(1).double()
    cols = kept_columns(res.kept, problem.w0)
    d = len(cols)
    scores = {}
    for r in CV_RIDGES:
        o = replace(opts, ridge=r)
        scores[r] = _held_loss(sys_a, sys_b, cols, W0, effective_ridge(o, sys_a.rows, d))
        scores[r] += _held_loss(sys_b, sys_a, cols, W0, effective_ridge(o, sys_b.rows, d))
    best = min(scores, key=scores.get)
    W = torch.zeros_like(W0)
    W[:, cols] = full.solve(cols, W0, effective_ridge(replace(opts, ridge=best), full.rows, d)).T
    keep_cols = torch.zeros(W0.shape[1], dtype=torch.bool, device=W0.device)
    keep_cols[cols] = True
    out = never_worse(full, W, W0, keep_cols, res.loss_before)
    out.weight, out.kept = out.weight.reshape(problem.w0.shape).float(), res.kept
    return out, best
