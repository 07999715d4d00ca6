"""The paper's baselines: same architecture as compress(), exact counts, and each method's own claim."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossdistill.baselines import BASELINES, BPConfig, run_baseline
from crossdistill.baselines.common import contribution_gram
from crossdistill.baselines.cp import lasso_select
from crossdistill.baselines.fskd import fit_pointwise, merge_pointwise
from crossdistill.baselines.l1 import filter_l1_keep
from crossdistill.baselines.thinet import greedy_removal
from crossdistill.compress import compress, recalibrate_bn
from crossdistill.errors import UserError
from crossdistill.models import VGG, get_model
from crossdistill.objectives import Term
from crossdistill.plan import keep_count
from crossdistill.solvers import LayerStats
from crossdistill.structure import layer_widths

# few training steps so the file runs in seconds on one core
FAST = {"l1+bp": {"iterations": 20}, "fitnet": {"hint_iterations": 20, "kd_iterations": 20}, "mir": {"steps": 5}}


def _teacher(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1) if name == "resnet20" else VGG([8, 8, "M", 16, 16], 10, 1)
    images = torch.randn(12, 1, 28, 28)
    labels = torch.arange(12) % 10
    recalibrate_bn(model, images)  # BN statistics of the images, as in a trained teacher
    return model.eval(), images, labels


@pytest.fixture(scope="module", params=["resnet20", "vgg"])
def setup(request):
    teacher, images, labels = _teacher(request.param)
    reference, _ = compress(teacher, images, keep=0.5)
    return teacher, images, labels, reference.widths


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registry_holds_the_papers_baselines():
    assert set(BASELINES) == {"l1", "l1+bp", "fitnet", "fskd", "thinet", "cp", "mir"}


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_gives_compress_architecture_and_a_runnable_student(setup, name):
    teacher, images, labels, widths = setup
    before = _state(teacher)
    student, report = run_baseline(name, teacher, images, labels, keep=0.5, **FAST.get(name, {}))
    assert student.widths == widths
    with torch.no_grad():
        out = student(images)
    assert out.shape == (len(images), 10) and torch.isfinite(out).all()
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert report.config["method"] == name and report.config["keep"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched


@pytest.mark.parametrize("name", [n for n, b in BASELINES.items() if b.needs_labels])
def test_label_baselines_ask_for_labels(name):
    teacher, images, _ = _teacher("vgg")
    with pytest.raises(UserError, match="labels"):
        run_baseline(name, teacher, images)


@pytest.mark.parametrize("name", [n for n, b in BASELINES.items() if not b.unstructured])
def test_channel_baselines_refuse_unstructured_pruning(name):
    teacher, images, labels = _teacher("vgg")
    with pytest.raises(UserError, match="structured"):
        run_baseline(name, teacher, images, labels, prune="unstructured")


def test_unknown_baseline_and_setting_are_user_errors():
    teacher, images, labels = _teacher("vgg")
    with pytest.raises(UserError, match="unknown baseline"):
        run_baseline("slimming", teacher, images)
    with pytest.raises(UserError, match="unknown setting"):
        run_baseline("l1", teacher, images, temperature=4.0)


def test_keywords_go_to_the_baselines_own_settings_first():
    teacher, images, labels = _teacher("vgg")
    _, report = run_baseline("l1+bp", teacher, images, labels, iterations=3, keep=0.75)
    assert report.config["baseline"]["iterations"] == 3 and report.config["iterations"] == 3000
    assert report.config["keep"] == 0.75
    _, report = run_baseline("l1+bp", teacher, images, labels, params=BPConfig(iterations=2))
    assert report.config["baseline"]["iterations"] == 2


@pytest.mark.parametrize("name", [n for n, b in BASELINES.items() if b.unstructured])
def test_unstructured_baselines_keep_exact_sparsity(name):
    teacher, images, labels = _teacher("resnet20")
    student, report = run_baseline(name, teacher, images, labels, prune="unstructured", keep=0.3, **FAST.get(name, {}))
    zeros = total = 0
    for rec in report.layers:
        if rec.name.startswith("<"):
            continue
        w = student.get_submodule(rec.name).weight
        assert int((w != 0).sum()) == keep_count(w.numel(), 0.3) == rec.kept
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert report.sparsity == pytest.approx(zeros / total)
    assert student.widths == layer_widths(teacher)  # nothing removed physically


@pytest.mark.parametrize("name", ["l1+bp", "fitnet"])
def test_recalibrate_reestimates_bn_statistics_once_then_trains_with_them_frozen(name):
    teacher, images, labels = _teacher("resnet20")
    stats = lambda m: m.get_submodule("layer1.0.bn2").running_mean.clone()  # noqa: E731  (width kept)
    zero = {"iterations": 0} if name == "l1+bp" else {"hint_iterations": 0, "kd_iterations": 0}
    frozen, _ = run_baseline(name, teacher, images, labels, bn_mode="eval", **zero)
    assert torch.equal(stats(frozen), stats(teacher))
    recal, _ = run_baseline(name, teacher, images, labels, bn_mode="recalibrate", **zero)
    trained, _ = run_baseline(name, teacher, images, labels, bn_mode="recalibrate", **FAST[name])
    assert not torch.allclose(stats(recal), stats(teacher))
    assert torch.equal(stats(trained), stats(recal))  # frozen while training


@pytest.mark.parametrize("name", ["l1+bp", "fitnet"])
def test_training_baselines_lower_their_training_loss(setup, name):
    teacher, images, labels, _ = setup
    _, report = run_baseline(name, teacher, images, labels, **FAST[name])
    stages = [r for r in report.layers if r.name.startswith("<")]
    assert len(stages) == (1 if name == "l1+bp" else 2)
    for r in stages:
        assert r.loss_after < r.loss_before, r


# --------------------------------------------------------------------------- FSKD


def _conv_bn(bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=bias), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return conv, bn.eval()


@pytest.mark.parametrize("case", ["bn", "bn+bias", "dead-bn", "no-bn"])
def test_fskd_merge_equals_the_explicit_pointwise_conv(case):
    conv, bn = _conv_bn(bias=case in ("bn+bias", "no-bn"))
    if case == "dead-bn":
        with torch.no_grad():
            bn.weight[2] = 0.0
    bn = None if case == "no-bn" else bn
    x = torch.randn(4, 3, 6, 6)

    def pre_relu():
        with torch.no_grad():
            y = conv(x)
            return bn(y) if bn is not None else y

    y0 = pre_relu()
    Q, q = torch.randn(5, 5), torch.randn(5)
    expected = torch.einsum("oc,nchw->nohw", Q, y0) + q.view(1, -1, 1, 1)
    merge_pointwise(conv, bn, torch.eye(5))
    assert torch.allclose(pre_relu(), y0, atol=1e-5)  # the identity 1x1 changes nothing
    merge_pointwise(conv, bn, Q, q)
    assert torch.allclose(pre_relu(), expected, atol=1e-4)


def test_fskd_fit_recovers_a_pointwise_map_and_is_identity_when_features_agree():
    ys = torch.randn(6, 4, 5, 5)
    Q = torch.randn(4, 4)
    yt = torch.einsum("oc,nchw->nohw", Q, ys)
    Qf, _ = fit_pointwise(ys, yt, ridge=0.0)
    assert torch.allclose(Qf.float(), Q, atol=1e-4)
    Qi, _ = fit_pointwise(ys, ys, ridge=1e-3)
    assert torch.allclose(Qi.float(), torch.eye(4), atol=1e-5)


def _outputs(model, names, x):
    """Outputs of the named modules (cloned before in-place ReLUs)."""
    store = {}

    def hook(name):
        return lambda _m, _i, o: store.__setitem__(name, o.clone())

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return store


def test_fskd_lowers_each_layers_feature_error_and_the_merged_student_has_it():
    teacher, images, labels = _teacher("resnet20")
    student, report = run_baseline("fskd", teacher, images)
    points = [r.name.replace("conv2", "bn2") for r in report.layers]
    ys, yt = _outputs(student, points, images), _outputs(teacher, points, images)
    for r, p in zip(report.layers, points, strict=True):
        assert r.loss_after < r.loss_before
        assert F.mse_loss(ys[p].double(), yt[p].double()).item() == pytest.approx(r.loss_after, rel=1e-3)


def test_fskd_compares_pruned_outputs_with_the_teachers_kept_channels():
    teacher, images, _ = _teacher("vgg")
    student, report = run_baseline("fskd", teacher, images)
    first = report.layers[0]  # features.3, whose own outputs are pruned by features.7
    kept = filter_l1_keep(teacher.features[3], keep_count(8, 0.5))
    ys, yt = _outputs(student, ["features.4"], images), _outputs(teacher, ["features.4"], images)
    err = F.mse_loss(ys["features.4"].double(), yt["features.4"][:, kept].double()).item()
    assert err == pytest.approx(first.loss_after, rel=1e-3) and first.loss_after < first.loss_before


# --------------------------------------------------------------------------- ThiNet and CP


@pytest.mark.parametrize("name", ["thinet", "cp"])
def test_channel_selection_keeps_exactly_the_requested_count(name):
    teacher, images, _ = _teacher("resnet20")
    student, report = run_baseline(name, teacher, images, keep=0.3, keep_overrides={"layer3.*": 0.6})
    for r in report.layers:
        ratio = 0.6 if r.name.startswith("layer3") else 0.3
        assert r.kept == keep_count(r.total, ratio) == student.get_submodule(r.name).in_channels


def test_lasso_select_is_exact_for_every_count():
    torch.manual_seed(1)
    Z = torch.randn(200, 9, dtype=torch.float64)
    y = Z @ torch.rand(9, dtype=torch.float64)
    G, b = Z.T @ Z, Z.T @ y
    for n in range(1, 10):
        kept, beta = lasso_select(G, b, n)
        assert len(kept) == n and len(set(kept.tolist())) == n


def test_greedy_removal_minimises_the_energy_of_the_removed_set():
    G = torch.diag(torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0], dtype=torch.float64))
    assert greedy_removal(G, 3).tolist() == [0, 2, 4]
    # channel 2 goes first (weakest); channel 1 cancels it, so it goes next although it is stronger than 0
    G = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.5, -2.0], [0.0, -2.0, 3.0]], dtype=torch.float64)
    assert greedy_removal(G, 1).tolist() == [0]


def test_contribution_gram_matches_explicit_channel_contributions():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    hT, hS = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    w = conv.weight.detach()
    stats = LayerStats(conv)
    stats.add_batch(hT, hS)
    G, b = contribution_gram(stats.system([Term(1.0, 1, 0, 0, 1)], w), w)  # target W * hT, inputs hS
    Z = [F.conv2d(hS[:, c : c + 1], w[:, c : c + 1], padding=1).flatten().double() for c in range(3)]
    y = F.conv2d(hT, w, padding=1).flatten().double()
    for i, j in itertools.product(range(3), range(3)):
        assert G[i, j].item() == pytest.approx(float(Z[i] @ Z[j]), rel=1e-6)
    assert torch.allclose(b, torch.stack([z @ y for z in Z]), rtol=1e-6)


def test_thinet_full_least_squares_fits_at_least_as_well_as_scaling():
    teacher, images, _ = _teacher("vgg")
    _, scale = run_baseline("thinet", teacher, images, reconstruct="scale", ridge=0.0)
    _, full = run_baseline("thinet", teacher, images, reconstruct="lstsq", ridge=0.0)
    # first pruned layer: same inputs and same greedy selection; scaling is a special case of full least squares
    assert full.layers[0].loss_after <= scale.layers[0].loss_after + 1e-9
    assert scale.layers[0].loss_after > 0


def test_lasso_select_finds_the_support_of_a_sparse_combination():
    torch.manual_seed(3)
    Z = torch.randn(300, 8, dtype=torch.float64)
    y = Z[:, [1, 4, 6]] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    kept, beta = lasso_select(Z.T @ Z, Z.T @ y, 3)
    assert kept.tolist() == [1, 4, 6]


def test_baselines_do_not_share_state_between_runs():
    teacher, images, labels = _teacher("vgg")
    a, _ = run_baseline("l1", teacher, images)
    b, _ = run_baseline("l1", copy.deepcopy(teacher), images)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
