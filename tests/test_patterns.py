"""compress() on tiny instances of the patterns of modern CNNs (tests/zoo.py): grouped convs,
channel split + shuffle, squeeze-excite, inception concat, fire modules; re-fits that never end
above their masked start; one pass over the student's graph equal to per-layer capture."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.compress import compress
from crossdistill.methods import run_method
from crossdistill.models import get_model
from crossdistill.objectives import objective_terms
from crossdistill.pruning import ChannelRemover
from crossdistill.run import output_error, recalibrate_bn, split_holdout
from crossdistill.solvers import (
    LayerProblem,
    LayerStats,
    LstsqOptions,
    conditioned_ridge,
    never_worse,
    solve_grouped,
    solve_structured,
)

sys.path.insert(0, str(Path(__file__).parent))
from zoo import PATTERNS, TinyResNeXt, TinySqueezeNet  # noqa: E402

N, SIZE = 16, 16


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _ready(build, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    recalibrate_bn(model, x)
    return model.eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def compressed():
    x = _images()
    out = {}
    for name, build in PATTERNS.items():
        teacher = _ready(build, x)
        for method in ("nc", "ours", "ours-s"):
            student, report = compress(teacher, x, method=method, keep=0.5, holdout=0.25)
            out[name, method] = teacher, student, report
    return x, out


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_pattern_compresses_with_fewer_params_and_flops(compressed, name) -> None:
    _x, out = compressed
    for method in ("nc", "ours", "ours-s"):
        teacher, student, report = out[name, method]
        assert report.params_after < report.params_before, (name, method)
        assert report.flops_after < report.flops_before, (name, method)
        assert _params(student) == report.params_after


@pytest.mark.parametrize("name", list(PATTERNS))
def test_no_student_is_further_from_the_teacher_than_the_l1_student(compressed, name) -> None:
    """Held-out output error of every method <= that of L1 pruning without re-fit (issue 13's bar)."""
    x, out = compressed
    _fit, held = split_holdout(x, 0.25, 0)
    teacher = out[name, "nc"][0]
    l1_student, l1_report = run_method("l1", teacher, x, keep=0.5, holdout=0.25)
    assert l1_report.params_after < l1_report.params_before
    for method in ("nc", "ours", "ours-s"):
        _teacher, student, report = out[name, method]
        assert report.output_error_on == "held-out"
        assert report.output_error == pytest.approx(output_error(student, teacher, x[held]), rel=1e-5)
        assert report.output_error <= l1_report.output_error + 1e-3, (name, method, report, l1_report)
        assert all(r.rel_error is not None and r.rel_error >= 0 for r in report.layers if not r.skipped)


def test_grouped_conv_keeps_the_same_share_of_each_group(compressed) -> None:
    _x, out = compressed
    _teacher, student, report = out["grouped", "ours"]
    for block in student.blocks:
        conv = block.b[0]
        assert conv.groups == 4 and conv.out_channels == 8  # 16 -> 2 of 4 per group
        assert block.c[0].in_channels == 8
    kept = next(r.kept_channels for r in report.layers if r.name == "blocks.0.c.0")
    assert [sum(1 for k in kept if k // 4 == g) for g in range(4)] == [2, 2, 2, 2]


def test_shuffle_split_channels_are_left_whole_and_the_branch_is_pruned(compressed) -> None:
    _x, out = compressed
    _teacher, student, _report = out["shuffle", "ours"]
    for unit in student.units:
        assert unit.branch[0][0].in_channels == 8  # fed by the channel split: not pruned
        assert unit.branch[2][0].in_channels == 4  # fed by the 1x1 -> depthwise chain: pruned


def test_fire_module_keeps_at_least_one_channel_of_each_expand_conv() -> None:
    x = _images()
    teacher = _ready(TinySqueezeNet, x)
    for method in ("nc", "ours"):
        student, report = compress(teacher, x, method=method, keep=0.2)
        for fire in student.features[2:]:
            assert fire.expand1x1.out_channels >= 1 and fire.expand3x3.out_channels >= 1
        assert report.params_after < report.params_before


def test_removing_a_whole_concat_slice_keeps_one_channel_of_it() -> None:
    x = _images()
    model = _ready(TinySqueezeNet, x)
    remover = ChannelRemover(model, x[:1])
    # fire 1's squeeze reads expand1x1 (channels 0-1) and expand3x3 (2-15): drop all of expand1x1
    kept = remover.remove_input_channels("features.3.squeeze", torch.arange(2, 16))
    assert kept.tolist() == list(range(0, 16)) or 0 in kept.tolist()
    assert model.features[2].expand1x1.out_channels == 1
    assert model(x).shape == (N, 5)


# --------------------------------------------------------------------------- never worse


def _ill_conditioned(method: str = "nc"):
    """A 1x1 conv with 64 inputs on 2x2 maps of 3 images: 12 rows for 64 unknowns per output."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Conv2d(64, 32, 1, bias=False)
    hT = torch.randn(3, 64, 2, 2, generator=g)
    hS = hT + 0.5 * torch.randn(3, 64, 2, 2, generator=g)
    wT = torch.randn(32, 64, 1, 1, generator=g)
    stats = LayerStats(layer)
    stats.add_batch(hT, hS)
    return layer, stats, LayerProblem(objective_terms(method), wT, wT.clone(), 16), hT, hS


def test_conditioned_ridge_grows_with_unknowns_per_row() -> None:
    assert conditioned_ridge(1e-3, 1000, 100) == 1e-3
    assert conditioned_ridge(1e-3, 10, 100) == pytest.approx(1e-2)


@pytest.mark.parametrize("method", ["nc", "ours", "ours-s", "correction", "imitation"])
def test_structured_solve_never_ends_above_its_masked_start(method) -> None:
    _layer, stats, problem, _hT, _hS = _ill_conditioned(method)
    for ridge in (0.0, 1e-6, 1e-3):
        res = solve_structured(stats, problem, LstsqOptions(ridge=ridge))
        assert res.loss_after <= res.loss_masked + 1e-9
        assert len(res.kept) == 16


def test_never_worse_keeps_the_masked_start_over_a_bad_solution() -> None:
    _layer, stats, problem, _hT, _hS = _ill_conditioned()
    system = stats.system(problem.terms, problem.wT)
    W0 = problem.w0.flatten(1).double()
    keep = torch.zeros(64, dtype=torch.bool)
    keep[:16] = True
    bad = 100 * torch.randn(W0.shape, dtype=torch.float64)
    res = never_worse(system, bad, W0, keep, system.loss(W0))
    assert res.fell_back and torch.equal(res.weight, W0 * keep)
    assert res.loss_after == pytest.approx(system.loss(W0 * keep))


def test_a_fallback_is_warned_and_recorded(monkeypatch) -> None:
    import crossdistill.solvers as solvers

    real = solvers.never_worse

    def always_fall_back(system, W, W0, keep_mask, loss_before):
        res = real(system, W0 * keep_mask.to(W0.dtype) + 1.0, W0, keep_mask, loss_before)
        return res

    monkeypatch.setattr(solvers, "never_worse", always_fall_back)
    x = _images()
    teacher = _ready(TinyResNeXt, x)
    with pytest.warns(UserWarning, match="ended above its masked start"):
        _student, report = compress(teacher, x, method="nc", keep=0.5)
    assert any(r.fell_back for r in report.layers)


# --------------------------------------------------------------------------- batched grouped solve


def test_batched_grouped_solve_equals_the_group_by_group_solve() -> None:
    g = torch.Generator().manual_seed(2)
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    hT = torch.randn(5, 8, 6, 6, generator=g)
    hS = hT + 0.3 * torch.randn(5, 8, 6, 6, generator=g)
    wT = torch.randn(8, 2, 3, 3, generator=g)
    terms = objective_terms("ours")
    res = solve_grouped(layer, LayerProblem(terms, wT, wT.clone(), 8), hT, hS, LstsqOptions(ridge=1e-3))
    for grp in range(4):
        sl = slice(2 * grp, 2 * grp + 2)
        dense = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        stats = LayerStats(dense)
        stats.add_batch(hT[:, sl], hS[:, sl])
        ref = solve_structured(stats, LayerProblem(terms, wT[sl], wT[sl].clone(), 2), LstsqOptions(ridge=1e-3))
        torch.testing.assert_close(res.weight[sl], ref.weight, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- one pass


@pytest.mark.parametrize("build", [lambda: get_model("resnet20", 5), *PATTERNS.values()])
def test_one_pass_capture_gives_the_same_student_as_per_layer_capture(build) -> None:
    x = _images()
    teacher = _ready(build, x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capturing each layer")  # no fallback to per-layer capture
        a, ra = compress(teacher, x, method="ours-s", keep=0.5, capture="one-pass")
    b, rb = compress(teacher, x, method="ours-s", keep=0.5, capture="per-layer")
    assert (ra.capture, rb.capture) == ("one-pass", "per-layer")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_a_model_fx_cannot_trace_falls_back_to_per_layer_capture() -> None:
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

        def forward(self, x):
            y = torch.relu(self.a(x))
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
                y = y * 1.0
            return self.head(torch.relu(self.b(y)))

    x = _images()
    teacher = _ready(DataDependent, x)
    with pytest.warns(UserWarning, match="forward pass per layer"):
        _student, report = compress(teacher, x, method="ours", keep=0.5)
    assert report.capture == "per-layer"


def test_split_holdout_is_disjoint_seeded_and_leaves_images_to_fit() -> None:
    x = torch.zeros(10, 1, 2, 2)
    fit, held = split_holdout(x, 0.2, 0)
    assert len(held) == 2 and len(fit) == 8 and set(fit.tolist()) | set(held.tolist()) == set(range(10))
    assert torch.equal(split_holdout(x, 0.2, 0)[1], held)
    assert len(split_holdout(x[:2], 0.9, 0)[0]) == 1
    assert len(split_holdout(x, 0.0, 0)[1]) == 0


# --------------------------------------------------------------------------- tied channels (GhostNet)


class _Ghost(nn.Module):
    """conv -> ghost module (primary 1x1 to 6, depthwise copy, concat to 12) -> conv: the last conv's input
    channels j and j + 6 both come from primary filter j."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU())
        self.last = nn.Conv2d(12, 10, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.primary(self.stem(x))
        return self.head(self.last(torch.cat([a, self.cheap(a)], 1)))


class _GhostSE(_Ghost):
    """The ghost module's concatenation gated by squeeze-excite before the last conv (timm's GhostNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.primary(self.stem(x))
        h = torch.cat([a, self.cheap(a)], 1)
        h = h * torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.head(self.last(h))


def test_twin_channels_of_a_ghost_module_are_one_unit_with_one_source() -> None:
    remover = ChannelRemover(_Ghost().eval(), _images()[:1])
    assert remover.prunable_channels("last") == list(range(12))
    ties = remover.channel_ties("last").tolist()
    assert ties[:6] == ties[6:] and len(set(ties)) == 6
    sources = remover.channel_sources("last")
    assert all(sources[j] == sources[j + 6] == ("primary.0", j) for j in range(6))
    assert remover.tie_size("last", list(range(12))) == 2


@pytest.mark.parametrize("build", [_Ghost, _GhostSE])
@pytest.mark.parametrize("keep", [0.5, 0.75])
def test_tied_channels_are_counted_as_reached_and_every_method_builds_the_same_widths(keep: float, build) -> None:
    # the plan recorded 12 kept while removing a twin took its partner along (8 reached)
    x = _images()
    teacher = _ready(build, x)
    widths = set()
    for method in ["ours", "nc", "l1", "thinet", "cp"]:
        student, report = run_method(method, teacher, x, keep=keep)
        rec = {r.name: r for r in report.layers}["last"]
        assert rec.kept == student.last.in_channels == 2 * student.primary[0].out_channels, method
        assert report.shortfall is None or "differ" not in report.shortfall, method
        widths.add(rec.kept)
    assert widths == {6 if keep == 0.5 else 8}  # whole units: 3 (or floor(4.5) = 4) of the 6 primary filters


def test_select_units_keeps_whole_units_by_their_summed_score() -> None:
    from crossdistill.solvers import select_units

    ties = torch.tensor([0, 1, 2, 0, 1, 2])
    scores = torch.tensor([1.0, 5.0, 2.0, 4.0, 0.0, 2.5])  # unit sums: 0 -> 5, 1 -> 5 (stable: first), 2 -> 4.5
    assert select_units(torch.arange(6), scores, 4, ties).tolist() == [0, 1, 3, 4]
    assert select_units(torch.arange(6), scores, 3, ties).tolist() == [0, 3]  # never half a unit


# --------------------------------------------------------------------------- squeeze-excite squeeze conv re-fit


class _SE(nn.Module):
    """conv -> conv (the gated producer) -> squeeze-excite -> conv (the planned consumer) -> pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.producer = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.consumer = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.producer(self.stem(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.head(self.consumer(h * gate))


def _squeeze_error(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    from crossdistill.capture import capture_outputs

    s, t = (capture_outputs(m, ["squeeze"], x)["squeeze"] for m in (student, teacher))
    return float((s - t).norm() / t.norm())


def test_the_se_squeeze_conv_is_refitted_on_the_channels_kept(monkeypatch) -> None:
    # left as sliced, the squeeze conv lost half its (pooled) input and the gates of the kept channels drifted
    import crossdistill.run as run_module

    x, held = _images(), _images(seed=5)
    teacher = _ready(_SE, torch.cat([x, held]))
    only = {"keep": 0.5, "include": ["consumer"], "refit_unpruned": False}
    refit, _ = run_method("nc", teacher, x, **only)
    l1, _ = run_method("l1", teacher, x, keep=0.5, include=["consumer"])
    monkeypatch.setattr(run_module, "_refit_gate_inputs", lambda *args: None)
    sliced, _ = run_method("nc", teacher, x, **only)
    assert refit.squeeze.in_channels == sliced.squeeze.in_channels == 8
    # held-out images: the squeeze output is the teacher's again (half the error or less), and the student
    # is no further from the teacher than the L1 student without re-fit (at the output the squeeze re-fit
    # changes little here: 0.0163 with, 0.0157 without, 0.127 for L1)
    assert _squeeze_error(refit, teacher, held) < 0.5 * _squeeze_error(sliced, teacher, held)
    assert output_error(refit, teacher, held) <= output_error(l1, teacher, held)


# --------------------------------------------------------------------------- torchvision's ShuffleNetV2 unit


class _TVShuffleUnit(nn.Module):
    """torchvision.models.shufflenetv2.InvertedResidual, reduced: stride 2 runs two branches on the input,
    stride 1 splits it with chunk; both end in a channel shuffle (view, transpose, view)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        h = c_out // 2
        self.stride = stride
        self.branch1 = (
            nn.Sequential(nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                          nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
            if stride > 1 else nn.Sequential()
        )  # fmt: skip
        c2 = c_in if stride > 1 else h
        self.branch2 = nn.Sequential(nn.Conv2d(c2, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                     nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                     nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        b, c, hh, ww = out.size()
        return out.view(b, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(b, -1, hh, ww)


def _tv_shufflenet() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()), nn.MaxPool2d(3, 2, 1),
        _TVShuffleUnit(8, 16, 2), _TVShuffleUnit(16, 16, 1), _TVShuffleUnit(16, 16, 1), _TVShuffleUnit(16, 32, 2),
        nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4),
    )  # fmt: skip


@pytest.mark.parametrize("method", ["l1", "nc"])
def test_torchvision_shufflenet_units_compress_instead_of_crashing_the_trace(method: str) -> None:
    # torch-pruning divided by an inferred channel count of 0 at the channel shuffle and aborted
    x = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    teacher = _ready(_tv_shufflenet, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, report = run_method(method, teacher, x, keep=0.5)
    assert report.params_after < report.params_before and torch.isfinite(student(x)).all()
    assert any("dependency graph" in r["reason"] or "feed" in r["reason"] for r in report.left_whole)


def test_the_shufflenet_guard_leaves_torch_pruning_unchanged_after_our_call() -> None:
    """The division-by-zero guard is swapped in for our own trace / group calls only: afterwards (and on an
    error inside) torch-pruning's function is its own again, so other torch-pruning users are unaffected."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping

    own = index_mapping.update_reshape_index_mapping
    assert own.__module__ == "torch_pruning.dependency.index_mapping" and own.__name__ == "update_reshape_index_mapping"
    model = _tv_shufflenet().eval()
    x = torch.randn(2, 3, 32, 32)
    remover = ChannelRemover(model, x)  # crashed inside torch-pruning without the guard
    assert index_mapping.update_reshape_index_mapping is own
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            remover.prunable_channels(name)
    assert index_mapping.update_reshape_index_mapping is own
    # torch-pruning itself still fails on this model (when this fails, upstream fixed it: drop _reshape_guard)
    with pytest.raises(ZeroDivisionError):
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    assert index_mapping.update_reshape_index_mapping is own


# --------------------------------------------------------------------------- never worse than L1, held out

# Zoo networks where the default ridge lets NC / Ours / Ours-S fit a few noise images and miss others by
# x2-x5 the L1 student's error (benchmarks/results/ridge_rule_zoo.md); ridge_per_unknown=1 (opt-in: it costs
# accuracy on trained VGG-16, results/sweep_ridge_fashion-mnist.md) keeps every re-fit within 5 % of L1.
_OVERFIT_CASES = [("efficientnet", 4), ("mobilenet_v3", 4), ("mobilenet_v3", 8)]


def _heldout_errors(arch: str, n_fit: int, **kw) -> dict[str, float]:
    import zoo

    torch.manual_seed(0)
    teacher = getattr(zoo, arch)()
    g = torch.Generator().manual_seed(1)
    fit, held = torch.randn(n_fit, 3, SIZE, SIZE, generator=g), torch.randn(16, 3, SIZE, SIZE, generator=g)
    recalibrate_bn(teacher, torch.cat([fit, held]))
    teacher.eval()
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("l1", "nc", "ours", "ours-s"):
            student, _ = run_method(method, teacher, fit, keep=0.5, **kw)
            errors[method] = output_error(student, teacher, held)
    return errors


@pytest.mark.parametrize(("arch", "n_fit"), _OVERFIT_CASES)
def test_conditioned_refits_are_no_worse_than_l1_on_heldout_images(arch: str, n_fit: int) -> None:
    errors = _heldout_errors(arch, n_fit, ridge_per_unknown=1.0, safety="off")
    # 5 %: the L1 student is itself a rough fit here (error ~1)
    assert all(errors[m] <= 1.05 * errors["l1"] for m in ("nc", "ours", "ours-s")), errors


# ridge_guard (opt-in): per layer the smallest ridge whose re-fit is no worse than the masked start on held-out
# image halves. It meets the same bound except Ours on mobilenet_v3 with 4 images (1.116 vs L1 1.049, x1.064):
# two images per half decide each layer there.
_GUARD_CASES = [
    ("efficientnet", 4),
    pytest.param("mobilenet_v3", 4, marks=pytest.mark.xfail(reason="Ours at x1.064 of L1", strict=False)),
    ("mobilenet_v3", 8),
]


@pytest.mark.parametrize(("arch", "n_fit"), _GUARD_CASES)
def test_guarded_refits_are_no_worse_than_l1_on_heldout_images(arch: str, n_fit: int) -> None:
    errors = _heldout_errors(arch, n_fit, ridge_guard=True, safety="off")
    assert all(errors[m] <= 1.05 * errors["l1"] for m in ("nc", "ours", "ours-s")), errors


def test_guard_keeps_nc_and_ours_s_within_l1_with_four_images() -> None:
    # the xfail case above, for the methods that do meet the bound there
    errors = _heldout_errors("mobilenet_v3", 4, ridge_guard=True, safety="off")
    assert all(errors[m] <= 1.05 * errors["l1"] for m in ("nc", "ours-s")), errors


def test_default_ridge_overfits_where_the_conditioned_one_does_not() -> None:
    # the failure the options (and the safety net, tests/test_safety.py) exist for
    errors = _heldout_errors("mobilenet_v3", 8, safety="off")
    assert errors["nc"] > 2 * errors["l1"], errors


def test_per_unknown_ridge_adds_with_the_unknowns_per_row() -> None:
    assert conditioned_ridge(1e-3, 1000, 100, per_unknown=1.0) == pytest.approx(0.101)
    assert conditioned_ridge(1e-3, 10, 100, per_unknown=0.3) == pytest.approx(3.001)
