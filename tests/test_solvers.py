"""Per-layer solvers: the least-squares systems reproduce the objectives, and each solver keeps its promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from crossdistill.objectives import METHODS, objective_terms, terms_loss
from crossdistill.solvers import (
    AdamOptions,
    GramSystem,
    LayerProblem,
    LayerStats,
    LstsqOptions,
    RowSystem,
    adam_solve,
    layer_fn,
    ridge_solve,
    solve_structured,
    solve_unstructured,
    unfold,
)

METHOD_KW = {"mu": 0.6, "alpha": 0.3, "beta": 0.8}  # ours-s with alpha + beta != 1: a generic soft mix


def _terms(method: str):
    return objective_terms(method, **METHOD_KW)


def _case(c_in: int, c_out: int, n: int, size: int, seed: int = 0, noise: float = 0.5):
    """A conv layer with teacher weights and teacher/student inputs that differ (accumulated error)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    wT = torch.randn(c_out, c_in, 3, 3, generator=g)
    hT = torch.randn(n, c_in, size, size, generator=g)
    hS = hT + noise * torch.randn(n, c_in, size, size, generator=g)
    return layer, wT, hT, hS


def gram_case(seed: int = 0):
    """Many rows (N*H*W = 256) for d = C_in*9 = 72: LayerStats takes the Gram path."""
    return _case(8, 6, 4, 8, seed)


def row_case(seed: int = 0):
    """Few rows (N*H*W = 8) for d = 16*9 = 144: LayerStats keeps the im2col rows (Woodbury path)."""
    return _case(16, 4, 2, 2, seed)


def _stats(layer, hT, hS) -> LayerStats:
    stats = LayerStats(layer)
    stats.add_batch(hT, hS)
    return stats


def _ref_loss(method: str, layer, wT, W, hT, hS) -> float:
    d = torch.float64
    return float(terms_loss(_terms(method), layer_fn(layer), wT.to(d), W.to(d), hT.to(d), hS.to(d)))


def _channel_mask(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(w)
    out[:, keep] = w[:, keep]
    return out


# --------------------------------------------------------------------------- systems reproduce the objectives


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path,make,cls", [("gram", gram_case, GramSystem), ("row", row_case, RowSystem)])
def test_system_loss_equals_the_objective_evaluated_directly(method, path, make, cls) -> None:
    layer, wT, hT, hS = make()
    system = _stats(layer, hT, hS).system(_terms(method), wT)
    assert isinstance(system, cls)
    for W in (torch.randn_like(wT), wT, 0.5 * wT):
        ref = _ref_loss(method, layer, wT, W, hT, hS)
        assert system.loss(W) == pytest.approx(ref, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_gram_system_loss_of_weights_with_removed_columns_equals_the_objective(method) -> None:
    """loss() works on the columns a weight uses: a masked or an all-zero weight gives the full objective."""
    layer, wT, hT, hS = gram_case(1)
    system = _stats(layer, hT, hS).system(_terms(method), wT)
    for W in (
        _channel_mask(wT, torch.tensor([0, 3, 5])),
        _channel_mask(torch.randn_like(wT), torch.tensor([7])),
        0 * wT,
    ):
        ref = _ref_loss(method, layer, wT, W, hT, hS)
        assert system.loss(W) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_stats_crossing_from_rows_to_gram_mid_stream_keep_the_objective() -> None:
    # d = 72; 9 rows per 3x3 image: the first three images are kept as rows, the fourth folds them into Grams
    layer, wT, hT, hS = _case(8, 5, 6, 3)
    stats = LayerStats(layer)
    for i in range(len(hT)):
        stats.add_batch(hT[i : i + 1], hS[i : i + 1])
        assert (stats.U_T is not None) == (2 * stats.rows < 72)
    assert stats.rows == 54
    W = torch.randn_like(wT)
    for method in METHODS:
        system = stats.system(_terms(method), wT)
        assert isinstance(system, GramSystem)
        assert system.loss(W) == pytest.approx(_ref_loss(method, layer, wT, W, hT, hS), rel=1e-6)


def test_system_loss_for_a_linear_layer_equals_the_objective() -> None:
    layer = nn.Linear(6, 3, bias=False)
    wT, W = torch.randn(3, 6), torch.randn(3, 6)
    hT = torch.randn(20, 6)
    hS = hT + 0.3 * torch.randn(20, 6)
    for method in METHODS:
        system = _stats(layer, hT, hS).system(_terms(method), wT)
        assert system.loss(W) == pytest.approx(_ref_loss(method, layer, wT, W, hT, hS), rel=1e-6)


def test_unfold_matches_conv2d_as_a_matrix_product() -> None:
    layer, wT, hT, _ = gram_case()
    layer.stride = (2, 2)
    y = layer_fn(layer)(hT, wT)  # (N, C_out, H', W')
    U = unfold(hT, layer)  # (N*L, d)
    yy = (U @ wT.flatten(1).T).reshape(y.shape[0], -1, y.shape[1]).transpose(1, 2).reshape(y.shape)
    torch.testing.assert_close(yy, y, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- the two representations agree


@pytest.mark.parametrize("m,d", [(30, 12), (6, 20)], ids=["tall", "wide"])
def test_gram_and_row_systems_give_the_same_solution(m, d) -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    B = torch.randn(m, 5, generator=g, dtype=torch.float64)
    W0 = torch.randn(5, d, generator=g, dtype=torch.float64)
    gram = GramSystem(A.T @ A, A.T @ B, float(B.pow(2).sum()), m)
    row = RowSystem(A, B, m)
    torch.testing.assert_close(gram.diag(), row.diag())
    cols = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    torch.testing.assert_close(gram.blocks(cols, 4), row.blocks(cols, 4))
    for ridge in (1e-3, 1e-1):
        for c in (torch.arange(d), cols):
            torch.testing.assert_close(gram.solve(c, W0, ridge), row.solve(c, W0, ridge))
            torch.testing.assert_close(gram.solve(c, W0, ridge, row=2), row.solve(c, W0, ridge, row=2))
    for W in (W0, torch.zeros_like(W0)):
        assert gram.loss(W) == pytest.approx(row.loss(W), rel=1e-9)


def test_tiny_ridge_solution_matches_numpy_lstsq_on_the_im2col_system() -> None:
    layer, wT, hT, hS = gram_case()
    system = _stats(layer, hT, hS).system(objective_terms("nc"), wT)
    assert isinstance(system, GramSystem)
    d = wT[0].numel()
    W = system.solve(torch.arange(d), wT.flatten(1).double(), 1e-10).T  # (C_out, d)
    UT, US = unfold(hT, layer).double().numpy(), unfold(hS, layer).double().numpy()
    ref = np.linalg.lstsq(US, UT @ wT.flatten(1).double().numpy().T, rcond=None)[0].T
    np.testing.assert_allclose(W.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_row_system_without_ridge_is_the_minimum_norm_least_squares_solution() -> None:
    # few rows and zero-padded im2col columns: a rank-deficient, underdetermined system
    layer, wT, hT, hS = row_case()
    system = _stats(layer, hT, hS).system(objective_terms("nc"), wT)
    assert isinstance(system, RowSystem)
    d = wT[0].numel()
    W0 = torch.randn(4, d, dtype=torch.float64)
    A, B = system.A.numpy(), system.B.numpy()
    ref = np.linalg.lstsq(A, B, rcond=None)[0]
    for _ in range(3):  # torch's default CPU lstsq driver was wrong here, and differently each call
        sol = system.solve(torch.arange(d), W0, 0.0).numpy()
        np.testing.assert_allclose(A @ sol, B, atol=1e-8)  # interpolates the few rows
        np.testing.assert_allclose(sol, ref, rtol=1e-6, atol=1e-8)


def test_gram_system_without_ridge_on_a_dead_channel_is_the_minimum_norm_solution() -> None:
    # an input channel that is always zero makes the Gram matrix singular: Cholesky fails, the fallback solves
    layer, wT, hT, hS = gram_case()
    hT[:, 0] = 0
    hS[:, 0] = 0
    system = _stats(layer, hT, hS).system(objective_terms("nc"), wT)
    assert isinstance(system, GramSystem)
    d = wT[0].numel()
    sol = system.solve(torch.arange(d), wT.flatten(1).double(), 0.0)
    UT, US = unfold(hT, layer).double().numpy(), unfold(hS, layer).double().numpy()
    ref = np.linalg.lstsq(US, UT @ wT.flatten(1).double().numpy().T, rcond=None)[0]
    np.testing.assert_allclose(sol.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert float(sol[:9].abs().max()) < 1e-8  # nothing is put on the dead channel's columns


def test_row_system_with_tiny_ridge_interpolates_closest_to_the_start() -> None:
    layer, wT, hT, hS = row_case()
    system = _stats(layer, hT, hS).system(objective_terms("nc"), wT)
    d = wT[0].numel()
    W0 = wT.flatten(1).double()
    sol = system.solve(torch.arange(d), W0, 1e-8)  # (d, C_out)
    A, B = system.A, system.B
    ref = W0.T + torch.linalg.pinv(A) @ (B - A @ W0.T)  # argmin ||W - W0|| subject to A W' = B
    torch.testing.assert_close(A @ sol, B, rtol=0, atol=1e-4 * float(B.abs().max()))
    torch.testing.assert_close(sol, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- structured exact solve


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [gram_case, row_case], ids=["gram", "row"])
def test_solve_structured_keeps_n_channels_and_beats_masking_the_teacher(method, make) -> None:
    layer, wT, hT, hS = make()
    c_in = wT.shape[1]
    n_keep = c_in // 2 - 1
    stats = _stats(layer, hT, hS)
    res = solve_structured(stats, LayerProblem(_terms(method), wT, wT.clone(), n_keep))
    kept = res.kept
    assert len(kept) == n_keep and len(set(kept.tolist())) == n_keep
    assert res.weight.shape == wT.shape and res.weight.dtype == torch.float32
    nonzero_channels = (res.weight.abs().sum((0, 2, 3)) > 0).nonzero().flatten()
    assert nonzero_channels.tolist() == sorted(kept.tolist())  # exactly the kept channels carry weight
    # the reported losses are the objective itself
    assert res.loss_before == pytest.approx(_ref_loss(method, layer, wT, wT, hT, hS), rel=1e-5, abs=1e-8)
    scale = _ref_loss(method, layer, wT, torch.zeros_like(wT), hT, hS)  # float32 rounding of the result
    assert res.loss_after == pytest.approx(_ref_loss(method, layer, wT, res.weight, hT, hS), rel=1e-4, abs=1e-6 * scale)
    # re-fitting the kept channels beats simply zeroing the dropped ones of the teacher
    masked = _ref_loss(method, layer, wT, _channel_mask(wT, kept), hT, hS)
    assert res.loss_after <= masked + 1e-9
    assert res.loss_after < 0.9 * masked


@pytest.mark.parametrize("criterion", ["energy", "norm"])
def test_solve_structured_with_each_criterion_beats_masking_by_norm(criterion) -> None:
    layer, wT, hT, hS = gram_case(seed=1)
    n_keep = 3
    res = solve_structured(
        _stats(layer, hT, hS),
        LayerProblem(_terms("ours"), wT, wT.clone(), n_keep),
        LstsqOptions(channel_criterion=criterion),
    )
    assert len(res.kept) == n_keep
    top_norm = wT.pow(2).sum((0, 2, 3)).topk(n_keep).indices
    assert res.loss_after < _ref_loss("ours", layer, wT, _channel_mask(wT, top_norm), hT, hS)


def test_solve_structured_rejects_an_unknown_criterion() -> None:
    layer, wT, hT, hS = gram_case()
    problem = LayerProblem(_terms("ours"), wT, wT.clone(), 3)
    with pytest.raises(ValueError, match="criterion"):
        solve_structured(_stats(layer, hT, hS), problem, LstsqOptions(channel_criterion="random"))


def test_solve_structured_keeping_everything_leaves_the_teacher_for_ours() -> None:
    layer, wT, hT, hS = gram_case()
    res = solve_structured(_stats(layer, hT, hS), LayerProblem(_terms("ours"), wT, wT.clone(), wT.shape[1]))
    assert res.kept.tolist() == list(range(wT.shape[1]))
    torch.testing.assert_close(res.weight, wT, rtol=1e-4, atol=1e-4)
    assert res.loss_after < 1e-8


def test_solve_structured_nc_with_equal_inputs_recovers_the_teacher() -> None:
    layer, wT, hT, _ = gram_case()
    problem = LayerProblem(_terms("nc"), wT, torch.randn_like(wT), wT.shape[1])
    res = solve_structured(_stats(layer, hT, hT), problem, LstsqOptions(ridge=1e-9))
    torch.testing.assert_close(res.weight, wT, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- unstructured exact solve


@pytest.mark.parametrize("method", ["ours", "nc", "ours-s"])
@pytest.mark.parametrize("criterion", ["magnitude", "energy"])
@pytest.mark.parametrize("make", [gram_case, row_case], ids=["gram", "row"])
def test_solve_unstructured_keeps_n_weights_and_beats_the_masked_teacher(method, criterion, make) -> None:
    layer, wT, hT, hS = make()
    n_keep = wT.numel() // 10
    res = solve_unstructured(
        _stats(layer, hT, hS),
        LayerProblem(_terms(method), wT, wT.clone(), n_keep, structured=False),
        LstsqOptions(weight_criterion=criterion),
    )
    mask = res.kept
    assert mask.dtype == torch.bool and mask.shape == wT.shape and int(mask.sum()) == n_keep
    assert int(torch.count_nonzero(res.weight)) == n_keep
    assert bool((res.weight[~mask] == 0).all())
    masked = _ref_loss(method, layer, wT, wT * mask, hT, hS)
    scale = _ref_loss(method, layer, wT, torch.zeros_like(wT), hT, hS)
    assert res.loss_after == pytest.approx(_ref_loss(method, layer, wT, res.weight, hT, hS), rel=1e-4, abs=1e-6 * scale)
    assert res.loss_after < masked


def test_solve_unstructured_magnitude_mask_is_the_teacher_top_k() -> None:
    layer, wT, hT, hS = gram_case()
    n_keep = 40
    res = solve_unstructured(
        _stats(layer, hT, hS),
        LayerProblem(_terms("ours"), wT, wT.clone(), n_keep, structured=False),
        LstsqOptions(weight_criterion="magnitude"),
    )
    top = torch.zeros(wT.numel(), dtype=torch.bool)
    top[wT.abs().flatten().topk(n_keep).indices] = True
    assert torch.equal(res.kept.flatten(), top)


# --------------------------------------------------------------------------- the official Adam loop


@pytest.mark.parametrize("method", ["ours", "nc", "ours-s"])
def test_adam_structured_keeps_n_channels_and_beats_hard_masking(method) -> None:
    layer, wT, hT, hS = gram_case()
    n_keep = 3
    res = adam_solve(layer, LayerProblem(_terms(method), wT, wT.clone(), n_keep), hT, hS, AdamOptions(30, lr=1e-2))
    assert len(res.kept) == n_keep
    dropped = sorted(set(range(wT.shape[1])) - set(res.kept.tolist()))
    assert bool((res.weight[:, dropped] == 0).all())  # zeros stay zero after the projection
    assert bool((res.weight[:, res.kept].abs().sum((0, 2, 3)) > 0).all())
    assert res.loss_before == pytest.approx(_ref_loss(method, layer, wT, wT, hT, hS), rel=1e-4, abs=1e-7)
    assert res.loss_after == pytest.approx(_ref_loss(method, layer, wT, res.weight, hT, hS), rel=1e-3)
    top_norm = wT.pow(2).sum((0, 2, 3)).topk(n_keep).indices
    assert res.loss_after < _ref_loss(method, layer, wT, _channel_mask(wT, top_norm), hT, hS)
    assert res.loss_after < _ref_loss(method, layer, wT, _channel_mask(wT, res.kept), hT, hS)


@pytest.mark.parametrize("method", ["ours", "nc"])
def test_adam_unstructured_keeps_n_weights_and_beats_hard_masking(method) -> None:
    layer, wT, hT, hS = gram_case()
    n_keep = wT.numel() // 10
    problem = LayerProblem(_terms(method), wT, wT.clone(), n_keep, structured=False)
    res = adam_solve(layer, problem, hT, hS, AdamOptions(30, lr=1e-2))
    assert int(res.kept.sum()) == n_keep
    assert int(torch.count_nonzero(res.weight)) == n_keep
    assert bool((res.weight[~res.kept] == 0).all())
    top = torch.zeros(wT.numel(), dtype=torch.bool)
    top[wT.abs().flatten().topk(n_keep).indices] = True
    assert res.loss_after < _ref_loss(method, layer, wT, wT * top.view_as(wT), hT, hS)


def test_adam_with_nothing_pruned_leaves_the_teacher_unchanged_for_ours() -> None:
    layer, wT, hT, hS = gram_case()
    res = adam_solve(layer, LayerProblem(_terms("ours"), wT, wT.clone(), wT.shape[1]), hT, hS, AdamOptions(10))
    torch.testing.assert_close(res.weight, wT)
    assert res.loss_after == pytest.approx(0.0, abs=1e-10)


def test_adam_does_not_modify_its_inputs() -> None:
    layer, wT, hT, hS = gram_case()
    w0 = wT.clone()
    copies = [t.clone() for t in (wT, hT, hS, w0)]
    adam_solve(layer, LayerProblem(_terms("ours"), wT, w0, 3), hT, hS, AdamOptions(5, lr=1e-2))
    for a, b in zip((wT, hT, hS, w0), copies, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the one ridge solve


def test_ridge_solve_is_the_closed_form_with_a_relative_ridge_towards_the_prior() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    G, R, prior = X.T @ X, torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen)
    lam = 0.1 * float(G.diagonal().mean())
    expected = torch.linalg.solve(G + lam * torch.eye(6, dtype=torch.float64), R + lam * prior.double())
    torch.testing.assert_close(ridge_solve(G, R, 0.1, prior), expected)


def test_batched_ridge_solve_gives_each_system_its_own_ridge() -> None:
    gen = torch.Generator().manual_seed(1)
    X = (
        torch.randn(3, 40, 5, generator=gen, dtype=torch.float64)
        * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1).double()
    )
    G, R = X.transpose(1, 2) @ X, torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    prior = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    out = ridge_solve(G, R, 0.3, prior)
    for b in range(3):
        torch.testing.assert_close(out[b], ridge_solve(G[b], R[b], 0.3, prior[b]))
    assert torch.equal(G, X.transpose(1, 2) @ X)  # the ridge went on a copy


def test_ridge_solve_falls_back_to_the_minimum_norm_solution_when_cholesky_fails() -> None:
    G = torch.zeros(4, 4, dtype=torch.float64)  # all-zero inputs: singular even with the (relative) ridge
    R = torch.zeros(4, 2, dtype=torch.float64)
    R[0] = 1.0
    out = ridge_solve(G, R, 1e-3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.linalg.pinv(G) @ R)
