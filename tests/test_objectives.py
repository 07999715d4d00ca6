"""The objectives of docs/method.md: named formulas, their term lists, and the special cases the spec lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill.objectives import (
    METHODS,
    correction_loss,
    cross_loss,
    imitation_loss,
    objective_terms,
    reconstruction_loss,
    refits_unpruned_layer,
    soft_inputs,
    soft_loss,
    terms_loss,
)
from crossdistill.solvers import layer_fn


@pytest.fixture
def case():
    """A random conv layer with distinct teacher/student weights and distinct inputs h^T, h^S."""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    fn = layer_fn(layer)
    wT = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    wS = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    hT = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    hS = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    return fn, wT, wS, hT, hS


def _named(fn, wT, wS, hT, hS):
    """The four layer products and the three named losses (L^r, L^c, L^i)."""
    yT_hT, yT_hS, yS_hT, yS_hS = fn(hT, wT), fn(hS, wT), fn(hT, wS), fn(hS, wS)
    return {
        "r": reconstruction_loss(yT_hT, yS_hS),
        "c": correction_loss(yT_hT, yS_hT),
        "i": imitation_loss(yT_hS, yS_hS),
        "products": (yT_hT, yT_hS, yS_hT, yS_hS),
    }


def test_named_losses_are_mean_squared_errors_of_the_layer_products(case) -> None:
    fn, wT, wS, hT, hS = case
    L = _named(fn, wT, wS, hT, hS)
    torch.testing.assert_close(L["r"], (fn(hT, wT) - fn(hS, wS)).pow(2).mean())
    torch.testing.assert_close(L["c"], (fn(hT, wT) - fn(hT, wS)).pow(2).mean())
    torch.testing.assert_close(L["i"], (fn(hS, wT) - fn(hS, wS)).pow(2).mean())
    assert len({float(L[k]) for k in "rci"}) == 3  # the case is generic: the three losses differ


@pytest.mark.parametrize(
    "alpha,beta,which",
    [(1.0, 1.0, "r"), (1.0, 0.0, "c"), (0.0, 1.0, "i")],
    ids=["soft_1_1_is_nc", "soft_1_0_is_correction", "soft_0_1_is_imitation"],
)
def test_soft_loss_special_cases_match_the_named_losses(case, alpha, beta, which) -> None:
    fn, wT, wS, hT, hS = case
    L = _named(fn, wT, wS, hT, hS)
    hhT, hhS = soft_inputs(hT, hS, alpha, beta)
    torch.testing.assert_close(soft_loss(fn(hhT, wT), fn(hhS, wS)), L[which])
    terms = objective_terms("ours-s", alpha=alpha, beta=beta)
    torch.testing.assert_close(terms_loss(terms, fn, wT, wS, hT, hS), L[which])


def test_soft_inputs_mix_as_specified(case) -> None:
    _, _, _, hT, hS = case
    hhT, hhS = soft_inputs(hT, hS, 0.3, 0.8)
    torch.testing.assert_close(hhT, 0.3 * hT + 0.7 * hS)
    torch.testing.assert_close(hhS, 0.2 * hT + 0.8 * hS)


@pytest.mark.parametrize("mu,which", [(1.0, "c"), (0.0, "i")], ids=["mu1_is_correction", "mu0_is_imitation"])
def test_ours_endpoints_of_mu_are_correction_and_imitation(case, mu, which) -> None:
    fn, wT, wS, hT, hS = case
    L = _named(fn, wT, wS, hT, hS)
    out = cross_loss(*L["products"], mu=mu)
    torch.testing.assert_close(out["loss"], L[which])
    terms = objective_terms("ours", mu=mu)
    assert len(terms) == 1  # the zero-weight term is dropped
    torch.testing.assert_close(terms_loss(terms, fn, wT, wS, hT, hS), L[which])


def test_cross_loss_returns_the_named_terms_and_their_mu_mix(case) -> None:
    fn, wT, wS, hT, hS = case
    L = _named(fn, wT, wS, hT, hS)
    out = cross_loss(*L["products"], mu=0.6)
    assert set(out) == {"loss", "correction", "imitation"}
    torch.testing.assert_close(out["correction"], L["c"])
    torch.testing.assert_close(out["imitation"], L["i"])
    torch.testing.assert_close(out["loss"], 0.6 * L["c"] + 0.4 * L["i"])
    torch.testing.assert_close(terms_loss(objective_terms("ours", mu=0.6), fn, wT, wS, hT, hS), out["loss"])


@pytest.mark.parametrize("method,which", [("nc", "r"), ("correction", "c"), ("imitation", "i")])
def test_single_term_methods_equal_their_named_loss(case, method, which) -> None:
    fn, wT, wS, hT, hS = case
    L = _named(fn, wT, wS, hT, hS)
    torch.testing.assert_close(terms_loss(objective_terms(method), fn, wT, wS, hT, hS), L[which])


def test_soft_loss_general_alpha_beta_matches_terms_loss(case) -> None:
    fn, wT, wS, hT, hS = case
    hhT, hhS = soft_inputs(hT, hS, 0.3, 0.8)
    terms = objective_terms("ours-s", alpha=0.3, beta=0.8)
    torch.testing.assert_close(terms_loss(terms, fn, wT, wS, hT, hS), soft_loss(fn(hhT, wT), fn(hhS, wS)))


def test_every_method_has_terms() -> None:
    for method in METHODS:
        terms = objective_terms(method)
        assert terms and all(t.weight > 0 for t in terms)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "ours", "mu": -0.1},
        {"method": "ours", "mu": 1.5},
        {"method": "ours-s", "alpha": 1.2},
        {"method": "ours-s", "beta": -0.5},
        {"method": "fitnet"},
        {"method": ""},
    ],
)
def test_invalid_parameters_raise_value_error(kwargs) -> None:
    with pytest.raises(ValueError):
        objective_terms(**kwargs)


def test_ours_does_not_refit_unpruned_layers_and_nc_does() -> None:
    assert not refits_unpruned_layer(objective_terms("ours", mu=0.6))
    assert not refits_unpruned_layer(objective_terms("ours", mu=0.0))
    assert not refits_unpruned_layer(objective_terms("correction"))
    assert not refits_unpruned_layer(objective_terms("imitation"))
    assert refits_unpruned_layer(objective_terms("nc"))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 0.9), (0.2, 0.3)])
def test_soft_refits_unpruned_layer_when_alpha_plus_beta_is_not_one(case, alpha, beta) -> None:
    fn, wT, _, hT, hS = case
    terms = objective_terms("ours-s", alpha=alpha, beta=beta)
    assert refits_unpruned_layer(terms)
    # at W^S = W^T the residual is (alpha+beta-1) W^T*(h^T - h^S): nonzero, so the layer would move
    residual = (alpha + beta - 1) * fn(hT - hS, wT)
    torch.testing.assert_close(terms_loss(terms, fn, wT, wT, hT, hS), residual.pow(2).mean())
    assert float(terms_loss(terms, fn, wT, wT, hT, hS)) > 1e-3


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.7, 0.1, 0.0, 1.0])
def test_soft_with_alpha_plus_beta_one_is_optimal_at_the_teacher(case, alpha) -> None:
    fn, wT, _, hT, hS = case
    beta = 1.0 - alpha
    terms = objective_terms("ours-s", alpha=alpha, beta=beta)
    assert float(terms_loss(terms, fn, wT, wT, hT, hS)) < 1e-20  # zero residual at W^S = W^T
    assert not refits_unpruned_layer(terms)  # so re-fitting an unpruned layer is a no-op


def test_mu_mix_is_zero_at_the_teacher_for_every_mu(case) -> None:
    fn, wT, _, hT, hS = case
    for mu in (0.0, 0.3, 0.9, 1.0):
        assert float(terms_loss(objective_terms("ours", mu=mu), fn, wT, wT, hT, hS)) == 0.0


def test_all_variants_coincide_when_student_input_equals_teacher_input(case) -> None:
    """The first pruned layer has h^S = h^T, so every objective is the same loss there (docs/method.md)."""
    fn, wT, wS, hT, _ = case
    ref = terms_loss(objective_terms("nc"), fn, wT, wS, hT, hT)
    for method in METHODS:
        torch.testing.assert_close(terms_loss(objective_terms(method), fn, wT, wS, hT, hT), ref)
