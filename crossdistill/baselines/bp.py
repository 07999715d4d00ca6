"""L1-norm + BP: the L1-norm student fine-tuned end-to-end with cross-entropy on the few labelled
samples (the "BP" baseline of Bai et al., AAAI 2020; pruning as Li et al., ICLR 2017).

Bai et al. state only that BP back-propagates the cross-entropy through the
pruned network on the few samples. Choices made here (all in :class:`BPConfig`):

- Start: the L1-norm student of :mod:`crossdistill.baselines.l1` (same plan
  and kept counts as ``compress``).
- Optimiser: SGD, momentum 0.9, weight decay 5e-4 (on every parameter),
  lr 1e-4 with a cosine decay to 0 over ``iterations`` = 200 steps;
  full batch when N <= ``batch_size`` (128), else random batches of 128.
  200 full-batch steps on K = 1..10 images per class is long enough to fit
  the few samples (the point of the baseline: it overfits).
- Augmentation: random crop with zero padding and horizontal flip
  (:func:`crossdistill.data.augment`), padding 2 px up to 28x28, else 4 px
  (data.py's choice for teacher training); ``pad=0`` turns it off.
- BN (few images): ``bn_mode="recalibrate"`` (default) re-estimates the
  running statistics once on ``recal_views`` augmented views of each image
  (the L1 student's activations no longer match the teacher's statistics),
  then trains with those statistics frozen (eval mode; the affine parameters
  still learn). ``"eval"`` keeps the teacher's statistics frozen;
  ``"train"`` is ordinary fine-tuning (batch statistics, running statistics
  drift to the few samples). Train mode collapsed on VGG-16 (K=1: 45.3 vs
  NC 75.6): batch statistics of 10 images are noise, and the student is
  evaluated with running statistics it never trained under. The mode and
  the lr were chosen on a train-split validation set, disjoint from the
  few-shot draw (``benchmarks/sweep_hparams.py --baselines``; VGG-16, K=1,
  seed 0, 1000 validation images: train/0.01 47.8 %, recalibrate/1e-4
  65.7 %, recalibrate/1e-3 23.6 %, eval/1e-4 10.0 %; recalibration alone
  57 %; ResNet-20: recalibrate/1e-4 83.4 %, recalibrate/1e-3 81.4 %,
  train/0.01 78.9 %). With frozen statistics a pruned VGG is badly
  conditioned: a large lr destroys what recalibration restored.
- Unstructured: the L1 masks stay fixed; pruned weights are set back to
  zero after every step, so the sparsity is exactly that of the L1 student.
- The report gets one extra record, ``"<finetune: cross-entropy>"``, whose
  ``loss_before``/``loss_after`` are the cross-entropy on the un-augmented
  few samples (student in eval mode) before and after fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CompressConfig
from ..data import augment
from ..errors import UserError
from ..models import model_family
from ..run import CompressReport, recalibrate_bn
from .common import (
    Needs,
    Run,
    auto_pad,
    check_train_params,
    eval_loss,
    finish,
    resolve_configs,
    sgd_train,
    stage_record,
    start,
)
from .l1 import prune_l1

__all__ = ["BPConfig", "bp_defaults", "l1_bp", "prepare_bn", "check_bp_params"]


def check_bp_params(hp: Any) -> None:
    """The training settings of L1+BP / FitNet (``bn_mode`` recalibrate | train | eval), checked before any
    work is done."""
    if hp.bn_mode == "recalibrate":
        if hp.recal_views < 1:
            raise UserError(f"recal_views must be >= 1, got {hp.recal_views}")
        hp = replace(hp, bn_mode="eval")
    check_train_params(hp)


def prepare_bn(run: Run, hp: Any) -> Any:
    """``bn_mode="recalibrate"``: re-estimate the student's BN statistics on ``hp.recal_views`` augmented
    views of each few-shot image, then return a copy of ``hp`` that trains with them frozen (eval)."""
    check_bp_params(hp)
    if hp.bn_mode != "recalibrate":
        return hp
    gen = torch.Generator().manual_seed(hp.seed)
    pad = auto_pad(run.images, hp.pad)
    views = torch.cat([run.images] + [augment(run.images, pad, gen) for _ in range(hp.recal_views - 1)])
    recalibrate_bn(run.student, views, hp.batch_size)
    return replace(hp, bn_mode="eval")


@dataclass
class BPConfig:
    iterations: int = 200  # SGD steps (full batch when N <= batch_size)
    lr: float = 1e-4  # initial lr, cosine-decayed to 0 (validation, VGG-16 K=1: 0.01 collapses with frozen BN)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128  # images per step
    pad: int | None = None  # crop padding in px; None: 2 up to 28x28 images, 4 above; 0: no augmentation
    bn_mode: str = "recalibrate"  # recalibrate (statistics of the few images, then frozen) | eval | train
    recal_views: int = 16  # recalibrate: augmented views per image the statistics are estimated on
    seed: int = 0  # batches and augmentation


# lr per model family (crossdistill.models.model_family), chosen on validation: see bp_defaults
_BP_LR = {"residual": 1e-4, "plain": 1e-4}


def bp_defaults(model: nn.Module) -> BPConfig:
    """BPConfig for ``model``'s family (the lr; everything else as the dataclass). Validation, K=1
    (benchmarks/sweep_hparams.py --baselines): ResNet-56 recalibrate/1e-4 85.4 %, /1e-3 83.9 %;
    ResNet-20 recalibrate/1e-4 83.4 %, /1e-3 81.4 %; VGG-16 recalibrate/1e-4 65.7 %, /1e-3 23.6 %."""
    return BPConfig(lr=_BP_LR[model_family(model)])


def l1_bp(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: BPConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """L1-norm pruning of ``teacher``, then cross-entropy fine-tuning on (``images``, ``labels``)."""
    cfg, hp = resolve_configs(config, params if params is not None else bp_defaults(teacher), BPConfig, overrides)
    check_bp_params(hp)
    run = start("l1+bp", teacher, images, labels, cfg, Needs(labels=True))
    kept = prune_l1(run)
    train_hp = prepare_bn(run, hp)
    masks = None if run.structured else kept

    # fine-tune every parameter with cross-entropy on augmented few-shot batches
    t0 = time.perf_counter()
    student = run.student

    def full_loss():
        return F.cross_entropy(student(run.images), run.labels)

    before = eval_loss(student, full_loss)
    sgd_train(
        run, list(student.parameters()), lambda x, y: F.cross_entropy(student(x), y), train_hp, hp.iterations, masks
    )
    after = eval_loss(student, full_loss)
    run.records.append(stage_record(run, "<finetune: cross-entropy>", before, after, time.perf_counter() - t0))
    return finish(run, hp)
