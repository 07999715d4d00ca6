"""Plumbing shared by the baselines: their start, the SGD loop (BP, FitNet), the layer loop (ThiNet, CP).

Every baseline runs on the run skeleton of :mod:`crossdistill.run`, as
:func:`crossdistill.compress.compress` does: copies of the teacher on
``config.device``, the same image checks, the same structured/unstructured
plan, the same kept counts, physical channel removal with
:class:`ChannelRemover`, and the same :class:`CompressReport`. Unlike
``compress`` the plan holds only the layers that are actually pruned
(``plan_layers(run, pruned_only=True)``): no baseline re-fits a layer it does
not prune; the pruned layers and their kept counts are compress()'s, on every
architecture (concatenation consumers keep the slices compress keeps).
ThiNet and CP run the same per-layer step as compress
(:func:`crossdistill.run.refit_layers`) with their own selection.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import eval_mode
from ..config import CompressConfig
from ..data import augment
from ..errors import UserError
from ..mir import refine_step
from ..objectives import Term
from ..run import CompressReport, LayerRecord, LayerStep, Needs, Run, plan_layers, refit_layers
from ..run import finish as finish_run
from ..run import start as start_run
from ..solvers import GramSystem, LeastSquares, RowSystem, SolveResult, kept_columns, ridge_solve

__all__ = [
    "unit_select",
    "Run",
    "Needs",
    "resolve_configs",
    "start",
    "finish",
    "sgd_train",
    "check_train_params",
    "auto_pad",
    "ridge_solve",
    "ridge_lstsq",
    "feature_rows",
    "mse",
    "eval_loss",
    "stage_record",
    "normal_equations",
    "contribution_gram",
    "layerwise",
    "kept_columns",  # lives in solvers.py; re-exported for the old import path
]


def finish(run: Run, params: Any = None) -> tuple[nn.Module, CompressReport]:
    """:func:`crossdistill.run.finish` with ``refine="mir"`` after the baseline (:func:`crossdistill.mir.refine_step`,
    the same step compress() runs after a layer-wise method)."""
    return finish_run(run, params, refine_step)


def resolve_configs(
    config: CompressConfig | None, params: Any, params_cls: type, overrides: dict[str, Any]
) -> tuple[CompressConfig, Any]:
    """Copy ``config`` and ``params`` and apply keyword ``overrides``.

    A keyword that names a field of the baseline's own hyperparameter class
    goes there first (``iterations``, ``lr``, ``batch_size`` ... of BP mean BP's
    own, not the adam solver's); any other must be a :class:`CompressConfig` field.
    """
    cfg = copy.deepcopy(config) if config is not None else CompressConfig()
    hp = copy.deepcopy(params) if params is not None else params_cls()
    if not isinstance(hp, params_cls):
        raise UserError(f"params must be a {params_cls.__name__}, got {type(hp).__name__}")
    own = {f.name for f in fields(params_cls)}
    for k, v in overrides.items():
        if k in own:
            setattr(hp, k, v)
        elif hasattr(cfg, k):
            setattr(cfg, k, v)
        else:
            raise UserError(
                f"unknown setting {k!r}; {params_cls.__name__} takes {', '.join(sorted(own))}, "
                "other keywords must be CompressConfig fields"
            )
    cfg.validate()
    return cfg, hp


def start(
    name: str,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: CompressConfig,
    needs: Needs | None = None,
) -> Run:
    """The run skeleton's start, then the baselines' plan: the layers they prune, and only those."""
    run = start_run(name, teacher, images, labels, cfg, needs)
    plan_layers(run, pruned_only=True)
    return run


def auto_pad(images: torch.Tensor, pad: int | None) -> int:
    """Crop padding: as given, else data.py's choice (2 px up to 28x28 images, 4 px above)."""
    if pad is not None:
        if pad < 0:
            raise UserError(f"pad must be >= 0 pixels, got {pad}")
        return pad
    return 2 if max(images.shape[-2:]) <= 28 else 4


def sgd_train(
    run: Run,
    parameters: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    hp: Any,
    iterations: int,
    masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """SGD (momentum, weight decay) with a cosine lr over ``iterations`` steps on augmented few-shot batches.

    ``hp`` provides lr, momentum, weight_decay, batch_size, pad, seed and
    bn_mode ("train": BN uses batch statistics and updates its running
    statistics; "eval": statistics frozen, affine parameters still learn).
    Each step draws ``batch_size`` images without replacement (all of them
    when there are fewer: full batch), applies random crop + flip, and calls
    ``loss_fn(x, y)``. ``masks`` (layer name -> bool weight mask) are
    re-applied after every step so pruned weights stay exactly zero.
    """
    if iterations <= 0:
        return
    if hp.bn_mode == "train" and min(len(run.images), hp.batch_size) < 2:
        raise UserError("BN in train mode needs at least 2 images per step; pass more images or bn_mode='eval'")
    gen = torch.Generator().manual_seed(hp.seed)
    pad = auto_pad(run.images, hp.pad)
    opt = torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    n = len(run.images)
    layers = {name: run.student.get_submodule(name) for name in masks or {}}
    run.student.train(hp.bn_mode == "train")
    for _ in range(iterations):
        # batch: a random subset (or all images), then crop + flip
        idx = torch.randperm(n, generator=gen)[: hp.batch_size] if n > hp.batch_size else torch.arange(n)
        idx = idx.to(run.device)
        x = run.images[idx]
        if pad > 0:
            x = augment(x, pad, gen)
        y = run.labels[idx] if run.labels is not None else None
        # step, then put the pruned weights back to zero
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.mul_(masks[name])
    run.student.eval()


def check_train_params(hp: Any) -> None:
    if hp.bn_mode not in ("train", "eval"):
        raise UserError(f"bn_mode must be 'train' or 'eval', got {hp.bn_mode!r}")
    if hp.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {hp.batch_size}")
    if hp.lr <= 0 or not math.isfinite(hp.lr):
        raise UserError(f"lr must be a positive number, got {hp.lr}")


def ridge_lstsq(X: torch.Tensor, Y: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_B ||X B - Y||^2 + lam ||B - prior||^2, lam = ridge * mean diag(X'X); X (M, a), Y (M, b) -> (a, b)."""
    X, Y = X.double(), Y.double()
    return ridge_solve(X.T @ X, X.T @ Y, ridge, prior)


def feature_rows(f: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C); (N, C) unchanged: one row per pixel, one column per channel."""
    return f.movedim(1, -1).reshape(-1, f.shape[1])


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.double(), b.double()))


@torch.no_grad()
def eval_loss(model: nn.Module, fn: Callable[[], torch.Tensor]) -> float:
    """``fn()`` with the model in eval mode and no gradients (mode restored after)."""
    with eval_mode(model):
        return float(fn())


def stage_record(run: Run, name: str, loss_before: float, loss_after: float, seconds: float) -> LayerRecord:
    """A report record for a training stage: kept/total = nonzero/total weights of the pruned layers."""
    layers = [run.student.get_submodule(p.name) for p in run.plan]
    kept = sum(int((m.weight != 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return LayerRecord(name, kept, total, loss_before, loss_after, seconds)


def normal_equations(system: LeastSquares) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A'A, A'B)`` of a layer's least-squares system ``||A W' - B||^2``: (d, d) and (d, C_out), float64."""
    if isinstance(system, GramSystem):
        return system.G, system.C
    if isinstance(system, RowSystem):
        return system.A.T @ system.A, system.A.T @ system.B
    raise TypeError(f"unknown system {type(system).__name__}")


def contribution_gram(system: LeastSquares, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram of the per-input-channel contributions to a layer's output, and their product with the target.

    Channel c contributes ``Z_c = W[:, c] * h_c`` (its share of the layer's
    output, over every position and output channel). Returns ``G[c, e] =
    <Z_c, Z_e>`` (C, C) and ``b[c] = <Z_c, target>`` (C,), summed over all
    rows of ``system``: the statistics of ThiNet's and CP's channel selection,
    exact over the few images (no sampling).
    """
    AtA, AtB = normal_equations(system)
    c_out, c_in = w.shape[:2]
    kk = w[0, 0].numel() if w.dim() == 4 else 1
    Wf = w.double().reshape(c_out, -1)  # (C_out, d), d = C_in * kk
    G = (AtA * (Wf.T @ Wf)).view(c_in, kk, c_in, kk).sum((1, 3))  # (C, C)
    b = (AtB * Wf.T).view(c_in, kk, c_out).sum((1, 2))  # (C,)
    return G, b


def unit_select(
    select: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor],
    G: torch.Tensor,
    b: torch.Tensor,
    n_keep: int,
    fixed: torch.Tensor | None,
    ties: torch.Tensor | None,
) -> torch.Tensor:
    """``select(G, b, n_keep, fixed)`` (kept channel indices, from contribution statistics) over whole units
    when channels are tied (GhostNet twins share a producer filter): a unit contributes the sum of its
    channels (``P^T G P``, ``P^T b``), and the kept units give back their channels (sorted)."""
    if ties is None:
        return select(G, b, n_keep, fixed)
    ids, inv = ties.to(G.device).unique(return_inverse=True)
    P = torch.zeros(len(inv), len(ids), dtype=G.dtype, device=G.device)
    P[torch.arange(len(inv), device=G.device), inv] = 1.0
    fixed_u = None if fixed is None or len(fixed) == 0 else inv[fixed.to(G.device)].unique()
    n_fixed = 0 if fixed_u is None else int(P[:, fixed_u].sum())
    size = int(P.sum(0).max())
    n_units = (0 if fixed_u is None else len(fixed_u)) + max(1, (n_keep - n_fixed) // size)
    kept_u = select(P.T @ G @ P, P.T @ b, n_units, fixed_u)
    return torch.isin(inv, kept_u.to(inv.device)).nonzero().flatten()


def layerwise(
    run: Run,
    terms: list[Term],
    select: Callable[
        [LeastSquares, torch.Tensor, int, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
    ],
) -> None:
    """compress()'s per-layer step, for the baselines that reconstruct one pruned layer at a time (ThiNet, CP).

    For each planned layer, first to last (:func:`crossdistill.run.refit_layers`):
    capture the student's input h^S with the producer still at full width,
    build the layer's least-squares system for ``terms`` (teacher inputs h^T
    are captured once, up front, when a term uses them), let ``select(system,
    W0, n_keep, fixed)`` return the new weight (zeros outside the kept channels) and
    the kept input-channel indices (``fixed``: channels that must be kept, the
    concatenated slices of a concatenation consumer that cannot go; counted in ``n_keep``;
    ``ties``: unit id per channel, or None, for :func:`unit_select`),
    write it, remove the other channels,
    record the objective before/after. BN mode while capturing:
    ``config.bn_mode``, as in compress().
    """

    def solve(step: LayerStep) -> SolveResult:
        stats = step.stats()
        system = stats.system(step.problem.terms, step.problem.wT)
        stats.free()
        w0 = step.problem.w0
        loss_before = system.loss(w0)
        weight, kept = select(system, w0, step.problem.n_keep, step.problem.fixed, step.problem.ties)
        return SolveResult(weight, kept, loss_before, system.loss(weight))

    train_bn = run.cfg.bn_mode == "train"
    run.teacher.train(train_bn)
    run.student.train(train_bn)
    try:
        refit_layers(run, lambda _p: terms, solve)
    finally:
        run.teacher.eval()
        run.student.eval()
