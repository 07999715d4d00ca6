"""CP: channel pruning (He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural
Networks", ICCV 2017), a baseline of Bai et al. (AAAI 2020).

For each pruned layer l of the plan (first to last), CP writes the layer's
output as ``sum_c beta_c Z_c`` with ``Z_c`` the contribution of input channel
c and solves the LASSO

    min_beta  1/2 ||Y - sum_c beta_c Z_c||^2 + lambda ||beta||_1,

raising lambda until only ``n_keep`` coefficients are nonzero (CP's channel
selection), then reconstructs the kept weights by linear least squares
``min_W ||Y - W * h^S_kept||^2`` (CP's second step). The other channels are
removed physically (with the producer's filters and BN entries).

Choices the paper leaves open, or that this code adapts:

- Target and inputs as in CP's multi-layer setting: ``Y = W^T * h^T`` (the
  teacher's output of the layer), inputs ``h^S`` (the student's, earlier
  layers already pruned, captured with the producer at full width).
- Samples: every output position and output channel of the few images (CP
  samples 10 positions per image only for speed): the LASSO runs on the exact
  Gram of the channel contributions (``contribution_gram``).
- LASSO solver: FISTA (accelerated proximal gradient, step 1/L with L the
  largest eigenvalue of the Gram) from beta = 1, warm-started along the
  lambda search. Lambda: bisection on a log scale in
  ``[1e-6, 1] x lambda_max`` (``lambda_max = max |Z'Y|`` zeroes every beta)
  until exactly ``n_keep`` channels remain; if the search ends without an
  exact count, the smallest count above ``n_keep`` is cut to the ``n_keep``
  largest ``|beta|``. The count is therefore always exact.
- One pass: the LASSO selection (with its lambda search), then one
  least-squares step; CP's formulation alternates the two, here each runs once.
  Ridge ``1e-3 x mean diag`` towards the teacher's weights, as in compress().
- Structured pruning only. BN mode while capturing: ``config.bn_mode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..objectives import Term
from ..run import CompressReport
from ..solvers import LeastSquares, kept_columns
from .common import Needs, contribution_gram, finish, layerwise, resolve_configs, start, unit_select

__all__ = ["CPConfig", "channel_pruning", "lasso", "lasso_select"]


@dataclass
class CPConfig:
    ridge: float = 1e-3  # least-squares reconstruction: towards the teacher weights (x mean diag of the Gram)
    lasso_iterations: int = 500  # FISTA steps per lambda (stops early at tol)
    lasso_tol: float = 1e-7  # FISTA stop: max |beta change| relative to max |beta|
    search_steps: int = 40  # bisection steps on log(lambda)


def lasso(G: torch.Tensor, b: torch.Tensor, lam: float, beta: torch.Tensor, L: float, hp: CPConfig | None = None):
    """FISTA for ``min 1/2 beta'G beta - b'beta + lam ||beta||_1`` from ``beta``; step ``1/L``.

    Stops after ``hp.lasso_iterations`` steps, or once the largest change of
    beta is below ``hp.lasso_tol`` relative to its largest entry.
    """
    hp = hp or CPConfig()
    tol = hp.lasso_tol
    z, t = beta.clone(), 1.0
    for _ in range(hp.lasso_iterations):
        step = z - (G @ z - b) / L
        new = step.sign() * (step.abs() - lam / L).clamp_min(0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = new + ((t - 1) / t_new) * (new - beta)
        done = float((new - beta).abs().max()) <= tol * max(float(new.abs().max()), 1e-30)
        beta, t = new, t_new
        if done:
            break
    return beta


def lasso_select(
    G: torch.Tensor, b: torch.Tensor, n_keep: int, hp: CPConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept channel indices (exactly ``n_keep``, sorted) and the LASSO coefficients that chose them.

    ``hp.search_steps`` bisection steps on log(lambda); FISTA settings from ``hp`` too.
    """
    hp = hp or CPConfig()
    c = len(G)
    if n_keep >= c:
        return torch.arange(c, device=G.device), torch.ones(c, dtype=G.dtype, device=G.device)
    L = float(torch.linalg.eigvalsh(G).max().clamp_min(1e-30))
    lam_max = float(b.abs().max().clamp_min(1e-30))
    lo, hi = math.log(1e-6 * lam_max), math.log(lam_max)
    beta = torch.ones(c, dtype=G.dtype, device=G.device)
    best = lasso(G, b, math.exp(lo), beta, L, hp)  # weakest penalty: the most channels
    beta = best
    for _ in range(hp.search_steps):
        mid = (lo + hi) / 2
        beta = lasso(G, b, math.exp(mid), beta, L, hp)
        count = int((beta != 0).sum())
        if count == n_keep:
            best = beta
            break
        if count > n_keep:
            lo, best = mid, beta
        else:
            hi = mid
    kept = best.abs().topk(n_keep).indices.sort().values
    return kept, best


def lasso_select_with_fixed(
    G: torch.Tensor, b: torch.Tensor, n_keep: int, fixed: torch.Tensor | None, hp: CPConfig
) -> torch.Tensor:
    """:func:`lasso_select` when the ``fixed`` channels are always kept (a concatenation consumer).

    The fixed channels keep coefficient 1: the LASSO runs on the free channels against the
    target minus the fixed contributions (``b_free - G[free, fixed] 1``). Kept indices, sorted.
    """
    if fixed is None or len(fixed) == 0:
        return lasso_select(G, b, n_keep, hp)[0]
    pinned = torch.zeros(len(G), dtype=torch.bool, device=G.device)
    pinned[fixed.to(G.device)] = True
    free = (~pinned).nonzero().flatten()
    b_free = b[free] - G[free][:, pinned].sum(1)
    chosen, _ = lasso_select(G[free][:, free], b_free, n_keep - int(pinned.sum()), hp)
    return torch.cat([pinned.nonzero().flatten(), free[chosen]]).sort().values


def channel_pruning(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: CPConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """CP: LASSO channel selection and least-squares reconstruction, layer by layer on the few images."""
    cfg, hp = resolve_configs(config, params, CPConfig, overrides)
    run = start("cp", teacher, images, labels, cfg, Needs(structured=True))

    def select(system: LeastSquares, w0: torch.Tensor, n_keep: int, fixed: torch.Tensor | None, ties):
        G, b = contribution_gram(system, w0)  # b = <Z_c, W^T * h^T>
        kept = unit_select(lambda G, b, n, f: lasso_select_with_fixed(G, b, n, f, hp), G, b, n_keep, fixed, ties)
        W = torch.zeros_like(w0, dtype=torch.float64).flatten(1)
        cols = kept_columns(kept, w0)
        W[:, cols] = system.solve(cols, w0.double().flatten(1), hp.ridge).T
        return W.view(w0.shape), kept

    layerwise(run, [Term(1.0, 1, 0, 0, 1)], select)  # ||W^T * h^T - W^S * h^S||^2
    return finish(run, hp)
