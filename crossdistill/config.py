"""CompressConfig: the hyperparameters of one compression run, with the paper's defaults.

A leaf module (no torch import), so the CLI can read its option defaults from
the dataclass without loading the library. ``validate`` checks the fields
themselves; which method names exist is :mod:`crossdistill.methods`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

__all__ = ["CompressConfig", "TARGET_KINDS", "SIGNALS", "DEPTHS", "parse_target"]

TARGET_KINDS = ("flops", "params", "latency")  # a target: this measure of the student / the teacher's
# how a layer's sensitivity to narrowing is measured (crossdistill.allocate; greedy: crossdistill.greedy)
SIGNALS = ("recon", "penultimate", "recon-cv", "penultimate-cv", "magnitude", "greedy")
DEPTHS = ("channels", "blocks", "mixed")  # what a target may remove: channels, residual blocks, or both


# field metadata of the settings read only when a target is given: without one they change nothing (a
# benchmark's cell key leaves them out, benchmarks/bench_accuracy.py)
_BUDGET_ONLY = {"budget_only": True}


@dataclass
class CompressConfig:
    method: str = "ours"  # nc | ours (mu-mix) | ours-s (soft alpha/beta) | correction | imitation | a baseline
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
    # lstsq: relative ridge towards the teacher weights (x mean diag of the Gram); "auto" (with holdout):
    # the one of 1e-3, 1e-2, 0.1, 1 with the smallest held-out output error (compress() only)
    ridge: float | str = 1e-3
    # lstsq: ridge x max(1, unknowns / rows), stronger where a layer sees fewer positions than it has weights.
    # Off by default until the accuracy grid is re-run with it (it changes late VGG layers at K=1 ~115x).
    ridge_conditioned: bool = False
    # lstsq: relative ridge + this x unknowns / rows (solvers.conditioned_ridge). 1.0 keeps every re-fit's
    # held-out error at or below L1's on random-init nets fed noise, but costs trained teachers accuracy
    # where few rows re-fit well (VGG-16 K=1, 2 seeds: NC 78.9 -> 50.9 %, Ours 80.8 -> 28.6 % on validation images,
    # benchmarks/results/sweep_ridge_fashion-mnist.md), so off (0) by default.
    ridge_per_unknown: float = 0.0
    # lstsq structured: each layer's final ridge chosen by two-fold cross-validation over the images
    # (crossdistill.ridgecv); the channels are still chosen at ``ridge``. Off by default: K=1 leaves one
    # image per class, so each half misses the other half's classes (VGG-16 K=1: NC 76.7 vs 78.9 %, Ours 76.3 vs 80.8).
    ridge_cv: bool = False
    # lstsq: per layer, the smallest ridge from ``ridge`` up (then 1e-2 ... 10) whose re-fit is no worse out of
    # sample (two image halves, both ways) than the masked start, else the start (ridgecv.guard_solve). Off by
    # default: fixes most random-init blow-ups but keeps the start in VGG-16's last layers at K=1 (seed 1:
    # NC 79.4 -> 61.0 % on validation images), where each half has seen half the classes.
    # "views": the same per layer, judged on check views of the images (crossdistill.safety.make_views, no halving:
    # every image and class stays in the fit); what the safety net re-runs with when it fires.
    ridge_guard: bool | str = False
    # Safety net of compress() (nc, ours, ours-s, correction, imitation; the baselines ignore it: L1 is the start
    # itself, the others train or select without our re-fit), crossdistill.safety. "views": after the layer-wise
    # re-fit, the student's output error against the teacher on ``safety_views`` check views (horizontal flip +
    # a shift of ``safety_shift`` x the image side, never fitted) is compared with the no-re-fit start's (same
    # channels / weights removed, teacher weights). Above ``safety_slack`` x the start's, the run is redone with
    # ridge_guard="views", and if that is still above (on a second set of views), the start is returned; then, with
    # structured pruning, the L1 start is a second reference (``safety_l1_ratio``): above it, the re-fit on the L1
    # channels or the L1 start is returned. report.safety and a SafetyWarning say so. Checked before recalibrate_bn /
    # refine. Skipped (report.safety says why) with bn_mode="train" (views would change the batch statistics), with
    # dropped blocks, or fewer than 2 images. "off": no check.
    safety: str = "views"
    # views of the first check (one per image, spread over the images; up to 4 per image when fewer), the only cost
    # where the net does not fire: 8 costs ~0.5 teacher pass over ResNet-56's 50 images (16: ~0.8,
    # benchmarks/profile_safety.py --forwards); trained teachers' students sit at 0.11-0.34 x their start there.
    safety_views: int = 8
    # once it fires (or the L1 start is consulted): the guarded re-run guards each layer on this many views, and it,
    # the start and the L1 start are judged on a second set of as many (make_views(second=True)), which no guard saw.
    # 8 let NC on random-init efficientnet_b0 pass 8 second views and miss fresh images at x1.09 of L1; the same 8
    # for the guard and the judgement let Ours-S on mobilenet_v3_small end at x2 of L1 (results/safety_real.md).
    safety_views_fired: int = 16
    safety_shift: float = 0.0625  # shift of each view, as a fraction of the image side (at least 1 pixel)
    # fires when the student's error on the views > slack x the start's. 1: "worse than the start". 0.9 (the
    # re-fit must win by 10 %) was tried on the tiny zoo (views of 4-8 noise images lie nearer the fit than fresh
    # images): it returned starts that were worse on fresh images, 3 students above L1 x1.05 instead of 2.
    safety_slack: float = 1.0
    # the second reference, the L1 start (structured, the method's own channel choice; crossdistill.safety.l1_start),
    # is run when the net fired or the student's error on the views is >= this x its own start's: a re-fit that is
    # not far below its own start may owe that to a bad channel choice (random-init googlenet, Ours: 0.52 x its
    # start, 1.75 vs L1 1.06 on fresh images). Trained teachers' students sit at 0.11-0.34 x their start on 8 views
    # (VGG-16 / ResNet-56, K=1/5, validation images, results/safety_trained_fashion-mnist.md): 0.45 leaves them
    # unchecked (no cost, bit-identical). 0: always; above safety_slack: only when the net fired.
    safety_l1_ratio: float = 0.45
    # once the net has fired, the few images have shown that they can mislead a re-fit: a fired student (or the
    # re-fit on the L1 channels) is kept over the data-free L1 start only if its error on the second views is at most
    # this x the L1 start's, the same 5 % by which "no worse than L1" is judged. At 1.0 a guarded re-run of Ours-S on
    # the tiny MobileNetV3 fitted on 4 noise images won there by 1.4 % and ended at x1.10 of L1 on fresh images.
    # Only where the net fired: students of trained teachers never reach it.
    safety_l1_margin: float = 0.95
    steps: int = 4  # lstsq structured: elimination steps from all channels to the target
    channel_criterion: str = "energy"  # lstsq structured: energy (w'Gw per channel) | norm (official)
    weight_criterion: str = "magnitude"  # unstructured mask: magnitude (official) | energy (w^2 G_ii)
    iterations: int = 3000  # adam: full-batch iterations per layer (official 3000)
    lr: float = 5e-4  # adam: learning rate (official 5e-4; 1e-3 for ResNet-56)
    lr_drop: float = 0.1  # adam structured: lr factor once the mask is fixed
    refit_unpruned: bool = True  # re-fit every conv but the first, pruned or not (official)
    unpruned_objective: str = "same"  # same | nc: objective for layers kept whole (same = no-op for ours)
    include_linear: bool = False  # also process Linear layers (classifier heads included)
    prune_pointwise_linear: bool = True  # Linear layers on channels-last maps (ConvNeXt / MLP blocks): like 1x1 convs
    prune_se: bool = True  # structured: prune squeeze-excite gated widths together with the SE convs
    include: list[str] | None = None  # fnmatch patterns of layer names to consider
    exclude: list[str] | None = None  # fnmatch patterns of layer names to leave alone
    keep_overrides: dict[str, float] = field(default_factory=dict)  # pattern -> keep ratio
    round_to: int = 1  # structured: kept channel counts rounded to a multiple of this (8, 16: what kernels like)
    bn_mode: str = "eval"  # eval | train: BN mode of both networks while capturing
    recalibrate_bn: bool = False  # re-estimate student BN statistics on the few images at the end
    skip_unsupported: bool = False  # leave layers the solvers cannot handle untouched (warn) instead of failing
    batch_size: int = 128  # images per forward while capturing
    teacher_cache_mb: float = 2048  # keep every layer's teacher input in memory up to this size, else per layer
    spill_mb: float = 1024  # a stream's kept activations / one layer's input over all images: on disk beyond this
    device: str = "cpu"  # cpu | cuda | auto
    capture: str = "one-pass"  # one-pass (fx graph, activations reused) | per-layer (a forward pass per layer)
    holdout: float = 0.0  # fraction of the images held out of the fit; the report gives the error on them (per
    # layer and at the output) and ridge="auto" chooses on them
    holdout_seed: int = 0  # which images are held out (run.split_holdout)
    refine: str | None = None  # None | "mir": holistic feature mimicking after the method (crossdistill.mir)
    mir: Any = None  # a crossdistill.mir.MirConfig: settings of refine="mir" and of method "mir" (None: defaults)
    # --- budget (crossdistill.target): per-layer keeps allocated from the few images instead of one keep
    target: dict[str, float] | None = None  # {"flops"|"params"|"latency": fraction of the teacher's}
    # target: how a layer's sensitivity is measured (SIGNALS; crossdistill.allocate), chosen on validation
    # images with the floor (crossdistill.target's docstring): cross-fitted reconstruction error
    signal: str = field(default="recon-cv", metadata=_BUDGET_ONLY)
    depth: str = field(default="channels", metadata=_BUDGET_ONLY)  # channels | blocks (drop residual blocks) | mixed
    # target: no layer keeps less than this fraction of its channels (lowered if need be)
    alloc_floor: float = field(default=0.4, metadata=_BUDGET_ONLY)
    target_tolerance: float = field(default=0.01, metadata=_BUDGET_ONLY)  # relative: FLOPs/params within 1 % of it
    latency_batch: int = field(default=64, metadata=_BUDGET_ONLY)  # batch size at which a latency target is measured
    # latency target: most students timed end to end (each: 3 alternate timings of teacher and student at
    # latency_batch) while the table's target is root-found on the timed ratio (crossdistill.calibrate)
    latency_rounds: int = field(default=8, metadata=_BUDGET_ONLY)
    # structured: layer -> the teacher's input channels to keep, chosen elsewhere (e.g. Torch-Pruning's
    # global pruning); the layer must be in the plan (keep < 1 for it), the solver then only re-fits
    kept_channels: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> None:
        """Check each field's own range; the method name is checked by whoever runs it (methods.py)."""
        if self.solver not in ("lstsq", "adam"):
            raise UserError(f"unknown solver {self.solver!r}; choose 'lstsq' or 'adam'")
        if self.unpruned_objective not in ("same", "nc"):
            raise UserError(f"unpruned_objective must be 'same' or 'nc', got {self.unpruned_objective!r}")
        if self.bn_mode not in ("eval", "train"):
            raise UserError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if self.capture not in ("one-pass", "per-layer"):
            raise UserError(f"capture must be 'one-pass' or 'per-layer', got {self.capture!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise UserError(f"holdout must lie in [0, 1), got {self.holdout}; e.g. 0.2 holds out a fifth of the images")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise UserError(f"round_to must be a whole number >= 1, got {self.round_to!r}; e.g. 8")
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"keep must lie in (0, 1], got {self.keep}; e.g. 0.5 keeps half the channels")
        self._validate_safety()
        if self.refine not in (None, "mir"):
            raise UserError(f"refine must be None or 'mir', got {self.refine!r}")
        if self.mir is not None:
            self.mir.validate()
        for name in ("mu", "alpha", "beta"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must lie in [0, 1], got {v}")
        from .checks import check_compress_options  # late: this module stays free of torch for the CLI

        check_compress_options(self)
        if self.target is not None:
            self._validate_target()

    def _validate_safety(self) -> None:
        """The safety net's fields and ridge_guard's values."""
        if self.safety not in ("views", "off"):
            raise UserError(f"safety must be 'views' or 'off', got {self.safety!r}")
        if self.ridge_guard not in (False, True, "views"):
            raise UserError(f"ridge_guard must be False, True or 'views', got {self.ridge_guard!r}")
        if isinstance(self.safety_views, bool) or not isinstance(self.safety_views, int) or self.safety_views < 1:
            raise UserError(f"safety_views must be a whole number >= 1, got {self.safety_views!r}; e.g. 16")
        if (
            isinstance(self.safety_views_fired, bool)
            or not isinstance(self.safety_views_fired, int)
            or self.safety_views_fired < 1
        ):
            raise UserError(f"safety_views_fired must be a whole number >= 1, got {self.safety_views_fired!r}; e.g. 16")
        if not 0.0 <= self.safety_shift < 0.5:
            raise UserError(f"safety_shift must lie in [0, 0.5), got {self.safety_shift}; e.g. 0.0625 (1/16)")
        if not 0.0 <= self.safety_l1_ratio < float("inf"):
            raise UserError(f"safety_l1_ratio must be a number >= 0, got {self.safety_l1_ratio}; e.g. 0.45")
        if not 0.0 < self.safety_l1_margin <= 1.0:
            raise UserError(f"safety_l1_margin must lie in (0, 1], got {self.safety_l1_margin}; e.g. 0.95")
        if not 0.0 < self.safety_slack < float("inf"):
            raise UserError(f"safety_slack must be a number > 0, got {self.safety_slack}; e.g. 0.9")
        if self.ridge_guard == "views" and (self.solver != "lstsq" or self.bn_mode != "eval"):
            raise UserError('ridge_guard="views" needs solver="lstsq" and bn_mode="eval" (views join the capture)')

    def _validate_target(self) -> None:
        """Settings a target cannot be combined with."""
        parse_target(self.target)
        if self.keep != type(self).__dataclass_fields__["keep"].default:
            raise UserError(f"give either keep ({self.keep}) or a target ({self.target}), not both")
        if self.keep_overrides:
            raise UserError("a target allocates per-layer keeps itself; drop the keep overrides (--keep-file)")
        if self.prune != "structured":
            raise UserError("a target needs structured pruning (--prune structured): zeroed weights save no FLOPs")
        if self.signal not in SIGNALS:
            raise UserError(f"unknown allocation signal {self.signal!r}; choose one of {', '.join(SIGNALS)}")
        if self.depth not in DEPTHS:
            raise UserError(f"unknown depth {self.depth!r}; choose one of {', '.join(DEPTHS)}")
        if not 0.0 < self.alloc_floor <= 1.0:
            raise UserError(f"alloc_floor must lie in (0, 1], got {self.alloc_floor}")
        if self.latency_rounds < 1:
            raise UserError(f"latency_rounds must be at least 1, got {self.latency_rounds}")
        if not 0.0 < self.target_tolerance < 0.5:
            raise UserError(f"target_tolerance must lie in (0, 0.5), got {self.target_tolerance}")


def parse_target(target: Any) -> tuple[str, float]:
    """``{"flops": 0.5}`` -> ("flops", 0.5); one key of :data:`TARGET_KINDS`, a fraction in (0, 1)."""
    if not isinstance(target, dict) or len(target) != 1:
        raise UserError(f"target must be one of {{'flops': f}}, {{'params': f}}, {{'latency': f}}; got {target!r}")
    ((kind, value),) = target.items()
    if kind not in TARGET_KINDS:
        raise UserError(f"unknown target {kind!r}; choose one of {', '.join(TARGET_KINDS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise UserError(
            f"target {kind} must be a fraction of the teacher's in (0, 1), got {value!r}; e.g. 0.5 halves it"
        )
    return kind, float(value)
