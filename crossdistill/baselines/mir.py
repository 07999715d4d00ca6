"""MiR as a method (Wang, Liu, Ma, Yong, Chai, Wu, "Compressing Models with Few Samples: Mimicking
then Replacing", CVPR 2022): the L1-norm student of :mod:`crossdistill.baselines.l1` (same plan and
kept counts as every method, as the paper starts from L1-norm pruned weights), then the holistic,
label-free feature mimicking of :func:`crossdistill.mir.mir_refine` with the teacher's head kept.
Settings and where we differ from the paper: :mod:`crossdistill.mir`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..mir import MirConfig, MirExtras, method_defaults, mir_refine
from .common import finish, resolve_configs, stage_record, start
from .l1 import prune_l1

__all__ = ["mir"]


def mir(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: Any = None,
    params: MirConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, Any]:
    """Method ``mir``: L1-norm pruning to the plan of ``config`` (a CompressConfig; same kept counts as
    every method), then :func:`mir_refine`. ``labels`` are optional (only for ``holdout_folds``).
    Hyperparameters: ``params``, else ``config.mir``, else :func:`method_defaults`."""
    if params is None:
        params = getattr(config, "mir", None) or method_defaults(teacher)
    cfg, hp = resolve_configs(config, params, MirConfig, overrides)
    hp.validate()
    run = start("mir", teacher, images, labels, cfg)
    kept = prune_l1(run)
    masks = None if run.structured else kept
    extras = MirExtras(labels=run.labels)
    run.student, info = mir_refine(run.student, run.teacher, run.images, hp, masks=masks, extras=extras)
    run.records.append(stage_record(run, "<mir: features>", info["loss_before"], info["loss_after"], info["seconds"]))
    student, report = finish(run, hp)
    report.refine = info
    return student, report
