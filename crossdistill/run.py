"""The run skeleton shared by compress() and every baseline, and the per-layer step written once.

A run reads top to bottom:

1. ``start``: device, copies of the teacher (the caller's model is never
   touched), image and label checks, parameter and FLOP counts before;
2. ``plan_layers``: the layers to process (:func:`crossdistill.plan.make_plan`)
   and, for structured pruning, the :class:`ChannelRemover`;
3. the method's own work; for the layer-wise methods :func:`refit_layers`:
   per layer, capture h^T and h^S -> statistics -> solve -> write the weights
   -> remove the pruned channels (or apply the weight mask) -> record;
4. ``finish``: optional BN recalibration, the :class:`CompressReport`.

Imports run one way: cli -> methods -> {compress, baselines} -> run ->
{plan, solvers, capture, measure, pruning}.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .capture import (
    GraphStream,
    GraphUnsupported,
    buffers_kept,
    capture_input,
    capture_inputs,
    eval_mode,
    record_inputs,
)
from .checks import check_model, check_model_output, check_patterns_match
from .config import CompressConfig
from .coverage import (
    ShortfallWarning,
    first_tensor,
    heldout_errors,
    left_whole_layers,
    shortfall_message,
    width_mismatches,
)
from .errors import UserError
from .measure import FlopCount, count_flops, count_params
from .objectives import Term
from .plan import LayerPlan, make_plan
from .pruning import ChannelRemover, apply_mask, sparsity
from .ridgecv import guard_solve
from .solvers import LayerProblem, LayerStats, LstsqOptions, SolveResult, group_targets, solve_structured
from .spill import Batches, pairs
from .structure import layer_widths

__all__ = [
    "CompressConfig",
    "CompressReport",
    "LayerRecord",
    "Needs",
    "Run",
    "LayerStep",
    "start",
    "plan_layers",
    "refit_layers",
    "finish",
    "check_images",
    "check_labels",
    "split_holdout",
    "output_error",
    "resolve_device",
    "recalibrate_bn",
    "measure_peak_memory_mb",
    "split_holdout",
]


# --------------------------------------------------------------------------- report types


@dataclass
class LayerRecord:
    name: str
    kept: int  # kept input channels (structured) or weights (unstructured)
    total: int
    loss_before: float  # objective at W^S = starting weights, after masking is not yet applied
    loss_after: float
    seconds: float
    skipped: bool = False  # re-fit would be a no-op for this objective
    kept_channels: list[int] | None = None  # structured, pruned layers: the teacher's input channels kept
    rel_error: float | None = None  # sqrt(loss_after / target energy): the layer's relative output error
    fell_back: bool = False  # the solve ended above the masked start, which was kept instead (warned)


@dataclass
class CompressReport:
    config: dict[str, Any]
    layers: list[LayerRecord]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    sparsity: float  # fraction of zero weights in the processed layers
    seconds: float
    peak_memory_mb: float | None = None  # CUDA: peak allocated; CPU: peak RSS of the process
    allocation: dict[str, Any] | None = None  # target runs: target asked/achieved, kept fraction per layer, blocks
    refine: dict[str, Any] | None = None  # refine="mir" / method mir: mir_refine's info (steps, losses)
    # ||F^S(x) - F^T(x)|| / ||F^T(x)|| on the held-out images (config.holdout > 0), else on the fit images
    output_error: float | None = None
    output_error_on: str = "fit"  # "held-out" | "fit"
    # "one-pass" (fx graph, activations reused) | "per-layer" (re-run per layer) | "none" (no layer re-fitted)
    capture: str = "none"
    # what was achieved against what keep asked for (coverage.py): a warning text, or None
    shortfall: str | None = None
    # holdout > 0: output error on the held-out and the fitted images, overall and per layer (coverage.py)
    heldout: dict[str, Any] | None = None
    left_whole: list[dict[str, Any]] = field(default_factory=list)  # structured: {name, type, reason}
    # the safety net (compress(), config.safety; crossdistill.safety): the errors on the check views, whether
    # it fired, which reference decided ("start" | "l1") and what it returned ("student" | "guarded" | "start" |
    # "l1-refit" | "l1-start"), or why it was skipped. With "start", ``layers`` still describe the re-fit that was
    # replaced (their kept channels are the start's); with "l1-start", the L1 run's records (no re-fit)
    safety: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- checks, device, BN, memory


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Clear errors for images the model cannot take: wrong type, shape, NaN/inf, channel count."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise UserError("images must be a float tensor (N, C, H, W), normalised the way the model expects")
    if images.dim() != 4 or len(images) == 0:
        raise UserError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise UserError("images contain NaN or inf values; clean or re-normalise them")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != images.shape[1]:
        raise UserError(
            f"images have {images.shape[1]} channels but the model's first conv takes {first.in_channels}; "
            "convert them (grayscale vs RGB)"
        )
    check_model(model, "the teacher")
    try:
        with eval_mode(model), torch.no_grad():
            check_model_output(model(images[:1]), "the teacher")
    except RuntimeError as e:
        raise UserError(f"the model cannot run on images of shape {tuple(images.shape[1:])}: {e}") from e


def check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Labels as int64 after checking type, shape (one per image) and range."""
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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> None:
    """Re-estimate BN running statistics on ``images`` (cumulative average over batches)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size])
    for m, (mom, tr) in zip(bns, saved, strict=True):
        m.momentum = mom
        m.train(tr)


def measure_peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated on the device during the run; CPU: peak RSS of the whole process so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def split_holdout(images: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of ``images``: ``floor(fraction * N)`` images held out, at random
    (seeded), at least one when ``fraction > 0`` and at least one image always left for the fit."""
    n = len(images)
    n_hold = min(max(1, math.floor(fraction * n)) if fraction > 0 else 0, n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_hold:].sort().values, order[:n_hold].sort().values


def output_error(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    batch_size: int = 128,
    teacher_output: torch.Tensor | None = None,
    student_output: torch.Tensor | None = None,
) -> float:
    """``||F^S(x) - F^T(x)|| / ||F^T(x)||`` over ``images``, both networks in eval mode (modes restored).
    ``teacher_output`` / ``student_output``: F^T(images) / F^S(images) in eval mode already computed (then
    that network is not run)."""
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    diff = ref = 0.0
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            with torch.no_grad():
                yT = teacher(x) if teacher_output is None else teacher_output[i : i + batch_size]
                yS = student(x) if student_output is None else student_output[i : i + batch_size]
            if not isinstance(yT, torch.Tensor):  # a dict / tuple output: compare its first tensor
                yT, yS = first_tensor(yT), first_tensor(yS)
            diff += float((yS - yT).double().pow(2).sum())
            ref += float(yT.double().pow(2).sum())
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return math.sqrt(diff / ref) if ref > 0 else math.sqrt(diff)


# --------------------------------------------------------------------------- run state


@dataclass(frozen=True)
class Needs:
    """What a method requires beyond images: labels (it trains with cross-entropy), structured pruning."""

    labels: bool = False
    structured: bool = False


@dataclass
class Run:
    """State of one run: the copies, the few images, the plan and the records so far."""

    name: str  # the method
    cfg: CompressConfig
    device: torch.device
    teacher: nn.Module  # the run's own copy; eval mode (train mode only while capturing with bn_mode='train')
    student: nn.Module  # a deep copy of the teacher, pruned in place
    images: torch.Tensor  # (N, C, H, W) on device
    labels: torch.Tensor | None  # (N,) int64 on device
    example: torch.Tensor  # (1, C, H, W)
    params_before: int
    flops_before: int
    t_start: float
    plan: list[LayerPlan] = field(default_factory=list)  # forward order; set by plan_layers
    remover: ChannelRemover | None = None  # structured only; set by plan_layers
    records: list[LayerRecord] = field(default_factory=list)
    heldout: torch.Tensor | None = None  # images held out of the fit (config.holdout), for the report's error
    flops: FlopCount | None = None  # the count before; finish's count after comes from it (same layers, narrower)
    # (images, F^T(images)) in eval mode, kept from the pass that captured the teacher's inputs (finish
    # reuses it for the output error instead of running the teacher again)
    teacher_output: tuple[torch.Tensor, torch.Tensor] | None = None
    # (images, F^S(images), the student's state then): the end of the one-pass stream, in eval mode (finish
    # uses it while the student is still in that state: no BN recalibration, no refinement since)
    student_output: tuple[torch.Tensor, torch.Tensor, tuple] | None = None
    capture: str = "none"  # how refit_layers captured the student's inputs ("none": it did not run, e.g. L1)
    # what the run removed, in the teacher's indexing: layer -> kept input channels (C_in,) or weight mask
    # (unstructured), for the no-re-fit start (crossdistill.safety.masked_start); None: not expressible
    start_masks: dict[str, torch.Tensor] | None = field(default_factory=dict)
    # ridge_guard="views": run.images[:fit_images] are fitted, the rest are check views no fit uses
    fit_images: int | None = None

    @property
    def structured(self) -> bool:
        return self.cfg.prune == "structured"


def start(
    name: str,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: CompressConfig,
    needs: Needs | None = None,
) -> Run:
    """Checks, device, copies and the counts before: everything a method does before its plan."""
    t_start = time.perf_counter()
    needs = needs or Needs()
    if needs.labels and labels is None:
        raise UserError(
            f"baseline {name!r} trains with cross-entropy and needs labels: pass labels=(N,) class indices "
            "(e.g. few_shot(split, k).labels), or use a label-free baseline (l1, fskd, thinet, cp)"
        )
    if needs.structured and cfg.prune != "structured":
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
    for patterns, flag in ((cfg.include, "--include"), (cfg.exclude, "--exclude"), (cfg.keep_overrides, "--keep-file")):
        check_patterns_match(teacher, patterns, flag)
    if labels is not None:
        with torch.no_grad():
            num_classes = teacher(images[:1]).shape[-1]
        labels = check_labels(labels, len(images), num_classes).to(device)
    heldout = None
    if cfg.holdout > 0 and len(images) >= 2:
        fit, held = split_holdout(images, cfg.holdout, cfg.holdout_seed)
        heldout = images[held.to(images.device)]
        images = images[fit.to(images.device)]
        labels = labels[fit.to(labels.device)] if labels is not None else None
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    example = images[:1]
    params_before = count_params(student)
    flops = FlopCount(student, example.shape[1:])
    run = Run(name, cfg, device, teacher, student, images, labels, example, params_before, flops.total, t_start)
    run.heldout, run.flops = heldout, flops
    return run


def plan_layers(run: Run, pruned_only: bool = False) -> None:
    """Set ``run.remover`` (structured) and ``run.plan``.

    ``pruned_only`` (the baselines): only the layers that are pruned, never
    a layer that is only re-fitted; the pruned layers and their kept counts
    are exactly compress()'s (concatenation consumers too, with their
    ``channels``; grouped convs under unstructured pruning).
    """
    cfg = run.cfg
    run.remover = ChannelRemover(run.student, run.example) if run.structured else None
    if pruned_only:  # baselines re-fit no layer they do not prune, and fail on unsupported layers
        cfg = replace(cfg, refit_unpruned=False, skip_unsupported=False)
    plan = make_plan(run.student, run.example, cfg, run.remover)
    if pruned_only:
        # ThiNet / CP choose channels without the equal-share-per-group rule a grouped producer needs
        fed_by_grouped = lambda n: (  # noqa: E731
            run.name in ("thinet", "cp") and run.remover is not None and run.remover.channel_groups(n) is not None
        )
        plan = [p for p in plan if p.keep is not None and not fed_by_grouped(p.name)]
        if not plan:
            raise UserError("no layer is pruned with this configuration; check keep, --include and --exclude")
    elif not plan:
        raise UserError("no layer matched for compression; check --include/--exclude patterns")
    run.plan = plan


def finish(
    run: Run, params: Any = None, refine: Callable[[Run], dict[str, Any] | None] | None = None
) -> tuple[nn.Module, CompressReport]:
    """Optional BN recalibration, then the optional holistic refinement, then the report.

    ``params``: a baseline's hyperparameters, recorded. ``refine(run)`` (compress() and every
    baseline pass :func:`crossdistill.mir.refine_step`) may replace ``run.student`` and returns
    what goes into ``report.refine``; it runs after the recalibration, so the statistics it starts
    from are those of the finished method, and the report describes the refined student."""
    if run.cfg.recalibrate_bn:
        recalibrate_bn(run.student, run.images, run.cfg.batch_size)
    refined = refine(run) if refine is not None else None
    student = run.student
    student.eval()
    config = asdict(run.cfg)
    if params is not None:
        config = {**config, "method": run.name, "baseline": asdict(params)}
    report = CompressReport(
        config=config,
        layers=run.records,
        params_before=run.params_before,
        params_after=count_params(student),
        flops_before=run.flops_before,
        flops_after=run.flops.recount(student) if run.flops else count_flops(student, run.example.shape[1:]),
        sparsity=sparsity(student, [p.name for p in run.plan]),
        seconds=time.perf_counter() - run.t_start,
        peak_memory_mb=measure_peak_memory_mb(run.device),
        output_error_on="held-out" if run.heldout is not None else "fit",
        capture=run.capture,
        refine=refined,
    )
    if run.heldout is not None:  # one pass over both image sets gives the output and per-layer errors
        report.heldout = heldout_errors(run.teacher, student, run.images, run.heldout, [p.name for p in run.plan])
        report.output_error = report.heldout["output_error"]
    else:
        kept, ends = run.teacher_output, run.student_output
        known = kept[1] if kept is not None and kept[0] is run.images else None
        same = ends is not None and ends[0] is run.images and ends[2] == _state_versions(student)
        report.output_error = output_error(
            student, run.teacher, run.images, teacher_output=known, student_output=ends[1] if same else None
        )
    _check_coverage(run, report)
    if report.heldout is not None and report.heldout["warning"]:
        warnings.warn(report.heldout["warning"], ShortfallWarning, stacklevel=2)
    student.widths = layer_widths(student)  # type: ignore[attr-defined]
    return student, report


def _state_versions(model: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: any change to the model changes it."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def _check_coverage(run: Run, report: CompressReport) -> None:
    """Fill ``report.left_whole`` / ``shortfall`` (structured runs) and warn when compression fell short."""
    if not run.structured or run.remover is None:
        return
    report.left_whole = left_whole_layers(run.teacher, run.student, run.example, run.cfg, run.remover)
    flops = report.flops_after / max(report.flops_before, 1)
    params = report.params_after / max(report.params_before, 1)
    mismatches = width_mismatches(run.student, run.records)
    report.shortfall = shortfall_message(run.cfg, flops, params, report.left_whole, mismatches)
    if report.shortfall:
        warnings.warn(report.shortfall, ShortfallWarning, stacklevel=3)


# --------------------------------------------------------------------------- the per-layer step


@dataclass
class LayerStep:
    """What a solver sees for one layer: the problem and both input streams (N, C, H, W) or (N, F)."""

    name: str
    layer: nn.Module  # the student's layer, full width on its input side
    problem: LayerProblem
    # both (N, ...): one tensor, or batches on disk when larger than spill_mb (crossdistill.spill)
    hT: torch.Tensor | Batches  # the layer's input inside the teacher (h^S itself when no term uses h^T)
    hS: torch.Tensor | Batches  # the layer's input inside the student, producer still at full width
    batch_size: int

    def stats(self) -> LayerStats:
        """The Gram statistics of h^T and h^S, accumulated batch by batch (the caller frees them)."""
        stats = LayerStats(self.layer, self.problem.terms, self.problem.wT)
        for xT, xS in pairs(self.hT, self.hS, self.batch_size):
            stats.add_batch(xT, xS)
        return stats


def _teacher_inputs(run: Run, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Teacher inputs of every planned layer in one pass, or None when that would exceed teacher_cache_mb
    (large N): then each layer's teacher input is captured when needed."""
    with eval_mode(run.teacher):  # the size probe must not run BN in train mode on one image
        one = capture_inputs(run.teacher, names, run.images[:1])
    cache_mb = len(run.images) * sum(t.numel() * t.element_size() for t in one.values()) / 2**20
    if cache_mb > run.cfg.teacher_cache_mb:
        return None
    bs = run.cfg.batch_size
    with torch.no_grad(), record_inputs(run.teacher, names) as store:
        outs = [run.teacher(run.images[i : i + bs]) for i in range(0, len(run.images), bs)]
    if not run.teacher.training and all(isinstance(o, torch.Tensor) for o in outs):
        run.teacher_output = (run.images, torch.cat(outs))  # eval mode: what finish's output error needs
    return {n: v[0] if len(v) == 1 else torch.cat(v) for n, v in store.items()}  # one batch: no copy


def _channel_groups(run: Run, p: LayerPlan, total: int) -> torch.Tensor | None:
    """Group id per input channel of a layer fed by a grouped conv (LayerProblem.channel_groups), or None.

    Channels outside ``p.channels`` (always kept) are each a group of one, so their share is themselves."""
    assert run.remover is not None
    prunable = run.remover.channel_groups(p.name)
    if prunable is None:
        return None
    chosen = list(range(total)) if p.channels is None else p.channels
    groups = torch.arange(total) + 2**20  # one group per always-kept channel
    groups[torch.tensor(chosen)] = prunable
    return groups


def _student_stream(run: Run, layer_terms: list) -> GraphStream | None:
    """One pass over the student's traced graph for the per-layer inputs, or None (per-layer capture) when
    fx cannot trace the model or the config asks for it; ``run.capture`` says which."""
    run.capture = "per-layer"
    if run.cfg.capture != "one-pass":
        return None
    changed = []
    for p, terms in zip(run.plan, layer_terms, strict=True):
        layer = run.student.get_submodule(p.name)
        total = layer.weight.shape[1]
        if terms is not None and run.structured and p.n_keep(total) < total:
            changed.append(run.remover.touched_modules(p.name, p.channels))
        else:
            changed.append([p.name])
    # finish's output error on the fit images, from the stream's end: eval mode, nothing changing the student after
    ends = run.heldout is None and not run.cfg.recalibrate_bn and run.cfg.refine is None and not run.student.training
    try:
        names = [p.name for p in run.plan]
        stream = GraphStream(run.student, names, changed, run.images, run.cfg.batch_size, run.cfg.spill_mb)
        if ends:
            stream.with_output()
    except GraphUnsupported as e:
        warnings.warn(f"capturing each layer's input with a forward pass per layer: {e}", stacklevel=3)
        return None
    run.capture = "one-pass"
    return stream


def _mask_start(run: Run, name: str, kept: torch.Tensor, width: int) -> None:
    """Record in ``run.start_masks`` that layer ``name``, ``width`` input channels wide, keeps only input
    channels / weights ``kept`` (indices, or a boolean weight mask), combined with what was recorded for it
    before; a layer already narrower than the teacher's cannot be expressed in the teacher's indexing
    (start_masks becomes None: the safety net is skipped)."""
    if run.start_masks is None:
        return
    wT = run.teacher.get_submodule(name).weight
    if width != wT.shape[1]:
        run.start_masks = None
        return
    if kept.dtype == torch.bool:
        mask = kept.detach().clone().cpu()
    else:
        mask = torch.zeros(wT.shape[1], dtype=torch.bool)
        mask[kept.cpu()] = True
    before = run.start_masks.get(name)
    run.start_masks[name] = mask if before is None else before & mask


def _refit_gate_inputs(run: Run, name: str, kept: torch.Tensor) -> None:
    """Re-fit the other readers of the channels about to go from ``name`` (the squeeze conv of a
    squeeze-excite block: it pools the channels it gates) on the channels kept, before they go. Left as
    sliced, the squeeze conv loses part of its input and the gates of the kept channels drift. Objective:
    its own current output from the kept channels alone, ``||W0 h^S - W h^S_kept||^2`` (it was re-fitted
    towards the teacher already, if planned; its output rows may be narrower than the teacher's), solved
    exactly with the run's ridge whatever the method (a baseline's own selection has nothing to choose
    here: every kept column is fixed). The solve's never-worse rule applies."""
    assert run.remover is not None
    total = run.student.get_submodule(name).weight.shape[1]
    dropped = sorted(set(range(total)) - set(kept.tolist()))
    for other, gone in run.remover.other_consumers(name, dropped).items():
        layer = run.student.get_submodule(other)
        c_in = layer.weight.shape[1]
        fixed = torch.tensor(sorted(set(range(c_in)) - set(gone)), dtype=torch.long, device=run.device)
        _mask_start(run, other, fixed, c_in)
        if len(fixed) == 0 or len(fixed) == c_in:
            continue
        hS = capture_input(run.student, other, run.images, run.cfg.batch_size)
        w0 = layer.weight.detach().clone()
        problem = LayerProblem([Term(1.0, 0, 1, 0, 1)], w0, w0.clone(), len(fixed), fixed, True)
        ridge = run.cfg.ridge if isinstance(run.cfg.ridge, float) else LstsqOptions.ridge
        opts = LstsqOptions(
            ridge=ridge, ridge_conditioned=run.cfg.ridge_conditioned, ridge_per_unknown=run.cfg.ridge_per_unknown
        )
        if run.cfg.ridge_guard:  # the same out-of-sample guard as the layer's own re-fit
            res = guard_solve(layer, problem, hS, hS, opts, run.fit_images)[0]
        else:
            stats = LayerStep(other, layer, problem, hS, hS, run.cfg.batch_size).stats()
            res = solve_structured(stats, problem, opts)
            stats.free()
        with torch.no_grad():
            layer.weight.copy_(res.weight.to(layer.weight.dtype).view_as(layer.weight))


def refit_layers(
    run: Run,
    terms_for: Callable[[LayerPlan], list[Term] | None],
    solve: Callable[[LayerStep], SolveResult],
    on_layer: Callable[[int, int, str], None] | None = None,
) -> None:
    """The per-layer step over ``run.plan``, first to last: capture -> stats -> solve -> write -> remove.

    ``terms_for(p)``: the objective of planned layer ``p``, or None to leave it
    as it is (recorded as skipped). ``solve(step)`` returns the new weight and
    what is kept (input-channel indices, or a boolean weight mask). The
    student's input h^S is captured with the layer's producer still at full
    width (docs/method.md, "a subtlety"); the teacher's inputs are captured
    once, up front, when a term uses them. Then the weight is written and the
    pruned channels removed with their producer's outputs (structured), or the
    mask applied (unstructured). BN mode while capturing: the caller's; the teacher's buffers (BN running
    statistics, which a train-mode capture moves) are restored afterwards, so the report's output error and
    any refinement see the teacher as given.
    """
    with buffers_kept(run.teacher):
        _refit_each(run, terms_for, solve, on_layer)


def _refit_each(
    run: Run,
    terms_for: Callable[[LayerPlan], list[Term] | None],
    solve: Callable[[LayerStep], SolveResult],
    on_layer: Callable[[int, int, str], None] | None,
) -> None:
    """refit_layers' loop."""
    cfg, plan = run.cfg, run.plan
    layer_terms = [terms_for(p) for p in plan]
    uses_teacher = any(t.p != 0 or t.r != 0 for terms in layer_terms if terms for t in terms)
    names = [p.name for p in plan]
    # only the layers re-fitted: a layer left as it is (the mu-mix's unpruned ones) needs no teacher input
    refitted = [n for n, terms in zip(names, layer_terms, strict=True) if terms is not None]
    cache = _teacher_inputs(run, refitted) if uses_teacher else None
    stream = _student_stream(run, layer_terms)
    teacher_stream = None
    if uses_teacher and cache is None and stream is not None:
        # too large to keep every layer's teacher input: the teacher's own graph, one pass, live values only
        changed = [[n] for n in names]
        teacher_stream = GraphStream(run.teacher, names, changed, run.images, cfg.batch_size, cfg.spill_mb)
    for i, (p, terms) in enumerate(zip(plan, layer_terms, strict=True)):
        t0 = time.perf_counter()
        if on_layer is not None:
            on_layer(i, len(plan), p.name)
        layer = run.student.get_submodule(p.name)
        wT = run.teacher.get_submodule(p.name).weight.detach()
        total = wT.shape[1] if run.structured else wT.numel()
        if terms is None:
            for st in (stream, teacher_stream):
                if st is not None:
                    st.next_input(collect=False)  # keeps the stream in step; its values are reused later
            run.records.append(LayerRecord(p.name, total, total, 0.0, 0.0, time.perf_counter() - t0, skipped=True))
            continue
        n_keep = p.n_keep(total)
        # a concatenation consumer: the channels outside p.channels are always kept
        fixed = None
        if run.structured and p.channels is not None:
            pinned = torch.ones(total, dtype=torch.bool, device=run.device)
            pinned[torch.tensor(p.channels, device=run.device)] = False
            fixed = pinned.nonzero().flatten()
        if run.structured and p.keep is not None and p.name in cfg.kept_channels:  # channels chosen elsewhere
            fixed = torch.tensor(sorted(cfg.kept_channels[p.name]), device=run.device)
            n_keep = len(fixed)

        # inputs: the student's with the producer still at full width, the teacher's from the cache
        if stream is not None:
            hS = stream.next_input()
        else:
            hS = capture_input(run.student, p.name, run.images, cfg.batch_size)
        if not uses_teacher:
            hT = hS
        elif cache is not None:
            hT = cache.pop(p.name)
        elif teacher_stream is not None:
            hT = teacher_stream.next_input()
        else:
            hT = capture_input(run.teacher, p.name, run.images, cfg.batch_size)
        groups = _channel_groups(run, p, total) if run.structured and n_keep < total else None
        if groups is not None:  # a grouped producer: the same share of each of its groups
            n_keep = sum(group_targets(groups, n_keep).values())
        ties = run.remover.channel_ties(p.name) if run.structured and n_keep < total else None
        w0 = layer.weight.detach().clone()
        problem = LayerProblem(terms, wT, w0, n_keep, fixed, run.structured, groups, ties)
        res = solve(LayerStep(p.name, layer, problem, hT, hS, cfg.batch_size))
        del hS, hT

        # write the solution, then remove the pruned channels (and the producer's outputs)
        with torch.no_grad():
            layer.weight.copy_(res.weight.to(layer.weight.dtype).view_as(layer.weight))
        pruned = run.structured and n_keep < total
        if pruned:
            _refit_gate_inputs(run, p.name, res.kept)
            res.kept = run.remover.remove_input_channels(p.name, res.kept)
            _mask_start(run, p.name, res.kept, total)
        elif not run.structured:
            apply_mask(layer, res.kept)
            _mask_start(run, p.name, res.kept, layer.weight.shape[1])
        kept_channels = res.kept.tolist() if pruned else None
        if res.fell_back:
            warnings.warn(
                f"the re-fit of layer {p.name} ended above its masked start (objective {res.loss_masked:.4g}); "
                "kept the start weights for it",
                stacklevel=2,
            )
        seconds = time.perf_counter() - t0
        record = LayerRecord(
            p.name,
            n_keep,
            total,
            res.loss_before,
            res.loss_after,
            seconds,
            False,
            kept_channels,
            res.rel_error,
            res.fell_back,
        )
        run.records.append(record)
    if stream is not None and len(stream.restart) > len(stream.where):  # set up with with_output()
        out = stream.output()
        if out is not None:
            run.student_output = (run.images, out, _state_versions(run.student))
