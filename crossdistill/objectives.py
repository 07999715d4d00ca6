"""The layer-wise objectives of cross distillation (Bai et al. 2020; docs/method.md).

Notation: ``W^T``/``W^S`` teacher/student weights of one layer, ``h^T``/``h^S``
the layer's input inside the teacher/student on the few-shot batch, ``W * h``
the layer's linear operation taken before BN and the nonlinearity (as in the
official code; the paper writes sigma on both sides). Every loss is the plain
mean squared error over all output elements.

Every objective is a weighted sum of terms of one shape,

    w * || W^T * (p h^T + q h^S)  -  W^S * (r h^T + s h^S) ||^2,

so one :class:`Term` list describes it and both solvers (exact least squares
and Adam) consume that list. The named functions below are the formulas
themselves, kept for reading and for the tests that check the special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Term",
    "objective_terms",
    "METHODS",
    "reconstruction_loss",
    "correction_loss",
    "imitation_loss",
    "cross_loss",
    "soft_inputs",
    "soft_loss",
]

METHODS = ("nc", "ours", "ours-s", "correction", "imitation")


@dataclass(frozen=True)
class Term:
    """``weight * || W^T*(p hT + q hS) - W^S*(r hT + s hS) ||^2``."""

    weight: float
    p: float  # teacher-layer input: p h^T + q h^S
    q: float
    r: float  # student-layer input: r h^T + s h^S
    s: float


def objective_terms(method: str, mu: float = 0.6, alpha: float = 0.5, beta: float = 0.5) -> list[Term]:
    """Terms of a named objective.

    - ``nc``: L^r = ||W^T*h^T - W^S*h^S||^2 (layer-wise distillation, no cross connection)
    - ``correction``: L^c = ||W^T*h^T - W^S*h^T||^2
    - ``imitation``: L^i = ||W^T*h^S - W^S*h^S||^2
    - ``ours``: mu L^c + (1 - mu) L^i (cross distillation)
    - ``ours-s``: ||W^T*(a h^T + (1-a) h^S) - W^S*((1-b) h^T + b h^S)||^2 (soft cross distillation)
    """
    if method == "nc":
        return [Term(1.0, 1, 0, 0, 1)]
    if method == "correction":
        return [Term(1.0, 1, 0, 1, 0)]
    if method == "imitation":
        return [Term(1.0, 0, 1, 0, 1)]
    if method == "ours":
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu must lie in [0, 1], got {mu}")
        return [t for t in (Term(mu, 1, 0, 1, 0), Term(1.0 - mu, 0, 1, 0, 1)) if t.weight > 0]
    if method == "ours-s":
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"alpha and beta must lie in [0, 1], got {alpha}, {beta}")
        return [Term(1.0, alpha, 1.0 - alpha, 1.0 - beta, beta)]
    raise ValueError(f"unknown objective {method!r}; choose one of {', '.join(METHODS)}")


def refits_unpruned_layer(terms: list[Term]) -> bool:
    """Whether the objective can move a layer whose student equals its teacher (W^S = W^T).

    With W^S = W^T each term's residual is W^T*((p-r) h^T + (q-s) h^S); for the
    mu-mix every term has p = r and q = s, so the layer is already optimal and
    re-fitting it is a no-op (docs/method.md, "Objectives"). Compared with a
    tolerance: ``ours-s`` with alpha + beta = 1 in floating point (0.3, 0.7) gives
    r = 1 - 0.7 = 0.30000000000000004, which is still p = r.
    """
    return any(abs(t.p - t.r) > 1e-9 or abs(t.q - t.s) > 1e-9 for t in terms)


# ------------------------------------------------------------------ the formulas, on layer outputs


def reconstruction_loss(yT_hT: torch.Tensor, yS_hS: torch.Tensor) -> torch.Tensor:
    """L^r = mean (W^T*h^T - W^S*h^S)^2 (variant NC)."""
    return F.mse_loss(yS_hS, yT_hT)


def correction_loss(yT_hT: torch.Tensor, yS_hT: torch.Tensor) -> torch.Tensor:
    """L^c = mean (W^T*h^T - W^S*h^T)^2: the teacher's input fed to the student layer."""
    return F.mse_loss(yS_hT, yT_hT)


def imitation_loss(yT_hS: torch.Tensor, yS_hS: torch.Tensor) -> torch.Tensor:
    """L^i = mean (W^T*h^S - W^S*h^S)^2: the student's input fed to the teacher layer."""
    return F.mse_loss(yS_hS, yT_hS)


def cross_loss(
    yT_hT: torch.Tensor, yT_hS: torch.Tensor, yS_hT: torch.Tensor, yS_hS: torch.Tensor, mu: float
) -> dict[str, torch.Tensor]:
    """Cross distillation: ``loss = mu L^c + (1 - mu) L^i``; returns the named terms too."""
    lc, li = correction_loss(yT_hT, yS_hT), imitation_loss(yT_hS, yS_hS)
    return {"loss": mu * lc + (1 - mu) * li, "correction": lc, "imitation": li}


def soft_inputs(hT: torch.Tensor, hS: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft cross inputs: (a h^T + (1-a) h^S for the teacher layer, (1-b) h^T + b h^S for the student)."""
    return alpha * hT + (1 - alpha) * hS, (1 - beta) * hT + beta * hS


def soft_loss(yT_hhatT: torch.Tensor, yS_hhatS: torch.Tensor) -> torch.Tensor:
    """L^s = mean (W^T*h^_T - W^S*h^_S)^2 on the soft-mixed inputs (variant Ours-S)."""
    return F.mse_loss(yS_hhatS, yT_hhatT)


def terms_loss(terms: list[Term], layer_fn, wT: torch.Tensor, wS: torch.Tensor, hT, hS) -> torch.Tensor:
    """Evaluate a term list directly on inputs: the reference the solvers are checked against."""
    total = hT.new_zeros(())
    for t in terms:
        target = layer_fn(t.p * hT + t.q * hS, wT)
        total = total + t.weight * F.mse_loss(layer_fn(t.r * hT + t.s * hS, wS), target)
    return total
