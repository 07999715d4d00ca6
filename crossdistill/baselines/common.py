"""Plumbing shared by the baselines: setup, report, the SGD loop (BP, FitNet), the layer loop (ThiNet, CP).

Every baseline runs on the same footing as :func:`crossdistill.compress.compress`:
copies of the teacher on ``config.device``, the same image checks, the same
structured/unstructured plan (``make_plan`` with the config's prune / keep /
include / exclude / keep_overrides / include_linear), the same kept counts
(``keep_count``), physical channel removal with :class:`ChannelRemover`, and
the same :class:`CompressReport`. Unlike ``compress`` the plan holds only the
layers that are actually pruned (``refit_unpruned=False``): no baseline
re-fits a layer it does not prune.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture_input, capture_inputs
from ..compress import (
    CompressConfig,
    CompressReport,
    LayerRecord,
    check_images,
    measure_peak_memory_mb,
    recalibrate_bn,
    resolve_device,
)
from ..data import augment
from ..errors import UserError
from ..measure import count_flops
from ..objectives import Term
from ..plan import LayerPlan, keep_count, make_plan
from ..pruning import ChannelRemover, sparsity
from ..solvers import GramSystem, LayerStats, LeastSquares, RowSystem
from ..structure import layer_widths

__all__ = [
    "Run", "resolve_configs", "start", "finish", "sgd_train", "check_train_params", "auto_pad",
    "ridge_solve", "ridge_lstsq", "mse", "eval_loss", "stage_record", "normal_equations", "contribution_gram",
    "layerwise", "kept_columns",
]  # fmt: skip


@dataclass
class Run:
    """State of one baseline run: the copies, the few images, the plan and the records so far."""

    name: str
    cfg: CompressConfig
    device: torch.device
    teacher: nn.Module  # the run's own copy; eval mode (train mode only while capturing with bn_mode='train')
    student: nn.Module  # a deep copy of the teacher, pruned in place
    images: torch.Tensor  # (N, C, H, W) on device
    labels: torch.Tensor | None  # (N,) int64 on device
    example: torch.Tensor  # (1, C, H, W)
    plan: list[LayerPlan]  # pruned layers only, forward order
    remover: ChannelRemover | None  # structured only
    params_before: int
    flops_before: int
    t_start: float
    records: list[LayerRecord] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        return self.cfg.prune == "structured"


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


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise UserError("labels must be an integer tensor (N,) of class indices, e.g. few_shot(...).labels")
    if labels.shape != (n,):
        raise UserError(f"labels must have shape ({n},), one per image, got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"labels must lie in [0, {num_classes}) for this model; got {int(labels.min())}..{int(labels.max())} "
            "(unlabelled images carry -1: use a label-free baseline)"
        )
    return labels.long()


def start(
    name: str,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: CompressConfig,
    *,
    needs_labels: bool = False,
    structured_only: bool = False,
) -> Run:
    """Checks, copies, plan: everything before a baseline's own work."""
    t_start = time.perf_counter()
    if needs_labels and labels is None:
        raise UserError(
            f"baseline {name!r} trains with cross-entropy and needs labels: pass labels=(N,) class indices "
            "(e.g. few_shot(split, k).labels), or use a label-free baseline (l1, fskd, thinet, cp)"
        )
    if structured_only and cfg.prune != "structured":
        raise UserError(
            f"baseline {name!r} selects input channels and exists only for structured pruning; "
            "use prune='structured', or l1 / l1+bp / fitnet for unstructured pruning"
        )
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher = copy.deepcopy(teacher).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    images = images.to(device)
    check_images(teacher, images)
    if labels is not None:
        with torch.no_grad():
            num_classes = teacher(images[:1]).shape[-1]
        labels = _check_labels(labels, len(images), num_classes).to(device)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    example = images[:1]
    params_before = sum(p.numel() for p in student.parameters())
    flops_before = count_flops(student, example.shape[1:])
    remover = ChannelRemover(student, example) if cfg.prune == "structured" else None
    plan = make_plan(
        student, example, cfg.prune, cfg.keep, cfg.include, cfg.exclude, cfg.keep_overrides,
        cfg.include_linear, refit_unpruned=False, remover=remover,
    )  # fmt: skip
    # baselines prune whole layers only: not concatenation consumers (partly prunable) nor grouped convs
    grouped = lambda n: getattr(student.get_submodule(n), "groups", 1) != 1  # noqa: E731
    plan = [p for p in plan if p.keep is not None and p.channels is None and not grouped(p.name)]
    if not plan:
        raise UserError("no layer is pruned with this configuration; check keep, --include and --exclude")
    return Run(
        name, cfg, device, teacher, student, images, labels, example, plan, remover,
        params_before, flops_before, t_start,
    )  # fmt: skip


def finish(run: Run, hp: Any) -> tuple[nn.Module, CompressReport]:
    """Optional BN recalibration, then the same report compress() gives (``config["method"]`` = baseline)."""
    student = run.student
    if run.cfg.recalibrate_bn:
        recalibrate_bn(student, run.images, run.cfg.batch_size)
    student.eval()
    config = {**asdict(run.cfg), "method": run.name, "baseline": asdict(hp)}
    report = CompressReport(
        config=config,
        layers=run.records,
        params_before=run.params_before,
        params_after=sum(p.numel() for p in student.parameters()),
        flops_before=run.flops_before,
        flops_after=count_flops(student, run.example.shape[1:]),
        sparsity=sparsity(student, [p.name for p in run.plan]),
        seconds=time.perf_counter() - run.t_start,
        peak_memory_mb=measure_peak_memory_mb(run.device),
    )
    student.widths = layer_widths(student)  # type: ignore[attr-defined]
    return student, report


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


def ridge_solve(G: torch.Tensor, R: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``(G + lam I)^-1 (R + lam prior)`` with ``lam = ridge * mean diag(G)``: normal equations, float64."""
    G, R = G.double(), R.double()
    lam = ridge * float(G.diagonal().mean()) if len(G) else 0.0
    if prior is not None:
        R = R + lam * prior.double()
    A = G + lam * torch.eye(len(G), dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(R, L)
    return torch.linalg.lstsq(A, R).solution


def ridge_lstsq(X: torch.Tensor, Y: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_B ||X B - Y||^2 + lam ||B - prior||^2, lam = ridge * mean diag(X'X); X (M, a), Y (M, b) -> (a, b)."""
    X, Y = X.double(), Y.double()
    return ridge_solve(X.T @ X, X.T @ Y, ridge, prior)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.double(), b.double()))


@torch.no_grad()
def eval_loss(model: nn.Module, fn: Callable[[], torch.Tensor]) -> float:
    """``fn()`` with the model in eval mode and no gradients (mode restored after)."""
    was = model.training
    model.eval()
    try:
        return float(fn())
    finally:
        model.train(was)


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


def layerwise(
    run: Run,
    terms: list[Term],
    select: Callable[[LeastSquares, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """compress()'s loop, for the baselines that reconstruct one pruned layer at a time (ThiNet, CP).

    For each planned layer, first to last: capture the student's input h^S
    with the producer still at full width, build the layer's least-squares
    system for ``terms`` (teacher inputs h^T are captured once, up front, when
    a term uses them), let ``select(system, W0, n_keep)`` return the new weight
    (zeros outside the kept channels) and the kept input-channel indices,
    write it, remove the other channels, record the objective before/after.
    BN mode while capturing: ``config.bn_mode``, as in compress().
    """
    cfg = run.cfg
    names = [p.name for p in run.plan]
    uses_teacher = any(t.p != 0 or t.r != 0 for t in terms)
    train_bn = cfg.bn_mode == "train"
    run.teacher.train(train_bn)
    run.student.train(train_bn)
    try:
        hT_all = capture_inputs(run.teacher, names, run.images, cfg.batch_size) if uses_teacher else {}
        for p in run.plan:
            t0 = time.perf_counter()
            layer = run.student.get_submodule(p.name)
            wT = run.teacher.get_submodule(p.name).weight.detach()
            total = wT.shape[1]
            n_keep = keep_count(total, p.keep)
            hS = capture_input(run.student, p.name, run.images, cfg.batch_size)
            hT = hT_all.pop(p.name) if uses_teacher else hS
            stats = LayerStats(layer)
            for j in range(0, len(hS), cfg.batch_size):
                stats.add_batch(hT[j : j + cfg.batch_size], hS[j : j + cfg.batch_size])
            del hS, hT
            system = stats.system(terms, wT)
            w0 = layer.weight.detach().clone()
            loss_before = system.loss(w0)
            weight, kept = select(system, w0, n_keep)
            loss_after = system.loss(weight)
            stats.free()
            del system
            with torch.no_grad():
                layer.weight.copy_(weight.to(layer.weight.dtype).view_as(layer.weight))
            run.remover.remove_input_channels(p.name, kept)
            run.records.append(LayerRecord(p.name, n_keep, total, loss_before, loss_after, time.perf_counter() - t0))
    finally:
        run.teacher.eval()
        run.student.eval()


def kept_columns(kept: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Column indices of ``w.flatten(1)`` that belong to the kept input channels."""
    kk = w[0, 0].numel() if w.dim() == 4 else 1
    return (kept[:, None] * kk + torch.arange(kk, device=kept.device)).flatten()
