"""ridge_cv / ridge_guard: each layer's ridge chosen on two image halves (crossdistill.ridgecv)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from crossdistill.config import CompressConfig
from crossdistill.errors import UserError
from crossdistill.methods import run_method
from crossdistill.objectives import objective_terms
from crossdistill.ridgecv import CV_RIDGES, cv_solve_structured, guard_solve
from crossdistill.solvers import LayerProblem, LayerStats, LstsqOptions, solve_structured

OPTS = LstsqOptions(ridge_conditioned=False)


def _problem(g: torch.Generator, n_keep: int) -> tuple[nn.Conv2d, LayerProblem]:
    wT = torch.randn(32, 64, 1, 1, generator=g)
    return nn.Conv2d(64, 32, 1, bias=False), LayerProblem(objective_terms("nc"), wT, wT.clone(), n_keep)


def test_cv_keeps_the_start_where_the_removed_channels_were_independent_noise() -> None:
    # independent inputs: the teacher's kept weights are already the best fit, a re-fit only chases noise
    g = torch.Generator().manual_seed(0)
    layer, problem = _problem(g, 16)
    hT = torch.randn(6, 64, 2, 2, generator=g)
    res, ridge = cv_solve_structured(layer, problem, hT, hT + torch.randn(hT.shape, generator=g), OPTS)
    assert ridge == max(CV_RIDGES)
    assert len(res.kept) == 16 and res.loss_after <= res.loss_masked + 1e-9


def test_cv_refits_freely_where_the_kept_channels_carry_the_removed_ones() -> None:
    # 64 channels mixed from 16 factors: the kept half spans them, so an (almost) exact re-fit generalises
    g = torch.Generator().manual_seed(0)
    layer, problem = _problem(g, 32)
    mix, z = torch.randn(64, 16, generator=g), torch.randn(64, 16, 4, 4, generator=g)
    hT = torch.einsum("cl,nlhw->nchw", mix, z) + 0.01 * torch.randn(64, 64, 4, 4, generator=g)
    res, ridge = cv_solve_structured(layer, problem, hT, hT, OPTS)
    assert ridge == min(CV_RIDGES)
    assert res.rel_error < 0.01


def test_compress_with_ridge_cv_runs_and_differs_from_the_fixed_ridge() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(6, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, _ = run_method("nc", teacher, x, keep=0.5)
        b, report = run_method("nc", teacher, x, keep=0.5, ridge_cv=True)
    assert report.config["ridge_cv"] is True
    assert b(x).shape == (6, 5) and not torch.equal(a[2].weight, b[2].weight)


# --------------------------------------------------------------------------- ridge_guard


def test_guard_keeps_the_start_where_no_refit_beats_it_on_held_out_images() -> None:
    # independent inputs: any re-fit chases the noise of the half it saw
    g = torch.Generator().manual_seed(0)
    layer, problem = _problem(g, 16)
    hT = torch.randn(6, 64, 2, 2, generator=g)
    res, ridge = guard_solve(layer, problem, hT, hT + torch.randn(hT.shape, generator=g), OPTS)
    assert ridge is None or ridge > OPTS.ridge
    assert len(res.kept) == 16 and res.loss_after <= res.loss_masked + 1e-9


def test_guard_leaves_a_refit_that_generalises_exactly_as_the_plain_solve() -> None:
    # the kept half spans the removed one: the exact re-fit at the run's own ridge passes, nothing changes
    g = torch.Generator().manual_seed(0)
    layer, problem = _problem(g, 32)
    mix, z = torch.randn(64, 16, generator=g), torch.randn(64, 16, 4, 4, generator=g)
    hT = torch.einsum("cl,nlhw->nchw", mix, z) + 0.01 * torch.randn(64, 64, 4, 4, generator=g)
    res, ridge = guard_solve(layer, problem, hT, hT, OPTS)
    stats = LayerStats(layer, problem.terms, problem.wT)
    stats.add_batch(hT, hT)
    plain = solve_structured(stats, problem, OPTS)
    assert ridge == OPTS.ridge
    # (the Grams are summed from two halves here, so equal up to float rounding)
    assert torch.equal(res.kept, plain.kept) and torch.allclose(res.weight, plain.weight, rtol=1e-3, atol=1e-3)


def test_guard_on_a_depthwise_conv_keeps_each_group_no_worse_than_its_start() -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    wT = torch.randn(8, 1, 3, 3, generator=g)
    problem = LayerProblem(objective_terms("nc"), wT, wT.clone(), 8)
    hT = torch.randn(4, 8, 2, 2, generator=g)
    res, _ = guard_solve(layer, problem, hT, hT + torch.randn(hT.shape, generator=g), OPTS)
    assert res.weight.shape == wT.shape and res.loss_after <= res.loss_before + 1e-9


def test_ridge_guard_and_ridge_cv_together_are_refused() -> None:
    with pytest.raises(UserError, match="ridge_cv and ridge_guard"):
        CompressConfig(ridge_cv=True, ridge_guard=True).validate()


@pytest.mark.parametrize("prune", ["structured", "unstructured"])
def test_compress_with_ridge_guard_runs_on_dense_and_grouped_layers(prune: str) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(6, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, report = run_method("nc", teacher, x, keep=0.5, prune=prune, ridge_guard=True)
    assert report.config["ridge_guard"] is True and student(x).shape == (6, 5)
    solved = [r for r in report.layers if not r.skipped]
    assert len(solved) == 2 and all(math.isfinite(r.loss_after) for r in solved)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    if prune == "unstructured":  # the mask is applied: half of the second conv's weights are zero
        assert int((student[4].weight == 0).sum()) >= student[4].weight.numel() // 2
