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
        if overrides.get("ridge", getattr(config, "ridge", None)) == "auto":
            raise UserError(f"ridge='auto' is chosen by {', '.join(METHODS)} only; give baseline {method!r} a number")
        if method == "mir":  # its settings: mir=... or config.mir (refine="mir" after it: nothing more)
            params = overrides.pop("mir", getattr(config, "mir", None))
            return run_baseline(method, teacher, images, labels, config, params=params, **overrides)
        # refine="mir" (config or keyword): run.finish refines after the baseline, as after compress()
        return run_baseline(method, teacher, images, labels, config, **overrides)
    if method in METHODS:
        return compress(teacher, images, config, on_layer=on_layer, method=method, **overrides)
    raise UserError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
