"""gram.gram (shift structure, 1x1 / Linear products, per-group) equals the Gram of the explicit im2col."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossdistill.gram import explicit_padding, gram, output_rows


def _reference(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U_a' U_b from F.unfold in float64, per group: the straightforward Gram."""
    a, b = a.double(), b.double()
    if isinstance(layer, nn.Linear):
        A, B = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return A.T @ B
    g = layer.groups
    pad = explicit_padding(layer)

    def cols(h):
        u = F.unfold(h, layer.kernel_size, layer.dilation, pad, layer.stride)  # (N, C*kk, L)
        return u.view(u.shape[0], g, -1, u.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, u.shape[1] // g)

    ua, ub = cols(a), cols(b)
    G = ua.transpose(1, 2) @ ub
    return G[0] if g == 1 else G


CONVS = [
    dict(c_in=6, k=3, padding=1),
    dict(c_in=6, k=3, padding=0),
    dict(c_in=6, k=3, padding=2),
    dict(c_in=4, k=(3, 5), padding=(1, 2)),
    dict(c_in=4, k=3, padding=2, dilation=2),
    dict(c_in=4, k=5, padding="same"),
    dict(c_in=4, k=2, padding=0),
    dict(c_in=4, k=3, padding=(0, 1)),
    dict(c_in=6, k=1, padding=0),
    dict(c_in=6, k=1, padding=0, stride=2),
    dict(c_in=6, k=1, padding=1),
    dict(c_in=6, k=3, padding=1, stride=2),
    dict(c_in=6, k=3, padding=1, groups=3),
    dict(c_in=6, k=3, padding=1, groups=6),
    dict(c_in=6, k=5, padding=2, groups=6),
    dict(c_in=6, k=3, padding=1, groups=6, stride=2),
    dict(c_in=6, k=1, padding=0, groups=2),
    dict(c_in=4, k=3, padding=2, dilation=2, groups=4),
    dict(c_in=4, k=5, padding=2, groups=4, stride=2),
    dict(c_in=4, k=(3, 5), padding=(0, 2), groups=4, stride=(2, 1)),
    dict(c_in=4, k=3, padding=1, groups=4, stride=3),
]


@pytest.mark.parametrize("spec", CONVS, ids=[str(s) for s in CONVS])
@pytest.mark.parametrize("hw", [(7, 6), (2, 2)])
@pytest.mark.parametrize("same", [True, False])
def test_conv_gram_equals_the_im2col_gram(spec: dict, hw: tuple[int, int], same: bool) -> None:
    spec = dict(spec)
    c_in = spec.pop("c_in")
    layer = nn.Conv2d(c_in, 2 * c_in, spec.pop("k"), bias=False, **spec)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, c_in, *hw, generator=gen)
    b = a if same else torch.randn(3, c_in, *hw, generator=gen)
    try:
        expected = _reference(layer, a, b)
    except RuntimeError:
        pytest.skip("no output positions for this kernel on this map")
    got = gram(layer, a, None if same else b)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert output_rows(layer, a) == len(a) * layer(a).shape[-1] * layer(a).shape[-2]


def test_linear_gram_equals_the_product_on_token_grids() -> None:
    layer = nn.Linear(5, 3)
    a, b = torch.randn(2, 4, 4, 5), torch.randn(2, 4, 4, 5)
    torch.testing.assert_close(gram(layer, a, b), _reference(layer, a, b), rtol=1e-5, atol=1e-5)
    assert output_rows(layer, a) == 32


@pytest.mark.parametrize("method", ["nc", "ours", "ours-s", "correction", "imitation"])
@pytest.mark.parametrize("batches", [1, 4])
def test_direct_statistics_give_the_system_of_the_three_grams(method: str, batches: int) -> None:
    """LayerStats with the objective known (student-side Grams, C = G W^T' + residual products, the
    targets' energy from the layer's forward) builds the same system as from G_TT, G_SS, G_TS; with 4
    batches of 1 image it starts in row mode and folds the rows in when it crosses over."""
    from crossdistill.objectives import objective_terms
    from crossdistill.solvers import GramSystem, LayerStats

    gen = torch.Generator().manual_seed(1)
    layer = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    hT = torch.randn(4, 3, 3, 3, generator=gen)  # 9 rows per image, d = 27: rows first, then Grams
    hS = hT + 0.3 * torch.randn(4, 3, 3, 3, generator=gen)
    wT = torch.randn(5, 3, 3, 3, generator=gen)
    terms = objective_terms(method, mu=0.6, alpha=0.3, beta=0.7)
    direct, general = LayerStats(layer, terms, wT), LayerStats(layer)
    step = len(hT) // batches
    for i in range(0, len(hT), step):
        direct.add_batch(hT[i : i + step], hS[i : i + step])
        general.add_batch(hT[i : i + step], hS[i : i + step])
    a, b = direct.system(terms, wT), general.system(terms, wT)
    assert isinstance(a, GramSystem) and isinstance(b, GramSystem)
    torch.testing.assert_close(a.G, b.G, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.C, b.C, rtol=1e-5, atol=1e-4)
    assert a.const == pytest.approx(b.const, rel=1e-5)
    W = torch.randn(5, 27, generator=gen)
    assert a.loss(W) == pytest.approx(b.loss(W), rel=1e-5)
