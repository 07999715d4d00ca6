"""The baselines named by Bai et al. (AAAI 2020), on the same footing as compress().

Every baseline takes the teacher and the few images (and labels where it
trains with cross-entropy), prunes to the same plan and kept counts as
:func:`crossdistill.compress.compress` with the same :class:`CompressConfig`,
and returns ``(student, CompressReport)`` with ``student.widths`` set.

========  ==========================================================  =======  ============
name      method                                                      labels   unstructured
========  ==========================================================  =======  ============
l1        L1-norm filter pruning (Li et al. 2017), no data            no       yes
l1+bp     L1-norm, then cross-entropy fine-tuning ("BP")              yes      yes
fitnet    L1-norm, then FitNet hints + KD (Romero et al. 2015)        yes      yes
fskd      L1-norm, then FSKD 1x1 least-squares fits (Li et al. 2020)  no       no
thinet    ThiNet greedy selection + least squares (Luo et al. 2017)   no       no
cp        CP LASSO selection + least squares (He et al. 2017)         no       no
mir       L1-norm, then MiR feature mimicking (Wang et al. 2022)      no       yes
========  ==========================================================  =======  ============

``mir`` comes after the paper (CVPR 2022); its code and settings live in
:mod:`crossdistill.mir`.

Example::

    student, report = run_baseline("thinet", teacher, images, keep=0.5)
    student, report = run_baseline("l1+bp", teacher, images, labels, iterations=100)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import UserError
from ..mir import MirConfig, method_defaults
from ..run import CompressReport
from .bp import BPConfig, bp_defaults, l1_bp
from .cp import CPConfig, channel_pruning
from .fitnet import FitNetConfig, fitnet, fitnet_defaults
from .fskd import FSKDConfig, fskd
from .l1 import L1Config, l1_prune
from .mir import mir
from .thinet import ThiNetConfig, thinet

__all__ = [
    "Baseline",
    "BASELINES",
    "run_baseline",
    "default_params",
    "L1Config",
    "BPConfig",
    "FitNetConfig",
    "FSKDConfig",
    "ThiNetConfig",
    "CPConfig",
]


@dataclass(frozen=True)
class Baseline:
    run: Callable[..., tuple[nn.Module, CompressReport]]  # (teacher, images, labels, config, params, **kw)
    params: type  # its hyperparameter dataclass
    needs_labels: bool
    unstructured: bool  # also runs with prune="unstructured"
    summary: str
    defaults: Callable[[nn.Module], Any] | None = None  # teacher -> params when none are given (per family)


BASELINES: dict[str, Baseline] = {
    "l1": Baseline(l1_prune, L1Config, False, True, "L1-norm filter pruning (Li et al. 2017), no data"),
    "l1+bp": Baseline(
        l1_bp, BPConfig, True, True, "L1-norm + cross-entropy fine-tuning on the few samples", bp_defaults
    ),
    "fitnet": Baseline(
        fitnet, FitNetConfig, True, True, "L1-norm + FitNet hints and KD (Romero et al. 2015)", fitnet_defaults
    ),
    "fskd": Baseline(fskd, FSKDConfig, False, False, "L1-norm + FSKD 1x1 least-squares fits (Li et al. 2020)"),
    "thinet": Baseline(thinet, ThiNetConfig, False, False, "ThiNet greedy selection + least squares (Luo 2017)"),
    "cp": Baseline(channel_pruning, CPConfig, False, False, "CP LASSO selection + least squares (He et al. 2017)"),
    "mir": Baseline(
        mir, MirConfig, False, True, "L1-norm + MiR label-free feature mimicking (Wang et al. 2022)", method_defaults
    ),
}


def run_baseline(
    name: str,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    *,
    params: Any = None,
    **kw: Any,
) -> tuple[nn.Module, CompressReport]:
    """Run baseline ``name`` on ``teacher`` with the few ``images`` (and ``labels`` for l1+bp / fitnet).

    ``config`` fixes the layers and keep ratios exactly as for compress();
    ``params`` is the baseline's hyperparameter dataclass (defaults if None).
    Keywords set a field of that dataclass when it has one, else a
    :class:`CompressConfig` field (``keep=0.3``, ``prune="unstructured"``).
    The teacher is not modified.
    """
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name].run(teacher, images, labels, config, params, **kw)


def default_params(name: str, teacher: nn.Module) -> Any:
    """The hyperparameters baseline ``name`` runs with on ``teacher`` when none are given: its dataclass,
    with the lr / steps of ``teacher``'s family where validation found that it matters (l1+bp, fitnet, mir)."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    spec = BASELINES[name]
    return spec.defaults(teacher) if spec.defaults is not None else spec.params()
