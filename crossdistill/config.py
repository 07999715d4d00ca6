"""CompressConfig: the hyperparameters of one compression run, with the paper's defaults.

A leaf module (no torch import), so the CLI can read its option defaults from
the dataclass without loading the library. ``validate`` checks the fields
themselves; which method names exist is :mod:`crossdistill.methods`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

__all__ = ["CompressConfig"]


@dataclass
class CompressConfig:
    method: str = "ours"  # nc | ours (mu-mix) | ours-s (soft alpha/beta) | correction | imitation | a baseline
    mu: float = 0.6  # ours: mu L^c + (1-mu) L^i; official 0.6 for VGG-16, 0.9 for ResNet-56
    # ours-s: the teacher layer sees alpha h^T + (1-alpha) h^S, the student layer (1-beta) h^T + beta h^S.
    # 0.7/0.7 came from a small sweep on the ResNet-20 teacher (K=1 and 5, a 2000-image test slice);
    # alpha + beta > 1 lets unpruned layers absorb upstream error like NC does.
    alpha: float = 0.7
    beta: float = 0.7
    prune: str = "structured"  # structured (input channels, physically removed) | unstructured (weights)
    keep: float = 0.5  # fraction of channels / weights kept in each pruned layer
    solver: str = "lstsq"  # lstsq (exact ridge least squares) | adam (official schedule)
    # lstsq: relative ridge towards the teacher weights (x mean diag of the Gram); "auto" (with holdout):
    # the one of 1e-3, 1e-2, 0.1, 1 with the smallest held-out output error (compress() only)
    ridge: float | str = 1e-3
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
    holdout: float = 0.0  # fraction of the images held out of the fit; the report gives the error on them
    round_to: int = 1  # structured: kept channel counts rounded to a multiple of this (8, 16: what kernels like)
    bn_mode: str = "eval"  # eval | train: BN mode of both networks while capturing
    recalibrate_bn: bool = False  # re-estimate student BN statistics on the few images at the end
    skip_unsupported: bool = False  # leave layers the solvers cannot handle untouched (warn) instead of failing
    batch_size: int = 128  # images per forward while capturing
    teacher_cache_mb: float = 2048  # keep every layer's teacher input in memory up to this size, else per layer
    device: str = "cpu"  # cpu | cuda | auto

    def validate(self) -> None:
        """Check each field's own range; the method name is checked by whoever runs it (methods.py)."""
        if self.solver not in ("lstsq", "adam"):
            raise UserError(f"unknown solver {self.solver!r}; choose 'lstsq' or 'adam'")
        if self.unpruned_objective not in ("same", "nc"):
            raise UserError(f"unpruned_objective must be 'same' or 'nc', got {self.unpruned_objective!r}")
        if self.bn_mode not in ("eval", "train"):
            raise UserError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise UserError(f"holdout must lie in [0, 1), got {self.holdout}; e.g. 0.2 holds out a fifth of the images")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise UserError(f"round_to must be a whole number >= 1, got {self.round_to!r}; e.g. 8")
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"keep must lie in (0, 1], got {self.keep}; e.g. 0.5 keeps half the channels")
        for name in ("mu", "alpha", "beta"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must lie in [0, 1], got {v}")
        from .checks import check_compress_options  # late: this module stays free of torch for the CLI

        check_compress_options(self)
