"""One entry point for every method: cross-distillation variants and the paper's baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .baselines import BASELINES, run_baseline
from .compress import compress
from .config import CompressConfig
from .errors import UserError
from .objectives import METHODS
from .run import CompressReport

__all__ = ["ALL_METHODS", "run_method"]

ALL_METHODS: tuple[str, ...] = METHODS + tuple(BASELINES)


def run_method(
    method: str,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    on_layer: Callable[[int, int, str], None] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """``compress`` for nc/ours/ours-s/correction/imitation, ``run_baseline`` for l1, l1+bp, fitnet, fskd,
    thinet, cp, mir. Same plan, same kept counts, same report type. ``refine="mir"`` (in ``config`` or a
    keyword) runs :func:`crossdistill.mir.mir_refine` after any of them (``report.refine``)."""
    if method in BASELINES:
        if overrides.get("target") is not None or (config is not None and config.target is not None):
            raise UserError(f"a target runs with {', '.join(METHODS)}; baseline {method!r} takes --keep only")
        # refine="mir" after a baseline (compress() refines nc / ours / ours-s itself)
        refine = overrides.pop("refine", getattr(config, "refine", None))
        mir_params = overrides.pop("mir", getattr(config, "mir", None))
        params = mir_params if method == "mir" else None
        student, report = run_baseline(method, teacher, images, labels, config, params=params, **overrides)
        if refine == "mir" and method != "mir":
            student, report.refine = _refine_baseline(student, teacher, images, report, mir_params)
        return student, report
    if method in METHODS:
        return compress(teacher, images, config, on_layer=on_layer, method=method, **overrides)
    raise UserError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")


def _refine_baseline(
    student: nn.Module, teacher: nn.Module, images: torch.Tensor, report: CompressReport, params: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """mir_refine after a baseline, on the baseline's device; unstructured zeros stay zero."""
    import copy

    from .mir import mir_refine, zero_masks
    from .run import resolve_device

    teacher = copy.deepcopy(teacher).to(resolve_device(report.config["device"])).eval()
    masks = zero_masks(student) if report.config["prune"] == "unstructured" else None
    refined, info = mir_refine(student, teacher, images, params, masks=masks)
    refined.widths = student.widths  # type: ignore[attr-defined]
    report.config["refine"] = "mir"
    return refined, info
