"""ThiNet (Luo, Wu, Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
Compression", ICCV 2017), a baseline of Bai et al. (AAAI 2020).

For each pruned layer l of the plan (first to last), ThiNet chooses which of
its input channels to keep from the *next* layer's point of view: the output
of layer l is ``y = sum_c Z_c`` with ``Z_c`` the contribution of input channel
c. Greedily, it grows the removal set T by the channel that keeps
``||sum_{c in T} Z_c||^2`` smallest until ``C - n_keep`` channels are in T
(ThiNet's Algorithm 1), then rescales the kept channels by least squares,
``r = argmin ||y - sum_{c not in T} r_c Z_c||^2`` and ``W[:, c] <- r_c W[:, c]``
(ThiNet's "minimize the reconstruction error" step). The removed channels
are then taken out physically (with the producer's filters and BN entries).

Choices the paper leaves open, or that this code adapts:

- Inputs: the student's own input h^S, captured layer by layer on the few
  images (earlier layers already pruned, the producer still at full width);
  the target is the current layer's output on it, ``y = W^T * h^S`` (ThiNet
  reconstructs each layer's own output on the pruned model's activations).
- Samples: every output position and output channel of the few images, not
  ThiNet's random subset (which only saves time): the selection uses the
  exact Gram of the channel contributions (``contribution_gram``).
- Bias and BN play no part (the pre-BN linear output is reconstructed).
- Reconstruction: ``reconstruct="scale"`` (ThiNet: one scale per kept
  channel; ridge ``1e-3 x mean diag`` towards 1), or ``"lstsq"``: full ridge
  least squares of the kept weights (ridge towards the teacher's weights,
  as in compress()).
- No fine-tuning between layers (ThiNet fine-tunes after each layer on the
  full data set; with a few images that is the BP baseline's job).
- Structured pruning only. BN mode while capturing: ``config.bn_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import UserError
from ..objectives import Term
from ..run import CompressReport
from ..solvers import LeastSquares, kept_columns, ridge_solve
from .common import Needs, contribution_gram, finish, layerwise, resolve_configs, start, unit_select

__all__ = ["ThiNetConfig", "thinet", "greedy_removal"]


@dataclass
class ThiNetConfig:
    # lstsq: least-squares weight reconstruction, as docs/method.md states the baseline; scale: ThiNet's one factor per
    # kept channel (on the few-shot ResNet-20, K=1, it drops accuracy from 88.7% to 32%)
    reconstruct: str = "lstsq"
    ridge: float = 1e-3  # scale: towards 1; lstsq: towards the teacher weights (x mean diag of the Gram)


def greedy_removal(G: torch.Tensor, n_keep: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """ThiNet's greedy selection on the contribution Gram ``G`` (C, C): kept indices (sorted).

    Adds to the removal set T the channel that minimises ``1_T' G 1_T`` until
    ``C - n_keep`` are removed. ``fixed``: channels never removed (counted in ``n_keep``).
    """
    c = len(G)
    alive = torch.ones(c, dtype=torch.bool, device=G.device)
    removable = torch.ones(c, dtype=torch.bool, device=G.device)
    if fixed is not None:
        removable[fixed.to(G.device)] = False
    cross = torch.zeros(c, dtype=G.dtype, device=G.device)  # G 1_T
    value = torch.zeros((), dtype=G.dtype, device=G.device)  # 1_T' G 1_T
    diag = G.diagonal()
    for _ in range(c - n_keep):
        cand = value + 2 * cross + diag  # energy of T + {j}
        cand[~(alive & removable)] = float("inf")
        j = int(cand.argmin())
        value = cand[j]
        cross += G[:, j]
        alive[j] = False
    return alive.nonzero().flatten()


def thinet(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: ThiNetConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """ThiNet: greedy channel removal and least-squares reconstruction, layer by layer on the few images."""
    cfg, hp = resolve_configs(config, params, ThiNetConfig, overrides)
    if hp.reconstruct not in ("scale", "lstsq"):
        raise UserError(f"reconstruct must be 'scale' or 'lstsq', got {hp.reconstruct!r}")
    run = start("thinet", teacher, images, labels, cfg, Needs(structured=True))

    def select(system: LeastSquares, w0: torch.Tensor, n_keep: int, fixed: torch.Tensor | None, ties):
        G, b = contribution_gram(system, w0)  # target y = W^T * h^S, so b = G 1
        kept = unit_select(lambda G, _b, n, f: greedy_removal(G, n, f), G, b, n_keep, fixed, ties)
        W = torch.zeros_like(w0, dtype=torch.float64).flatten(1)
        cols = kept_columns(kept, w0)
        if hp.reconstruct == "scale":
            ones = torch.ones(len(kept), 1, dtype=G.dtype, device=G.device)
            # normal equations of min_r ||y - Z_K r||^2: G_KK r = b_K (ridge towards r = 1)
            r = ridge_solve(G[kept][:, kept], b[kept, None], hp.ridge, ones)[:, 0]  # (K,)
            kk = len(cols) // len(kept)
            W[:, cols] = w0.double().flatten(1)[:, cols] * r.repeat_interleave(kk)[None, :]
        else:
            W[:, cols] = system.solve(cols, w0.double().flatten(1), hp.ridge).T
        return W.view(w0.shape), kept

    layerwise(run, [Term(1.0, 0, 1, 0, 1)], select)  # ||W^T * h^S - W^S * h^S||^2
    return finish(run, hp)
