"""FitNet (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015) as a few-shot baseline of Bai et al. (AAAI 2020): hint training, then knowledge
distillation (Hinton, Vinyals, Dean 2015), both on the few labelled samples.

Stage 1 (hints): the student's features at the hint points are mapped by a
regressor onto the teacher's features at the same points and the mean
squared error is minimised, training the student's layers up to the last
hint point together with the regressors. Stage 2 (KD): the whole student is
trained on ``alpha * T^2 * KL(p_T^(T) || p_S^(T)) + (1 - alpha) * CE(labels)``.
The regressors are thrown away afterwards; the student keeps the pruned
architecture.

Choices the papers leave open (Romero et al. use one hint in the middle of a
thin, deeper student trained from scratch on a full data set):

- Start: the L1-norm student (:mod:`crossdistill.baselines.l1`), so the
  architecture equals ``compress``'s.
- Hint points: the output of every stage — ``layer1``, ``layer2``, ... for
  ResNets, the activation before each max-pool and the last one of
  ``features`` for VGG-style / LeNet models — or ``hints=[module names]``.
  The hint loss is the sum over points of each point's mean squared error.
- Regressor: a 1x1 conv (Linear for flat features) with bias. Where the
  widths agree (ResNet stage outputs, which structured pruning never
  narrows; every point under unstructured pruning) it starts as the
  identity; where they differ (VGG stage outputs are pruned) it starts at the
  ridge least-squares fit of teacher features on student features over the
  few samples (FitNet starts from random; a closed-form start avoids a
  random-projection transient on so few images).
- Stage 2: temperature T = 4, alpha = 0.9 (KD weight); teacher logits on the
  same augmented batch, teacher in eval mode.
- Optimiser (both stages): SGD, momentum 0.9, weight decay 5e-4, lr 1e-4
  cosine-decayed per stage; 100 hint steps, 200 KD steps; full batch when
  N <= 128; random crop + flip (:func:`crossdistill.data.augment`, 2 px
  padding up to 28x28, else 4 px).
- BN (few images): ``bn_mode="recalibrate"`` (default): the L1 student's
  statistics are re-estimated once on ``recal_views`` augmented views of
  each image, then frozen for both stages (eval mode; affine parameters
  still learn); ``"eval"`` keeps the teacher's; ``"train"`` uses batch
  statistics (it collapsed on VGG-16: K=1 40.8 vs NC 75.6, since batch
  statistics of 10 images are noise and drift the running statistics).
  Mode and lr chosen on a train-split validation set disjoint from the
  few-shot draw (``benchmarks/sweep_hparams.py --baselines``; VGG-16, K=1,
  seed 0, 1000 validation images: train/0.01 43.1 %, recalibrate/1e-4
  69.8 %, recalibrate/1e-3 and eval/any 10 %: with frozen statistics the
  hint loss on raw VGG activations diverges at larger lr; ResNet-20, K=1,
  seed 0: recalibrate/1e-3 89.6 %, train/0.01 88.7 %, recalibrate/1e-4
  87.4 %: residual networks can take ``lr=1e-3``, the default is the one
  that is safe for both families); see
  :func:`crossdistill.baselines.bp.prepare_bn`.
- Unstructured: L1 masks fixed, pruned weights re-zeroed after every step.
- Report: two extra records, ``"<fitnet: hints>"`` and ``"<fitnet: kd>"``,
  with each stage's loss on the un-augmented few samples (eval mode) before
  and after the stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import layer_outputs
from ..config import CompressConfig
from ..errors import UserError
from ..models import model_family
from ..run import CompressReport
from .bp import check_bp_params, prepare_bn
from .common import (
    Needs,
    eval_loss,
    feature_rows,
    finish,
    resolve_configs,
    ridge_lstsq,
    sgd_train,
    stage_record,
    start,
)
from .l1 import prune_l1

__all__ = ["FitNetConfig", "fitnet", "fitnet_defaults", "hint_points", "kd_loss", "make_regressor"]


@dataclass
class FitNetConfig:
    hints: list[str] | None = None  # module names whose outputs are hinted; None: every stage output
    hint_iterations: int = 100  # stage 1 SGD steps
    kd_iterations: int = 200  # stage 2 SGD steps
    temperature: float = 4.0  # KD softmax temperature T
    alpha: float = 0.9  # KD weight; (1 - alpha) on cross-entropy with the labels
    regressor_ridge: float = 1e-3  # least-squares start of a width-changing regressor (x mean diag of the Gram)
    lr: float = 1e-4  # initial lr of each stage, cosine-decayed to 0 (validation; 1e-3 diverges, frozen BN)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128  # images per step
    pad: int | None = None  # crop padding in px; None: 2 up to 28x28 images, 4 above; 0: no augmentation
    bn_mode: str = "recalibrate"  # recalibrate (statistics of the few images, then frozen) | eval | train
    recal_views: int = 16  # recalibrate: augmented views per image the statistics are estimated on
    seed: int = 0


# lr per model family (crossdistill.models.model_family), chosen on validation: see fitnet_defaults
_FITNET_LR = {"residual": 1e-4, "plain": 1e-4}


def fitnet_defaults(model: nn.Module) -> FitNetConfig:
    """FitNetConfig for ``model``'s family (the lr; everything else as the dataclass). Validation, K=1,
    seed 0 (benchmarks/sweep_hparams.py --baselines): ResNet-56 recalibrate/1e-4 90.4 %, /1e-3 89.3 %;
    VGG-16 recalibrate/1e-4 69.8 %, /1e-3 10 % (diverges); only ResNet-20 prefers 1e-3 (89.6 vs
    87.4 %), so both families keep 1e-4 (the grid's ResNet is ResNet-56)."""
    return FitNetConfig(lr=_FITNET_LR[model_family(model)])


def hint_points(model: nn.Module) -> list[str]:
    """Default hint points: stage outputs (``layer1..4``), else the activation before each max-pool of
    ``features`` plus its last module."""
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(model, n, None), nn.Module)]
    if stages:
        return stages
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential) and len(feats):
        mods = list(feats)
        points = [f"features.{i - 1}" for i, m in enumerate(mods) if isinstance(m, nn.MaxPool2d) and i > 0]
        if not isinstance(mods[-1], nn.MaxPool2d):
            points.append(f"features.{len(mods) - 1}")
        return points
    raise UserError("no default FitNet hint points for this model; pass hints=[module names] (e.g. stage outputs)")


def _features(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    store = layer_outputs(model, names, x)
    missing = [n for n in names if n not in store]
    if missing:
        raise UserError(f"hint points {missing} were not called by the forward pass; choose other modules")
    return [store[n] for n in names]


def make_regressor(fs: torch.Tensor, ft: torch.Tensor, ridge: float) -> nn.Module:
    """1x1 conv (Linear for flat features) from student width to teacher width.

    Identity when the widths agree, else the ridge least-squares fit of ``ft`` on ``fs`` (with bias).
    """
    cs, ct = fs.shape[1], ft.shape[1]
    if fs.shape[2:] != ft.shape[2:]:
        raise UserError(f"hint features differ in spatial size ({tuple(fs.shape)} vs {tuple(ft.shape)})")
    reg: nn.Module = nn.Conv2d(cs, ct, 1) if fs.dim() == 4 else nn.Linear(cs, ct)
    with torch.no_grad():
        if cs == ct:
            reg.weight.copy_(torch.eye(cs).view_as(reg.weight))
            reg.bias.zero_()
        else:
            X = feature_rows(fs)
            X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)  # (M, cs + 1)
            B = ridge_lstsq(X, feature_rows(ft), ridge).float()  # (cs + 1, ct)
            reg.weight.copy_(B[:cs].T.reshape(reg.weight.shape))
            reg.bias.copy_(B[cs])
    return reg.to(fs.device)


def kd_loss(s_logits, t_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """Hinton KD: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)."""
    kl = F.kl_div(
        F.log_softmax(s_logits / temperature, 1),
        F.log_softmax(t_logits / temperature, 1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s_logits, labels)


def fitnet(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: FitNetConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """L1-norm pruning, then FitNet hint training and KD on the few labelled samples."""
    cfg, hp = resolve_configs(
        config, params if params is not None else fitnet_defaults(teacher), FitNetConfig, overrides
    )
    check_bp_params(hp)
    if not 0.0 <= hp.alpha <= 1.0 or hp.temperature <= 0:
        raise UserError(f"alpha must lie in [0, 1] and temperature be > 0, got {hp.alpha}, {hp.temperature}")
    run = start("fitnet", teacher, images, labels, cfg, Needs(labels=True))
    kept = prune_l1(run)
    train_hp = prepare_bn(run, hp)
    masks = None if run.structured else kept
    student, teacher = run.student, run.teacher
    names = hp.hints if hp.hints is not None else hint_points(student)
    for n in names:
        try:
            student.get_submodule(n)
        except AttributeError as e:
            raise UserError(f"hint point {n!r} is not a module of the model") from e

    # stage 1: hints; regressors start at identity / least squares on the un-augmented images
    t0 = time.perf_counter()
    with torch.no_grad():
        student.eval()
        fs0, ft0 = _features(student, names, run.images), _features(teacher, names, run.images)
        regressors = nn.ModuleList(make_regressor(s, t, hp.regressor_ridge) for s, t in zip(fs0, ft0, strict=True))
        del fs0, ft0

    def hint_loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ft = _features(teacher, names, x)
        fs = _features(student, names, x)
        return sum(F.mse_loss(r(s), t) for r, s, t in zip(regressors, fs, ft, strict=True))

    before = eval_loss(student, lambda: hint_loss(run.images))
    params_1 = list(student.parameters()) + list(regressors.parameters())
    sgd_train(run, params_1, lambda x, _y: hint_loss(x), train_hp, hp.hint_iterations, masks)
    after = eval_loss(student, lambda: hint_loss(run.images))
    run.records.append(stage_record(run, "<fitnet: hints>", before, after, time.perf_counter() - t0))

    # stage 2: knowledge distillation from the teacher's logits plus cross-entropy
    t0 = time.perf_counter()

    def kd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(x)
        return kd_loss(student(x), t_logits, y, hp.temperature, hp.alpha)

    before = eval_loss(student, lambda: kd(run.images, run.labels))
    sgd_train(run, list(student.parameters()), kd, train_hp, hp.kd_iterations, masks)
    after = eval_loss(student, lambda: kd(run.images, run.labels))
    run.records.append(stage_record(run, "<fitnet: kd>", before, after, time.perf_counter() - t0))
    return finish(run, hp)
