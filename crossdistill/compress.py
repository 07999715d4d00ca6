"""Layer-wise cross distillation: teacher + a few images -> smaller student + report.

Reads top to bottom: config, checks, plan, then one loop over layers
(capture h^T and h^S once, solve, write the weights, remove channels).

BN mode (a deliberate choice, see METHOD.md): features are captured with
both networks in eval mode, so BN uses the teacher's running statistics and
the capture is deterministic. ``bn_mode="train"`` mimics the official VGG
runs (batch statistics of the few-shot set). ``recalibrate_bn=True``
re-estimates the student's BN running statistics on the few-shot images at
the end (the official VGG runs do this implicitly).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import capture_input, capture_inputs
from .errors import UserError
from .evaluate import count_flops
from .mir import MirConfig, mir_refine, zero_masks
from .objectives import METHODS, objective_terms, refits_unpruned_layer
from .plan import LayerPlan, make_plan
from .pruning import ChannelRemover, apply_mask, sparsity
from .solvers import LayerStats, SolveResult, adam_solve, solve_grouped, solve_structured, solve_unstructured
from .structure import layer_widths

__all__ = [
    "official_mu",
    "CompressConfig",
    "CompressReport",
    "LayerRecord",
    "compress",
    "check_images",
    "recalibrate_bn",
]


@dataclass
class CompressConfig:
    method: str = "ours"  # nc | ours (mu-mix) | ours-s (soft alpha/beta) | correction | imitation
    mu: float = 0.6  # ours: mu L^c + (1-mu) L^i; official 0.6 for VGG-16, 0.9 for ResNet-56
    # ours-s: the teacher layer sees alpha h^T + (1-alpha) h^S, the student layer (1-beta) h^T + beta h^S.
    # 0.7/0.7 confirmed on validation images of the train split, disjoint from the draw (never test):
    # benchmarks/sweep_hparams.py, ResNet-20 K=1, 3 seeds: 89.9 %, 0.6..0.8 within 0.3 pt, 0.5/0.5 87.4;
    # alpha + beta > 1 lets unpruned layers absorb upstream error like NC does.
    alpha: float = 0.7
    beta: float = 0.7
    prune: str = "structured"  # structured (input channels, physically removed) | unstructured (weights)
    keep: float = 0.5  # fraction of channels / weights kept in each pruned layer
    solver: str = "lstsq"  # lstsq (exact ridge least squares) | adam (official schedule)
    ridge: float = 1e-3  # lstsq: relative ridge towards the teacher weights (x mean diag of the Gram)
    steps: int = 4  # lstsq structured: elimination steps from all channels to the target
    channel_criterion: str = "energy"  # lstsq structured: energy (w'Gw per channel) | norm (official)
    weight_criterion: str = "magnitude"  # unstructured mask: magnitude (official) | energy (w^2 G_ii)
    iterations: int = 3000  # adam: full-batch iterations per layer (official 3000)
    lr: float = 5e-4  # adam: learning rate (official 5e-4; 1e-3 for ResNet-56)
    lr_drop: float = 0.1  # adam structured: lr factor once the mask is fixed
    refit_unpruned: bool = True  # re-fit every conv but the first, pruned or not (official)
    unpruned_objective: str = "same"  # same | nc: objective for layers kept whole (same = no-op for ours)
    include_linear: bool = False  # also process Linear layers
    include: list[str] | None = None  # fnmatch patterns of layer names to consider
    exclude: list[str] | None = None  # fnmatch patterns of layer names to leave alone
    keep_overrides: dict[str, float] = field(default_factory=dict)  # pattern -> keep ratio
    bn_mode: str = "eval"  # eval | train: BN mode of both networks while capturing
    recalibrate_bn: bool = False  # re-estimate student BN statistics on the few images at the end
    skip_unsupported: bool = False  # leave layers the solvers cannot handle untouched (warn) instead of failing
    batch_size: int = 128  # images per forward while capturing
    teacher_cache_mb: float = 2048  # keep every layer's teacher input in memory up to this size, else per layer
    device: str = "cpu"  # cpu | cuda | auto
    refine: str | None = None  # None | "mir": holistic feature mimicking after the method (crossdistill.mir)
    mir: MirConfig | None = None  # settings of refine="mir" and of method "mir" (None: MirConfig defaults)

    def validate(self) -> None:
        from .baselines import BASELINES  # late: the baselines build on this module

        if self.method not in METHODS and self.method not in BASELINES:
            names = ", ".join((*METHODS, *BASELINES))
            raise UserError(f"unknown method {self.method!r}; choose one of {names}")
        if self.solver not in ("lstsq", "adam"):
            raise UserError(f"unknown solver {self.solver!r}; choose 'lstsq' or 'adam'")
        if self.unpruned_objective not in ("same", "nc"):
            raise UserError(f"unpruned_objective must be 'same' or 'nc', got {self.unpruned_objective!r}")
        if self.bn_mode not in ("eval", "train"):
            raise UserError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"keep must lie in (0, 1], got {self.keep}; e.g. 0.5 keeps half the channels")
        if self.refine not in (None, "mir"):
            raise UserError(f"refine must be None or 'mir', got {self.refine!r}")
        if self.mir is not None:
            self.mir.validate()
        for name in ("mu", "alpha", "beta"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must lie in [0, 1], got {v}")


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
    refine: dict[str, Any] | None = None  # refine="mir" / method mir: mir_refine's info (steps, losses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def official_mu(model: nn.Module) -> float:
    """The official release's mu: 0.9 for the CIFAR ResNets, 0.6 otherwise (VGG-16)."""
    from .models import ResNet

    return 0.9 if isinstance(model, ResNet) else 0.6


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
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"model weight {name} contains NaN or inf; the checkpoint is corrupt")
    try:
        with torch.no_grad():
            model(images[:1])
    except RuntimeError as e:
        raise UserError(f"the model cannot run on images of shape {tuple(images.shape[1:])}: {e}") from e


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
    """CUDA: peak allocated on the device during compress(); CPU: peak RSS of the whole process so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    """
    cfg = copy.deepcopy(config) if config is not None else CompressConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"unknown compression setting {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    if cfg.method not in METHODS:
        raise UserError(f"compress() runs {', '.join(METHODS)}; use run_method() for baseline {cfg.method!r}")
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # setup: copies of the teacher on the device, checked images, objective terms
    teacher = copy.deepcopy(teacher).to(device).eval()
    images = images.to(device)
    check_images(teacher, images)
    student = copy.deepcopy(teacher)
    if cfg.bn_mode == "train":
        teacher.train()
        student.train()
    terms = objective_terms(cfg.method, cfg.mu, cfg.alpha, cfg.beta)
    example = images[:1]
    params_before = sum(p.numel() for p in student.parameters())
    flops_before = count_flops(student, example.shape[1:])

    # plan: layers in forward order with their keep ratios
    remover = ChannelRemover(student, example) if cfg.prune == "structured" else None
    plan: list[LayerPlan] = make_plan(
        student, example, cfg.prune, cfg.keep, cfg.include, cfg.exclude, cfg.keep_overrides,
        cfg.include_linear, cfg.refit_unpruned, remover, cfg.skip_unsupported,
    )  # fmt: skip
    if not plan:
        raise UserError("no layer matched for compression; check --include/--exclude patterns")

    # teacher inputs of every planned layer: one pass, kept for the whole run, unless that would
    # exceed teacher_cache_mb (large N): then each layer's teacher input is captured when needed
    names = [p.name for p in plan]
    one = capture_inputs(teacher, names, images[:1])
    cache_mb = len(images) * sum(t.numel() * t.element_size() for t in one.values()) / 2**20
    hT_all = capture_inputs(teacher, names, images, cfg.batch_size) if cache_mb <= cfg.teacher_cache_mb else None
    # Unpruned layers: the mu-mix leaves them as they are (W^S = W^T is optimal); "nc" re-fits them
    # with L^r to absorb the error accumulated before them (METHOD.md: "a question to measure").
    unpruned_terms = objective_terms("nc") if cfg.unpruned_objective == "nc" else terms
    moves_unpruned = refits_unpruned_layer(unpruned_terms)
    records: list[LayerRecord] = []
    for i, p in enumerate(plan):
        t0 = time.perf_counter()
        if on_layer is not None:
            on_layer(i, len(plan), p.name)
        layer = student.get_submodule(p.name)
        wT = teacher.get_submodule(p.name).weight.detach()
        hT = hT_all.pop(p.name) if hT_all is not None else capture_input(teacher, p.name, images, cfg.batch_size)
        structured = cfg.prune == "structured"
        total = wT.shape[1] if structured else wT.numel()
        if p.keep is None and not moves_unpruned:
            records.append(LayerRecord(p.name, total, total, 0.0, 0.0, time.perf_counter() - t0, skipped=True))
            continue
        n_keep = p.n_keep(total)
        layer_terms = unpruned_terms if p.keep is None else terms
        # a concatenation consumer: the channels outside p.channels are always kept
        fixed = None
        if structured and p.channels is not None:
            pinned = torch.ones(total, dtype=torch.bool, device=device)
            pinned[torch.tensor(p.channels, device=device)] = False
            fixed = pinned.nonzero().flatten()
        grouped = getattr(layer, "groups", 1) != 1  # grouped / depthwise conv: solved group by group

        # student input with the producer still at full width (METHOD.md, "a subtlety")
        hS = capture_input(student, p.name, images, cfg.batch_size)
        w0 = layer.weight.detach().clone()
        if cfg.solver == "adam":
            res: SolveResult = adam_solve(
                layer, layer_terms, hT, hS, wT, w0, n_keep, structured, cfg.iterations, cfg.lr, cfg.lr_drop, fixed
            )
        elif grouped:
            res = solve_grouped(layer, layer_terms, hT, hS, wT, w0, None if structured else n_keep, cfg.ridge,
                                cfg.weight_criterion, cfg.batch_size)  # fmt: skip
        else:
            stats = LayerStats(layer)
            for j in range(0, len(hT), cfg.batch_size):
                stats.add_batch(hT[j : j + cfg.batch_size], hS[j : j + cfg.batch_size])
            if structured:
                res = solve_structured(
                    stats, layer_terms, wT, w0, n_keep, cfg.ridge, cfg.steps, cfg.channel_criterion, fixed
                )
            else:
                res = solve_unstructured(stats, layer_terms, wT, w0, n_keep, cfg.ridge, cfg.weight_criterion)
            stats.free()
        del hS, hT

        # write the solution, then remove the pruned channels (and the producer's outputs)
        with torch.no_grad():
            layer.weight.copy_(res.weight)
        if structured:
            if n_keep < total:
                remover.remove_input_channels(p.name, res.kept)
        else:
            apply_mask(layer, res.kept)
        kept_channels = res.kept.tolist() if structured and n_keep < total else None
        records.append(
            LayerRecord(p.name, n_keep, total, res.loss_before, res.loss_after, time.perf_counter() - t0,
                        kept_channels=kept_channels)
        )  # fmt: skip

    if cfg.recalibrate_bn:
        recalibrate_bn(student, images, cfg.batch_size)
    refined = None
    if cfg.refine == "mir":  # holistic refinement from the layer-wise solution (crossdistill.mir)
        masks = None if cfg.prune == "structured" else zero_masks(student, [p.name for p in plan])
        student, refined = mir_refine(student, teacher.eval(), images, cfg.mir, masks=masks)
    student.eval()
    report = CompressReport(
        config=asdict(cfg),
        layers=records,
        params_before=params_before,
        params_after=sum(p.numel() for p in student.parameters()),
        flops_before=flops_before,
        flops_after=count_flops(student, example.shape[1:]),
        sparsity=sparsity(student, [p.name for p in plan]),
        seconds=time.perf_counter() - t_start,
        peak_memory_mb=measure_peak_memory_mb(device),
        refine=refined,
    )
    student.widths = layer_widths(student)  # type: ignore[attr-defined]
    return student, report
