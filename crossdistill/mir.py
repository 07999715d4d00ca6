"""MiR: holistic, label-free refinement of a pruned student (Wang, Liu, Ma, Yong, Chai, Wu,
"Compressing Models with Few Samples: Mimicking then Replacing", CVPR 2022).

The pruned student is trained end to end, without labels, so that its
features at one *feature point* (before the final pooling) match the
teacher's; the classifier head after that point stays the teacher's (it is
never trained: the forward stops at the feature point). Used two ways:

- method ``mir`` (``run_method("mir", ...)``, CLI ``--method mir``): the
  L1-norm student (:mod:`crossdistill.baselines.l1`, same plan and kept
  counts as every other method), then :func:`mir_refine` — the paper's recipe;
- ``refine="mir"`` (CLI ``--refine mir``): :func:`mir_refine` after a
  layer-wise method (nc / ours / ours-s, or a baseline through run_method):
  the exact layer-wise solve as a start, holistic mimicking after it.

Paper / official code (the ``Practise`` repository, ``finetune.py``, which
implements MiR) and where we differ, all in :class:`MirConfig`:

===================  ==================================  ==========================================
setting              paper / official                    here (default)
===================  ==================================  ==========================================
start                L1-norm pruned weights              same (method ``mir``); any student (refine)
feature point        ResNet: before global avg pooling   same; VGG: input of the global pool; an
                                                         unknown model: see :func:`feature_point`
loss                 MSE (mean) on those features        same
head                 teacher's classifier, frozen        same (never reached by the forward)
optimizer            SGD, momentum 0.9, wd 1e-4          Adam, no weight decay
lr / schedule        0.02, x0.1 after 40% of the steps   per model family (method_defaults,
                                                         refine_defaults); 1e-4 or less; constant
steps / batch        2000 iterations, batch 64           per family: 300-600; batch 64
                                                         (full batch below 64 images)
augmentation         RandomResizedCrop(224) + flip       random crop (zero pad 2 px up to 28x28,
                                                         4 px above) + horizontal flip
BN                   train mode (batch statistics)       eval mode (running statistics frozen)
images               50-1000+ ImageNet images            K = 1..10 per class (10-100 images)
===================  ==================================  ==========================================

Why the differences: with 10-50 small images, SGD at 0.02 from a student
that is already close (a layer-wise solve) moves it away before it helps,
and a few hundred Adam steps at 1e-4 are enough on CPU-sized budgets (the
issue's quick test: NC 88.5 -> 89.1 on ResNet-20 K=1, L1 11.0 -> 90.6 at
K=5). BN in eval mode: batch statistics of 10 augmented images are noisy
and differ from the teacher's running statistics, under which the teacher's
target features were computed and the student is evaluated; in train mode
the running statistics would also drift to those few images (momentum 0.1
over hundreds of steps forgets the teacher's). Eval mode keeps the
teacher's statistics and still trains the BN affine parameters.
``bn_mode="train"`` gives the paper's behaviour; ``recalibrate_bn=True``
re-estimates the statistics once on augmented views of the images first.
The lr / steps of both uses were chosen per model family (residual / plain
chain, :func:`crossdistill.models.model_family`) on validation images of the
training split (``benchmarks/sweep_hparams.py``; :func:`method_defaults`,
:func:`refine_defaults`).

Validation (never test images): ``holdout_folds >= 2`` chooses the number
of steps on held-out few-shot images — fold j holds out the j-th image of
every class (rotated over the folds; with no labels, a seeded 1/folds of
the images), trains on the rest while recording the held-out feature loss
every ``eval_every`` steps, and the step with the lowest mean held-out loss
is then used to train on all images (at K = 1 nothing can be held out:
the fixed ``steps`` are used, chosen by ``benchmarks/sweep_hparams.py``). Given ``val_images``, training keeps
the weights with the lowest feature loss on them (early stopping).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import eval_mode, removing
from .data import augment
from .errors import UserError
from .models import model_family
from .run import Run, recalibrate_bn

__all__ = [
    "MirConfig",
    "MirExtras",
    "mir_refine",
    "feature_point",
    "features_at",
    "holdout_folds",
    "zero_masks",
    "method_defaults",
    "refine_defaults",
    "refine_step",
]

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


@dataclass
class MirConfig:
    steps: int = 300  # training steps (one batch each); with holdout_folds >= 2: the most tried
    lr: float = 1e-4  # initial learning rate
    optimizer: str = "adam"  # adam | sgd (paper: SGD, momentum 0.9, lr 0.02, wd 1e-4)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # L2 on every trained parameter (paper 1e-4)
    schedule: str = "constant"  # constant | cosine (to 0) | step (x0.1 after 40% of the steps, paper)
    batch_size: int = 64  # images per step; all of them when fewer (paper 64)
    augment: bool = True  # random crop (zero padding) + horizontal flip on every batch
    pad: int | None = None  # crop padding in px; None: 2 up to 28x28 images, 4 above
    bn_mode: str = "eval"  # eval (frozen running statistics, affine parameters train) | train (paper)
    recalibrate_bn: bool = False  # first re-estimate BN statistics on recal_views augmented views per image
    recal_views: int = 16  # recalibrate_bn: views per image (the image itself + crops/flips)
    feature_layer: str | None = None  # module whose *input* is mimicked; None: see feature_point()
    eval_every: int = 25  # steps between held-out / validation losses
    holdout_folds: int = 0  # >= 2: choose the number of steps on held-out few-shot images (K >= 2)
    restore_best: bool = True  # with val_images: keep the weights of the lowest validation loss
    seed: int = 0  # batches and augmentation

    def validate(self) -> None:
        if self.steps < 0:
            raise UserError(f"mir steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"mir lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"mir optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise UserError(f"mir schedule must be 'constant', 'cosine' or 'step', got {self.schedule!r}")
        if self.bn_mode not in ("eval", "train"):
            raise UserError(f"mir bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if self.batch_size < 1 or self.eval_every < 1:
            raise UserError("mir batch_size and eval_every must be >= 1")
        if self.holdout_folds == 1 or self.holdout_folds < 0:
            raise UserError(f"mir holdout_folds must be 0 (off) or >= 2, got {self.holdout_folds}")
        if self.recal_views < 1:
            raise UserError(f"mir recal_views must be >= 1, got {self.recal_views}")
        if self.pad is not None and self.pad < 0:
            raise UserError(f"mir pad must be >= 0 pixels, got {self.pad}")


# Settings per model family (crossdistill.models.model_family), chosen on validation images of the
# training split (benchmarks/sweep_hparams.py; numbers in method_defaults / refine_defaults)
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "residual": {"lr": 1e-4, "steps": 600},
    "plain": {"lr": 1e-4, "steps": 200},
}
_REFINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "residual": {"lr": 1e-4, "steps": 300},
    "plain": {"lr": 1e-4, "steps": 300},
}


def _family(model: nn.Module | None) -> str:
    return "residual" if model is None else model_family(model)


def method_defaults(model: nn.Module | None = None) -> MirConfig:
    """Settings of method ``mir`` (L1 start) for ``model``'s family (None: residual).

    The student starts far from the teacher (about 11 % on Fashion-MNIST), so BN statistics are
    re-estimated on the few images first (the paper trains in BN train mode, which does this
    implicitly), and it needs more steps than refining a layer-wise solution.
    Chosen on validation images (benchmarks/sweep_hparams.py, results/sweep_hparams_fashion-mnist.md,
    1000 train-split images disjoint from the draw; never test). Residual (ResNet-56, K=1, seeds 0/1):
    lr 1e-4 reaches 91.0 % after 100 steps and 91.95 % (mean) after 600, lr 3e-4 91.0 % (seed 0),
    lr 1e-3 collapses (10 % after 100 steps, 57 % after 600: the ResNet-20-tuned 1e-3 / 400 gave
    47.5 +- 21 % on ResNet-56 test); on ResNet-20, without BN re-estimation, 1e-3 beat 1e-4 (89.7 vs
    87.6 % at 400 steps). Plain (VGG-16, K=1, seed 0): lr 1e-4 takes the re-estimated start from
    56.8 to 67.0 % after 100 steps and 68.7 % after 200, then stays flat (67.7 % after 600); lr 1e-3
    collapses it (16 % after 50 steps, 47 % after 300)."""
    return MirConfig(recalibrate_bn=True, **_METHOD_DEFAULTS[_family(model)])


def refine_defaults(model: nn.Module | None = None) -> MirConfig:
    """Settings of ``refine="mir"`` (after a layer-wise method) for ``model``'s family (None: residual).

    The start is already close to the teacher: a small lr, BN statistics kept. Validation images
    (benchmarks/sweep_hparams.py), K=1: ResNet-20 NC+MiR lr 1e-4 89.3 % after 300 steps (NC 88.7);
    ResNet-56 (seed 0) lr 1e-4 stays at NC's 91.0 % (90.6-91.0 over 400 steps), 3e-4 ends at 90.2;
    VGG-16 (seed 0) lr 1e-4 lowers NC's 78.3 % to 75.4 after 300 steps (a smaller lr was not yet
    validated: the refinement gains nothing on plain chains with these settings)."""
    return MirConfig(**_REFINE_DEFAULTS[_family(model)])


def refine_step(run: Run) -> dict[str, Any] | None:
    """``refine="mir"`` on a finished run (nc / ours / ours-s or a baseline; :func:`crossdistill.run.finish`
    calls it after the BN recalibration): :func:`mir_refine` of ``run.student`` with ``run.cfg.mir``
    (None: :func:`refine_defaults` of the teacher's family), unstructured zeros kept. Returns its info,
    or None when the run asks for no refinement (method ``mir`` is the refinement already)."""
    if run.cfg.refine != "mir" or run.name == "mir":
        return None
    masks = None if run.structured else zero_masks(run.student, [p.name for p in run.plan])
    params = run.cfg.mir if run.cfg.mir is not None else refine_defaults(run.teacher)
    run.student, info = mir_refine(run.student, run.teacher.eval(), run.images, params, masks=masks)
    return info


# --------------------------------------------------------------------------- feature point


class _Stop(Exception):
    """Raised by the feature hook to end the forward at the feature point."""


def _known(model: nn.Module) -> bool:
    from .models import VGG, LeNet5, ResNet  # late: models is heavy and independent

    return isinstance(model, (ResNet, VGG, LeNet5))


def feature_point(model: nn.Module, example: torch.Tensor, name: str | None = None) -> str:
    """The module whose input is mimicked: ``name`` if given; ``"pool"`` (the global pooling before
    the classifier) for the registry ResNets / VGG / LeNet-5; for any other model the input of the
    last Linear called by the forward — or, when a pooling module runs right before that Linear
    (after the last conv), the input of that pooling (features before the final pooling, as MiR)."""
    if name is not None:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"feature layer {name!r} is not a module of the model; pass a name from model.named_modules()"
            ) from None
        return name
    if _known(model):
        return "pool"
    from .capture import forward_order

    order = forward_order(model, example, (nn.Conv2d, nn.Linear, *_POOLS))
    linears = [i for i, n in enumerate(order) if isinstance(model.get_submodule(n), nn.Linear)]
    if not linears:
        raise UserError("the model has no Linear layer to find its features; pass feature_layer='module name'")
    last = linears[-1]
    if last > 0 and isinstance(model.get_submodule(order[last - 1]), _POOLS):
        return order[last - 1]
    return order[last]


def features_at(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Input of module ``name`` on ``x`` (with its autograd graph); the forward stops there."""
    store: list[torch.Tensor] = []

    def hook(_m, inputs):
        store.append(inputs[0])
        raise _Stop

    with removing([model.get_submodule(name).register_forward_pre_hook(hook)]):
        try:
            model(x)
        except _Stop:
            pass
    if len(store) != 1:
        raise UserError(f"feature layer {name!r} was not called by the forward pass; choose another module")
    return store[0]


@torch.no_grad()
def _loss(student: nn.Module, teacher: nn.Module, name: str, images: torch.Tensor, batch_size: int) -> float:
    """Mean squared feature error over ``images`` (un-augmented, both networks in eval mode)."""
    total, count = 0.0, 0
    with eval_mode(student):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            fs, ft = features_at(student, name, x), features_at(teacher, name, x)
            total += float(F.mse_loss(fs.double(), ft.double(), reduction="sum"))
            count += ft.numel()
    return total / max(count, 1)


# --------------------------------------------------------------------------- masks and folds


def zero_masks(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks of the non-zero weights of the Conv2d / Linear layers named (all holding zeros if
    None): unstructured sparsity that training must keep (weights re-zeroed after every step)."""
    masks = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (names is None or n in names):
            mask = m.weight.detach() != 0
            if names is not None or not bool(mask.all()):
                masks[n] = mask
    return masks


def holdout_folds(n: int, folds: int, labels: torch.Tensor | None = None, seed: int = 0) -> list[tuple]:
    """``folds`` pairs (train indices, held-out indices) of ``n`` images.

    With ``labels``: fold j holds out the j-th image of every class (rotation),
    so every class keeps its other K-1 images; needs K >= 2 per class and uses
    at most K folds. Without labels: a seeded permutation cut in ``folds`` parts.
    """
    if labels is not None and bool((labels >= 0).all()):
        per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
        k = min(len(idx) for idx in per_class)
        if k < 2:
            raise UserError(
                "holding out one image per class needs K >= 2 images per class; "
                "at K = 1 use a fixed number of steps (holdout_folds=0)"
            )
        held = [torch.stack([idx[j] for idx in per_class]) for j in range(min(folds, k))]
    else:
        if n < 2:
            raise UserError("holding out images needs at least 2 images; use holdout_folds=0")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held = [perm[j::folds] for j in range(min(folds, n))]
    out = []
    for h in held:
        keep = torch.ones(n, dtype=torch.bool)
        keep[h] = False
        out.append((keep.nonzero().flatten(), h.sort().values))
    return out


def _folds(n: int, cfg: MirConfig, labels: torch.Tensor | None) -> list[tuple]:
    """holdout_folds(), or none at K = 1 (a fixed number of steps then: nothing can be held out)."""
    if labels is not None and bool((labels >= 0).all()):
        if int(torch.unique(labels, return_counts=True)[1].min()) < 2:
            return []
    elif n < 2:
        return []
    return holdout_folds(n, cfg.holdout_folds, labels, cfg.seed)


# --------------------------------------------------------------------------- training


def _recalibrate(student: nn.Module, images: torch.Tensor, cfg: MirConfig) -> None:

    gen = torch.Generator().manual_seed(cfg.seed)
    pad = cfg.pad if cfg.pad is not None else (2 if max(images.shape[-2:]) <= 28 else 4)
    views = [images] + [augment(images, pad, gen) for _ in range(cfg.recal_views - 1)]
    recalibrate_bn(student, torch.cat(views), cfg.batch_size)


@dataclass
class _Pair:
    """The student trained in place, its teacher, the feature point compared, and the weight masks kept."""

    student: nn.Module
    teacher: nn.Module
    name: str
    masks: dict[str, torch.Tensor] | None


def _train(
    pair: _Pair,
    images: torch.Tensor,
    cfg: MirConfig,
    steps: int,
    val_images: torch.Tensor | None,
    on_eval: Callable[[int, nn.Module], None] | None = None,
) -> list[tuple[int, float]]:
    """``steps`` steps of feature mimicking on ``pair.student`` in place; the validation curve [(step, loss)]."""
    student, teacher, name, masks = pair.student, pair.teacher, pair.name, pair.masks
    curve = [(0, _loss(student, teacher, name, val_images, cfg.batch_size))] if val_images is not None else []
    if on_eval is not None:
        on_eval(0, student)
    best = (curve[0][1], copy.deepcopy(student.state_dict())) if curve and cfg.restore_best else None
    if steps == 0:
        return curve
    if cfg.bn_mode == "train" and min(len(images), cfg.batch_size) < 2:
        raise UserError("mir with BN in train mode needs at least 2 images per step; use bn_mode='eval'")
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, max(1, int(0.4 * steps)), gamma=0.1)
    else:
        sched = None
    gen = torch.Generator().manual_seed(cfg.seed)
    pad = cfg.pad if cfg.pad is not None else (2 if max(images.shape[-2:]) <= 28 else 4)
    layers = {n: student.get_submodule(n) for n in masks or {}}
    n = len(images)
    student.train(cfg.bn_mode == "train")
    try:
        for step in range(1, steps + 1):
            # batch: a random subset (or all images), then crop + flip
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size] if n > cfg.batch_size else torch.arange(n)
            x = images[idx.to(images.device)]
            if cfg.augment:
                x = augment(x, pad, gen)
            with torch.no_grad():
                ft = features_at(teacher, name, x)
            loss = F.mse_loss(features_at(student, name, x), ft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():  # unstructured: pruned weights stay exactly zero
                for ln, layer in layers.items():
                    layer.weight.mul_(masks[ln])
            if val_images is not None and (step % cfg.eval_every == 0 or step == steps):
                curve.append((step, _loss(student, teacher, name, val_images, cfg.batch_size)))
                if best is not None and curve[-1][1] < best[0]:
                    best = (curve[-1][1], copy.deepcopy(student.state_dict()))
            if on_eval is not None and (step % cfg.eval_every == 0 or step == steps):
                student.eval()
                on_eval(step, student)
                student.train(cfg.bn_mode == "train")
    finally:
        student.eval()
    if best is not None:
        student.load_state_dict(best[1])
    return curve


@dataclass
class MirExtras:
    """Optional inputs of :func:`mir_refine` beyond the few images."""

    labels: torch.Tensor | None = None  # (N,) class of each few-shot image: holdout_folds leave one per class out
    val_images: torch.Tensor | None = None  # held-out images: validation curve, early stopping (restore_best)
    on_eval: Callable[[int, nn.Module], None] | None = None  # at step 0 and every eval_every steps (eval mode)


def mir_refine(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    config: MirConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    extras: MirExtras | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of the pruned ``student`` end to end so its features match ``teacher``'s.

    ``images``: the few (N, C, H, W) images, normalised; no labels needed
    (``extras.labels`` only group images by class for ``holdout_folds``;
    ``extras.val_images``: held-out images for early stopping; ``extras.on_eval(step, student)``
    is called at step 0 and every ``eval_every`` steps of the final training, e.g. to record a
    validation accuracy). ``masks``: layer name -> boolean weight mask kept during training
    (unstructured students; see :func:`zero_masks`). Keyword ``overrides``
    set :class:`MirConfig` fields. Only the student's parameters before the
    feature point train; the teacher and the input student are left untouched.

    Returns ``(student, info)``; ``info`` holds the feature layer, steps run
    (and chosen), the feature loss on ``images`` before/after, the
    validation losses and the seconds taken.
    """
    cfg = copy.deepcopy(config) if config is not None else MirConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"unknown mir setting {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    extras = extras or MirExtras()
    labels, val_images, on_eval = extras.labels, extras.val_images, extras.on_eval
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    images = images.to(device)
    was_teacher = teacher.training
    teacher.eval()
    student = copy.deepcopy(student).eval()
    if cfg.recalibrate_bn:  # e.g. an L1 start: the teacher's statistics no longer fit the pruned student
        _recalibrate(student, images, cfg)
    try:
        name = feature_point(teacher, images[:1], cfg.feature_layer)
        with torch.no_grad():
            fs, ft = features_at(student, name, images[:1]), features_at(teacher, name, images[:1])
        if fs.shape != ft.shape:
            raise UserError(
                f"student features at {name!r} have shape {tuple(fs.shape[1:])} but the teacher's "
                f"{tuple(ft.shape[1:])}; pruning changed the feature point: pass feature_layer= a module "
                "whose input keeps its width (e.g. the global pool, or leave Linear layers unpruned)"
            )
        info: dict[str, Any] = {"feature_layer": name, "config": asdict(cfg)}
        info["loss_before"] = _loss(student, teacher, name, images, cfg.batch_size)
        steps = cfg.steps
        folds = _folds(len(images), cfg, labels) if cfg.holdout_folds >= 2 and val_images is None else []
        if not folds and cfg.holdout_folds >= 2:
            info["holdout"] = {"skipped": "validation images given" if val_images is not None else "K = 1"}
        if folds:
            # choose the number of steps on held-out few-shot images, then train on all of them
            curves = []
            for train_idx, held in folds:
                trial = copy.deepcopy(student)
                tcfg = replace(cfg, restore_best=False)
                curves.append(_train(_Pair(trial, teacher, name, masks), images[train_idx], tcfg, steps, images[held]))
            mean = [(s, sum(c[i][1] for c in curves) / len(curves)) for i, (s, _) in enumerate(curves[0])]
            steps = min(mean, key=lambda sl: sl[1])[0]
            info["holdout"] = {"folds": len(curves), "curve": mean, "steps_chosen": steps}
        curve = _train(_Pair(student, teacher, name, masks), images, cfg, steps, val_images, on_eval)
        if val_images is not None:
            best = min(curve, key=lambda sl: sl[1])
            info["validation"] = {
                "curve": curve,
                "best_step": best[0],
                "best_loss": best[1],
                "restored": cfg.restore_best,
            }
        info["steps_run"] = steps
        info["loss_after"] = _loss(student, teacher, name, images, cfg.batch_size)
    finally:
        teacher.train(was_teacher)
    info["seconds"] = time.perf_counter() - t0
    return student, info
