"""The network-level safety net of the layer-wise re-fits (#13, ``CompressConfig.safety``).

A re-fit on a few images can fit them and miss every other image by orders of magnitude (random-init
networks fed noise: many more weights than rows, nothing to generalise from). Each layer's own check sees
one layer; the error builds up across layers. So after the layer-wise run the whole student is judged at the
output, against the teacher, on *views* of the few images that no fit used: each a horizontal flip plus a
small shift (what MiR trains on). On noise inputs a flipped, shifted image is statistically a fresh one (the
kernels are not symmetric), so the check is as strong as a held-out image; on natural images the views lie
next to the data, where a re-fit that generalises is good. Every image and class stays in the fit.

The reference is the *start*: the teacher with the same channels (weights) removed and nothing re-fitted,
i.e. what every re-fit step began from (here as a teacher copy whose removed columns are zeroed: the same
function, without a dependency-graph walk). If the student's error on the views is above ``safety_slack``
x the start's, compress() runs again with ``ridge_guard="views"`` (each layer: the smallest ridge whose
re-fit is no worse than the start on the views, else the start, :func:`crossdistill.ridgecv.guard_solve`),
and if that is still above, returns the start itself (physically pruned). The guarded re-run is judged on a
second, disjoint set of views (each of its layers was judged on the first). On trained networks the re-fit
is far below the start (the start is an un-repaired pruned network), so the check passes and the student is
unchanged.

A second reference, structured pruning only: the *L1 start* (:func:`l1_start`, exactly what method "l1"
returns: channels chosen by their producers' filter norms, teacher weights, no re-fit). A re-fit below its own
start can still be above L1's when the channel choice is the problem (the energy criterion on a few noise
images). When the net fired, or the student's error on the views is at least ``safety_l1_ratio`` x its
start's (trained teachers' students sit far below it), the L1 start is run on the same views; a result above
it is replaced by the method's own re-fit on the L1 channels if that is below the L1 start, else by the L1
start itself.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .baselines.common import start as baseline_start
from .baselines.l1 import prune_l1
from .capture import eval_mode
from .config import CompressConfig
from .pruning import ChannelRemover, apply_mask
from .run import Run, output_error

__all__ = [
    "SafetyWarning",
    "make_views",
    "masked_start",
    "pruned_start",
    "views_errors",
    "teacher_outputs",
    "view_error",
    "l1_start",
    "l1_channels",
]


class SafetyWarning(UserWarning):
    """The student was worse than the un-re-fitted start on the check views: a fallback was returned."""


# the shift directions, in turn: right, down, left, up (dx, dy in units of the shift); the second set's: diagonal
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))
_DIAGONALS = ((1, 1), (-1, 1), (-1, -1), (1, -1))


def make_views(images: torch.Tensor, n_views: int, shift: float, second: bool = False) -> torch.Tensor:
    """``n_views`` deterministic views of ``images`` (N, C, H, W): each a horizontal flip of one image moved
    by ``max(1, round(shift x side))`` pixels in one of four directions (edges replicated).

    With more images than views, the viewed images are spread evenly over the set (the draw is ordered by
    class: each class gets its share); with fewer, each image gets several views in different directions
    (at most four per image). ``second``: a set disjoint from the first (diagonal moves, and with more images
    than views the images half-way between the first set's): what a guarded re-run, whose layers were each
    judged on the first set, is judged on."""
    n = len(images)
    n_views = min(n_views, 4 * n)
    h, w = images.shape[-2:]
    sy, sx = (max(1, round(shift * side)) if shift > 0 else 0 for side in (h, w))
    if n_views <= n:
        idx = [((2 * j + second) * n) // (2 * n_views) for j in range(n_views)]
        dirs = [j % 4 for j in range(n_views)]
    else:
        idx = [j % n for j in range(n_views)]
        dirs = [(j // n + j % n) % 4 for j in range(n_views)]  # an image's views differ in direction
    flipped = images[torch.tensor(idx, device=images.device)].flip(-1)
    padded = F.pad(flipped, (sx, sx, sy, sy), mode="replicate") if sx or sy else flipped
    out = torch.empty_like(flipped)
    moves = _DIAGONALS if second and (sx or sy) else _DIRECTIONS
    for j, d in enumerate(dirs):
        dx, dy = moves[d]
        top, left = sy + dy * sy, sx + dx * sx
        out[j] = padded[j, :, top : top + h, left : left + w]
    return out


def _apply_start_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in ``model`` (the teacher or a copy), every input channel / weight ``masks`` says was removed."""
    with torch.no_grad():
        for name, mask in masks.items():
            layer = model.get_submodule(name)
            if mask.dim() == 1:  # kept input channels
                shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
                layer.weight.mul_(mask.to(layer.weight.device, layer.weight.dtype).view(shape))
            else:
                apply_mask(layer, mask.to(layer.weight.device))


def masked_start(run: Run) -> nn.Module:
    """The no-re-fit start of ``run``: a copy of the teacher with every input channel (structured) or weight
    (unstructured) the run removed set to zero, teacher weights everywhere else. Removed channels feed only
    the layer that drops them (and the gate's squeeze conv, zeroed too), so this computes what the pruned
    start computes."""
    start = copy.deepcopy(run.teacher).eval()
    _apply_start_masks(start, run.start_masks)
    return start


@contextmanager
def _teacher_as_start(run: Run) -> Iterator[nn.Module]:
    """The run's own teacher, masked into the start for the duration of the block and then restored exactly
    (the masked layers' weights are saved): no copy of the whole network for one look at the views."""
    saved = {n: run.teacher.get_submodule(n).weight.detach().clone() for n in run.start_masks}
    try:
        _apply_start_masks(run.teacher, run.start_masks)
        yield run.teacher
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                run.teacher.get_submodule(n).weight.copy_(w)


def pruned_start(run: Run) -> nn.Module:
    """:func:`masked_start` with the removed channels physically gone (the student's architecture), in the
    run's order: the student the safety net returns when no re-fit passes."""
    start = masked_start(run)
    if run.structured:
        remover = ChannelRemover(start, run.example)
        for rec in run.records:
            if rec.kept_channels is not None:
                remover.remove_input_channels(rec.name, torch.tensor(rec.kept_channels, dtype=torch.long))
    return start


def teacher_outputs(run: Run, views: torch.Tensor) -> torch.Tensor | None:
    """F^T(views) in eval mode, batch by batch; None for a model whose output is not a tensor (dict
    outputs: each error then runs the teacher again)."""
    bs = run.cfg.batch_size
    with torch.no_grad(), eval_mode(run.teacher):
        outs = [run.teacher(views[i : i + bs]) for i in range(0, len(views), bs)]
    return torch.cat(outs) if all(isinstance(o, torch.Tensor) for o in outs) else None


def view_error(model: nn.Module, run: Run, views: torch.Tensor, teacher_out: torch.Tensor | None) -> float:
    """``model``'s output error against ``run``'s teacher on ``views`` (``teacher_out``: F^T(views) or None)."""
    return output_error(model, run.teacher, views, run.cfg.batch_size, teacher_output=teacher_out)


def l1_start(teacher: nn.Module, images: torch.Tensor, cfg: CompressConfig) -> Run:
    """The L1 student as a run: the layers and kept counts of ``cfg``'s plan (a target's allocated keeps are
    in ``cfg.keep_overrides``), channels by their producers' filter L1 norms, teacher weights, no re-fit:
    what method "l1" returns (crossdistill.baselines.l1), its records carrying the kept channels."""
    run = baseline_start("l1", teacher, images, None, cfg)
    prune_l1(run)
    return run


def l1_channels(l1: Run) -> dict[str, list[int]] | None:
    """The L1 run's kept input channels per pruned layer in the teacher's indexing (``kept_channels`` of a
    re-fit from them), or None where a layer was already narrower at its turn (no teacher indexing)."""
    out = {}
    for rec in l1.records:
        if rec.kept_channels is None:
            continue
        if rec.total != l1.teacher.get_submodule(rec.name).weight.shape[1]:
            return None
        out[rec.name] = rec.kept_channels
    return out


def views_errors(run: Run, views: torch.Tensor, teacher_out: Any) -> tuple[float, float]:
    """(student, start) output error against the teacher on ``views``; ``teacher_out``: F^T(views) in eval
    mode (a tensor), or None to run the teacher."""
    bs = run.cfg.batch_size
    known = teacher_out if isinstance(teacher_out, torch.Tensor) else None
    student = output_error(run.student, run.teacher, views, bs, teacher_output=known)
    if known is None:  # the teacher runs alongside: the start must be a separate copy
        return student, output_error(masked_start(run), run.teacher, views, bs)
    with _teacher_as_start(run) as start:
        return student, output_error(start, run.teacher, views, bs, teacher_output=known)


def warn_fired(info: dict[str, Any]) -> None:
    """One warning naming what the safety net returned and why."""
    what = {
        "guarded": 'the re-run with ridge_guard="views"',
        "start": "the start (no re-fit)",
        "l1-refit": "the re-fit on the L1 channels",
        "l1-start": "the L1 student (no re-fit)",
    }[info["returned"]]
    if info.get("reference") == "l1":
        margin = info.get("l1_margin", 1.0)
        ref = f"the L1 start's {info['l1_start_error']:.4g}"
        if margin != 1.0:  # a fired re-fit must beat the L1 start by a margin (CompressConfig.safety_l1_margin)
            ref = f"{margin:g} x {ref}"
        why = (
            f"on {info.get('views_second', info['views'])} further check views, the output error of the "
            f"{info['kept']} was {info['kept_error_second']:.4g}, above {ref}"
        )
    else:
        why = (
            f"the re-fitted student's output error on {info['views']} check views was {info['student_error']:.4g}, "
            f"above the no-re-fit start's {info['start_error']:.4g}"
        )
    warnings.warn(
        f"safety net: {why}; returned {what} (report.safety; safety='off' turns the check off)",
        SafetyWarning,
        stacklevel=3,
    )
