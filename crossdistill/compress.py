"""Layer-wise cross distillation: teacher + a few images -> smaller student + report.

Reads top to bottom: config, run start (checks, copies), plan, objectives,
then the shared per-layer step of :mod:`crossdistill.run` (capture h^T and
h^S once, solve, write the weights, remove channels) with the solver chosen
here, then the report.

BN mode (a deliberate choice, see docs/method.md): features are captured with
both networks in eval mode, so BN uses the teacher's running statistics and
the capture is deterministic. ``bn_mode="train"`` mimics the official VGG
runs (batch statistics of the few-shot set). ``recalibrate_bn=True``
re-estimates the student's BN running statistics on the few-shot images at
the end (the official VGG runs do this implicitly).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import CompressConfig
from .errors import UserError
from .mir import refine_step
from .models import official_mu
from .objectives import METHODS, Term, objective_terms, refits_unpruned_layer
from .plan import LayerPlan
from .ridgecv import cv_solve_structured, guard_solve
from .run import (
    CompressReport,
    LayerRecord,
    LayerStep,
    Run,
    check_images,
    finish,
    measure_peak_memory_mb,
    plan_layers,
    recalibrate_bn,
    refit_layers,
    resolve_device,
    start,
)
from .safety import (
    l1_channels,
    l1_start,
    make_views,
    masked_start,
    pruned_start,
    teacher_outputs,
    view_error,
    views_errors,
    warn_fired,
)
from .solvers import (
    AdamOptions,
    LstsqOptions,
    SolveResult,
    adam_solve,
    solve_grouped,
    solve_structured,
    solve_unstructured,
)
from .spill import materialize

if TYPE_CHECKING:
    from .target import Allocation

__all__ = [
    "official_mu",
    "CompressConfig",
    "CompressReport",
    "LayerRecord",
    "compress",
    "check_images",
    "recalibrate_bn",
    # moved to run.py; re-exported for the old import path
    "resolve_device",
    "measure_peak_memory_mb",
]


def _in_memory(step: LayerStep) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's teacher / student inputs as tensors (spilled batches read back), the same one twice when
    they are one: for the solvers that index images (Adam's full batch, the ridge checks' image halves)."""
    hT = materialize(step.hT)
    return hT, hT if step.hS is step.hT else materialize(step.hS)


def _solver(
    cfg: CompressConfig, n_fit: int | None = None, guarded: dict[str, float | None] | None = None
) -> Callable[[LayerStep], SolveResult]:
    """The per-layer solve of ``cfg.solver``: official Adam, or exact least squares (grouped convs per group).
    ``n_fit``: ridge_guard="views", the first ``n_fit`` images are fitted, the rest are views; ``guarded``
    collects each layer's guarded ridge (None: the start kept)."""
    lstsq = LstsqOptions(
        cfg.ridge,
        cfg.steps,
        cfg.channel_criterion,
        cfg.weight_criterion,
        cfg.batch_size,
        cfg.ridge_conditioned,
        cfg.ridge_per_unknown,
    )
    adam = AdamOptions(cfg.iterations, cfg.lr, cfg.lr_drop)

    def solve(step: LayerStep) -> SolveResult:
        if cfg.solver == "adam":
            return adam_solve(step.layer, step.problem, *_in_memory(step), adam)  # full batch: every image at once
        if cfg.ridge_guard:  # the image halves / views index images: inputs in memory (few-shot sizes)
            res, ridge = guard_solve(step.layer, step.problem, *_in_memory(step), lstsq, n_fit)
            if guarded is not None:
                guarded[step.name] = ridge
            return res
        if getattr(step.layer, "groups", 1) != 1:  # grouped / depthwise conv: solved group by group
            return solve_grouped(step.layer, step.problem, step.hT, step.hS, lstsq)
        if cfg.ridge_cv and step.problem.structured:
            return cv_solve_structured(step.layer, step.problem, *_in_memory(step), lstsq)[0]
        stats = step.stats()
        try:
            if step.problem.structured:
                return solve_structured(stats, step.problem, lstsq)
            return solve_unstructured(stats, step.problem, lstsq)
        finally:
            stats.free()

    return solve


def _apply_target(run: Run, cfg: CompressConfig) -> Allocation:
    """The budget step: sets ``cfg.keep_overrides`` (exact layer names; every other layer stays whole) and,
    for depth 'blocks' / 'mixed', replaces ``run.student`` by one with residual blocks dropped."""
    from .blockdrop import plan_blocks
    from .target import plan_target

    was_training = run.teacher.training  # bn_mode='train': the allocation itself runs in eval mode
    if cfg.depth == "channels":
        alloc = plan_target(run.teacher, run.images, cfg)
    else:
        run.student, alloc = plan_blocks(run.teacher, run.images, cfg)
    run.teacher.train(was_training)
    run.student.train(was_training)
    if alloc.dropped_blocks:
        # the adaptors are not in the teacher: fitted already, they are left out of the layer-wise re-fit
        cfg.exclude = [*(cfg.exclude or []), *[f"{b}.adaptor" for b in alloc.dropped_blocks]]
    cfg.keep_overrides = {"*": 1.0, **alloc.keep_overrides}
    return alloc


def compress(
    teacher: nn.Module,
    images: torch.Tensor,
    config: CompressConfig | None = None,
    on_layer: Callable[[int, int, str], None] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """Compress ``teacher`` with the few ``images`` by layer-wise cross distillation.

    ``images``: float tensor (N, C, H, W), normalised as the teacher expects;
    labels are not needed. Keyword ``overrides`` set :class:`CompressConfig`
    fields, e.g. ``compress(model, x, method="ours", mu=0.9, keep=0.5)``.
    Returns ``(student, report)``: the student is an ordinary ``nn.Module``
    (the teacher is left untouched); narrower layers are physically removed.
    With ``safety="views"`` (the default) a student worse than the no-re-fit start on check views of the
    images is replaced by a guarded re-run or the start (:func:`_safety_net`, ``report.safety``).
    """
    cfg = copy.deepcopy(config) if config is not None else CompressConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"unknown compression setting {k!r}")
        setattr(cfg, k, v)
    if cfg.ridge == "auto":
        return _compress_auto_ridge(teacher, images, cfg, on_layer)
    cfg.validate()
    if cfg.method not in METHODS:
        raise UserError(f"compress() runs {', '.join(METHODS)}; use run_method() for {cfg.method!r}")
    run, allocation = _layerwise(teacher, images, copy.deepcopy(cfg), on_layer)
    safety = _safety_net(teacher, images, cfg, run, allocation, on_layer) if cfg.safety != "off" else None
    if safety is not None:
        run, allocation, safety = safety

    # finish: BN statistics if asked, then the holistic refinement from the layer-wise solution
    # (refine="mir", crossdistill.mir), then the report
    student, report = finish(run, refine=refine_step)
    report.allocation = allocation.to_dict() if allocation is not None else None
    report.safety = safety
    if safety is not None and safety.get("fired"):
        warn_fired(safety)
    return student, report


def _layerwise(
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: CompressConfig,
    on_layer: Callable[[int, int, str], None] | None,
    guarded: dict[str, float | None] | None = None,
) -> tuple[Run, Allocation | None]:
    """Setup, budget, plan and the per-layer re-fit of one run (``cfg`` is the run's own copy: a target
    changes it). ``ridge_guard="views"``: the check views join the images for the capture only (each layer
    is fitted on the images and judged on the views), and leave them afterwards. ``guarded``: see _solver."""
    # setup: copies of the teacher on the device, checked images
    run = start(cfg.method, teacher, images, None, cfg)

    # budget: a target becomes per-layer keeps (cfg.keep_overrides) and dropped blocks, then the run goes on
    allocation = _apply_target(run, cfg) if cfg.target is not None else None

    # plan: layers in forward order with their keep ratios (traced in eval mode, one image)
    plan_layers(run)

    # BN mode for the capture: train mode uses batch statistics, so the whole few-shot set goes in one batch
    if cfg.bn_mode == "train":
        if len(run.images) < 2:
            raise UserError("bn_mode='train' needs at least 2 images (batch statistics); add images or use eval")
        cfg.batch_size = max(cfg.batch_size, len(run.images))  # as the official runs: no 1-image tail batch
        run.teacher.train()
        run.student.train()

    # objectives: unpruned layers are left as they are by the mu-mix (W^S = W^T is optimal); "nc"
    # re-fits them with L^r to absorb the error accumulated before them (docs/method.md)
    terms = objective_terms(cfg.method, cfg.mu, cfg.alpha, cfg.beta)
    unpruned_terms = objective_terms("nc") if cfg.unpruned_objective == "nc" else terms
    moves_unpruned = refits_unpruned_layer(unpruned_terms)

    def terms_for(p: LayerPlan) -> list[Term] | None:
        if p.keep is not None:
            return terms
        return unpruned_terms if moves_unpruned else None

    fit = run.images
    if cfg.ridge_guard == "views":
        run.fit_images = len(fit)
        run.images = torch.cat([fit, make_views(fit, cfg.safety_views, cfg.safety_shift)])

    # one step per layer: capture, solve, write, remove
    refit_layers(run, terms_for, _solver(cfg, run.fit_images, guarded), on_layer)

    if run.fit_images is not None:  # the views leave: the report and refinement see the fit images only
        kept = run.teacher_output
        run.images = fit
        run.teacher_output = (fit, kept[1][: len(fit)]) if kept is not None else None
    return run, allocation


class _SecondViews:
    """The views a fired net judges on, made on first use with the teacher's outputs on them: the second set
    (``second=True``, no guard has seen it) and the guard's own set (what ridge_guard="views" guarded each layer on,
    ``safety_views_fired`` of the first kind). A candidate that was guarded on views replaces what it is compared
    with only if it is no worse on both."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.made: dict[bool, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def views(self, second: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if second not in self.made:
            cfg = self.run.cfg
            v = make_views(self.run.images, cfg.safety_views_fired, cfg.safety_shift, second=second)
            self.made[second] = (v, teacher_outputs(self.run, v))
        return self.made[second]

    def no_worse(self, model: nn.Module, reference: nn.Module, slack: float) -> tuple[bool, float, float]:
        """Whether ``model`` is within ``slack`` x ``reference``'s error on the guard's views too, and the two
        errors there (the second set is compared by the caller)."""
        views = self.views(second=False)
        err, ref = view_error(model, self.run, *views), view_error(reference, self.run, *views)
        return err <= slack * ref + SAFETY_ATOL, err, ref


# relative output error below which a student is "as good as" the start whatever the slack: float rounding (keep=1
# leaves the start = the teacher, error 0, and an exact re-fit at ~1e-7)
SAFETY_ATOL = 1e-6


def _safety_net(
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: CompressConfig,
    run: Run,
    allocation: Allocation | None,
    on_layer: Callable[[int, int, str], None] | None,
) -> tuple[Run, Allocation | None, dict[str, Any]]:
    """``cfg.safety="views"`` (crossdistill.safety): the run, or its fallback, and what happened."""
    info: dict[str, Any] = {"mode": cfg.safety, "slack": cfg.safety_slack, "fired": False, "returned": "student"}
    skip = None
    if cfg.bn_mode == "train":
        skip = "bn_mode='train'"
    elif allocation is not None and allocation.dropped_blocks:
        skip = "blocks dropped (the start is not the teacher)"
    elif len(run.images) < 2:
        skip = "fewer than 2 images"
    elif run.start_masks is None:
        skip = "a re-fitted layer was narrowed before its turn (no start in the teacher's indexing)"
    if skip is not None:
        return run, allocation, {**info, "skipped": skip}
    views = make_views(run.images, cfg.safety_views, cfg.safety_shift)
    yT = teacher_outputs(run, views)  # F^T(views) once, for the student and the start
    student_err, start_err = views_errors(run, views, yT)
    info.update(views=len(views), student_error=student_err, start_error=start_err)
    result, err = run, None  # what would be returned and its error on the second views (None: not computed yet)
    second = _SecondViews(run)
    if student_err > cfg.safety_slack * start_err + SAFETY_ATOL:
        info.update(fired=True, reference="start", returned="start")
        # the guarded re-run's layers were each judged on the first views: it and the start are judged on a second set
        judge = second.views()
        start_err2 = view_error(masked_start(run), run, *judge)
        info.update(start_error_second=start_err2, views_second=len(judge[0]))
        result, err = None, start_err2
        if cfg.solver == "lstsq" and cfg.ridge_guard != "views":  # the re-run with each layer judged on the views
            layers: dict[str, float | None] = {}
            guarded = dataclasses.replace(copy.deepcopy(cfg), ridge_guard="views", ridge_cv=False)
            guarded.safety_views = (
                cfg.safety_views_fired
            )  # each layer guarded on that many views (the first set's kind)
            run2, alloc2 = _layerwise(teacher, images, guarded, on_layer, layers)
            info["guarded_error"] = view_error(run2.student, run, *judge)
            info["layers"] = {n: ("start" if r is None else r) for n, r in layers.items()}
            if info["guarded_error"] <= cfg.safety_slack * start_err2 + SAFETY_ATOL:
                ok, g_err, s_err = second.no_worse(run2.student, masked_start(run), cfg.safety_slack)
                info.update(guarded_error_guard_views=g_err, start_error_guard_views=s_err)
                if ok:
                    result, err, allocation = run2, info["guarded_error"], alloc2
                    info["returned"] = "guarded"
    l1 = _l1_reference(teacher, images, cfg, run, info, (result, err, second))
    if l1 is not None:
        return l1, allocation, info
    if result is None:
        run.student = pruned_start(run)
        run.student.train(run.teacher.training)
        result = run
    return result, allocation, info


def _l1_reference(
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: CompressConfig,
    run: Run,
    info: dict[str, Any],
    kept: tuple[Run | None, float | None, _SecondViews],
) -> Run | None:
    """The second reference of the safety net, the L1 start (crossdistill.safety.l1_start), judged on the
    second views (no guard has seen them): None when it is not consulted or not better than what the net
    kept (``kept``: that run, None for the own start, its error on the second views if known, the views);
    else the re-fit from the L1 channels if that beats the L1 start there, or the L1 start. Fills ``info``.
    Consulted only with structured pruning and the method's own channel choice, when the net fired or the
    student is not far below its own start (``safety_l1_ratio``)."""
    result, err, second = kept
    if not run.structured or cfg.kept_channels:
        return None
    if not info["fired"] and info["student_error"] < cfg.safety_l1_ratio * info["start_error"]:
        return None
    views, yT = second.views()
    if err is None:  # the student, which passed the first views
        err = view_error(result.student, run, views, yT)
    info.update(
        kept=info["returned"], kept_error_second=err, views_second=len(views)
    )  # what the check against its own start kept
    base = dataclasses.replace(copy.deepcopy(run.cfg), target=None)  # a target's keeps are in keep_overrides
    try:
        l1 = l1_start(teacher, images, base)
    except (UserError, RuntimeError) as e:  # a model L1 cannot prune as planned: the first reference stands
        info["l1_skipped"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None
    l1.cfg.target = run.cfg.target
    l1_err = view_error(l1.student, run, views, yT)
    info["l1_start_error"] = l1_err
    # a fired net has shown the images can mislead: then a re-fit must beat the data-free L1 start by a margin
    margin = cfg.safety_l1_margin if info["fired"] else 1.0
    info["l1_margin"] = margin
    slack = cfg.safety_slack * margin
    if err <= slack * l1_err + SAFETY_ATOL:
        return None
    channels = l1_channels(l1)
    info.update(fired=True, reference="l1", returned="l1-start")
    # the method's own re-fit on the L1 channels, guarded as the run it replaces was; not where the net already fell
    # back to its own start: no re-fit of this method held up on the views there (random-init mobilenet_v3_small,
    # Ours-S: its guarded re-fit on the L1 channels beat the L1 start by 2 % on both sets of views, x1.48 on fresh
    # images, results/safety_real.md)
    if channels is not None and info["kept"] != "start":
        refit = dataclasses.replace(base, kept_channels=channels)
        if info.get("layers") is not None:
            refit = dataclasses.replace(refit, ridge_guard="views", ridge_cv=False, safety_views=cfg.safety_views_fired)
        run3, _ = _layerwise(teacher, images, refit, None)
        run3.cfg.target = run.cfg.target
        info["l1_refit_error"] = view_error(run3.student, run, views, yT)
        if info["l1_refit_error"] <= cfg.safety_slack * cfg.safety_l1_margin * l1_err + SAFETY_ATOL:
            ok, r_err, l_err = second.no_worse(run3.student, l1.student, cfg.safety_slack)
            info.update(l1_refit_error_guard_views=r_err, l1_start_error_guard_views=l_err)
            if ok:
                info["returned"] = "l1-refit"
                return run3
    l1.student.train(run.teacher.training)
    return l1


RIDGE_CANDIDATES = (1e-3, 1e-2, 1e-1, 1.0)


def _compress_auto_ridge(
    teacher: nn.Module, images: torch.Tensor, cfg: CompressConfig, on_layer: Callable[[int, int, str], None] | None
) -> tuple[nn.Module, CompressReport]:
    """``ridge="auto"``: one run per ridge of RIDGE_CANDIDATES, the one with the smallest output error on the
    held-out images (``holdout``) kept; ``report.heldout["ridge_candidates"]`` gives every candidate's error.
    The best run's warnings are re-emitted (the others are silenced)."""
    if not cfg.holdout > 0:
        raise UserError("ridge='auto' chooses the ridge on held-out images: set holdout too, e.g. holdout=0.2")
    best = None
    errors: dict[str, float] = {}
    for ridge in RIDGE_CANDIDATES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            student, report = compress(teacher, images, dataclasses.replace(cfg, ridge=ridge), on_layer)
        err = report.heldout["output_error"]
        errors[str(ridge)] = err
        if best is None or err < best[0]:
            best = (err, student, report, caught)
    _, student, report, caught = best
    report.heldout["ridge_candidates"] = errors
    report.config["ridge_auto"] = True
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return student, report
