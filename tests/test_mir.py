"""MiR (method ``mir``) and ``refine="mir"``: every registry model, a torchvision-style model, the claims."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossdistill.compress import CompressConfig, compress, recalibrate_bn
from crossdistill.data import Split, few_shot_indices
from crossdistill.errors import UserError
from crossdistill.methods import run_method
from crossdistill.mir import MirConfig, MirExtras, feature_point, holdout_folds, mir_refine
from crossdistill.models import get_model, list_models

FEW = MirConfig(steps=3, batch_size=8)  # a few steps: the test checks plumbing, not accuracy


def _teacher(model: nn.Module, size: int = 16, n: int = 6, channels: int = 1) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(n, channels, size, size)
    recalibrate_bn(model, images)  # BN statistics of the images, as in a trained teacher
    return model.eval(), images


def _head(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers after the feature point: the classifier of each model used here."""
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("fc", "classifier")}


@pytest.mark.parametrize("name", list_models())
def test_mir_and_refine_run_on_every_registry_model_with_the_teachers_head_and_nc_counts(name):
    teacher, images = _teacher(get_model(name, 10, 1))
    nc, _ = compress(teacher, images, method="nc", keep=0.5)
    for student, report in (
        run_method("mir", teacher, images, keep=0.5, mir=FEW),
        compress(teacher, images, method="nc", keep=0.5, refine="mir", mir=FEW),
    ):
        assert student.widths == nc.widths
        # the global pool before the head: "pool" in the CIFAR families, torchvision's "avgpool" in the others
        pool = "avgpool" if name in ("resnet18", "mobilenet_v2") else "pool"
        assert report.refine["feature_layer"] == pool and report.refine["steps_run"] == 3
        head = _head(student)
        assert head and all(torch.equal(v, _head(teacher)[k]) for k, v in head.items())
        with torch.no_grad():
            out = student(images)
        assert out.shape == (len(images), 10) and torch.isfinite(out).all()


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand, projection shortcut)."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class TinyTorchvisionResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Bottleneck(8, 4), Bottleneck(16, 4))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FunctionalPoolNet(nn.Module):
    """Pools with F.adaptive_avg_pool2d: no pooling module, so the features are the last Linear's input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_feature_point_of_an_unknown_model_is_before_its_final_pooling_else_the_last_linear_input():
    x = torch.randn(1, 3, 16, 16)
    assert feature_point(TinyTorchvisionResNet(), x) == "avgpool"
    assert feature_point(FunctionalPoolNet(), x) == "fc"
    assert feature_point(FunctionalPoolNet(), x, "conv2") == "conv2"
    with pytest.raises(UserError, match="not a module"):
        feature_point(FunctionalPoolNet(), x, "nope")


def test_mir_and_refine_on_a_torchvision_style_bottleneck_resnet_lower_the_feature_loss():
    teacher, images = _teacher(TinyTorchvisionResNet(), size=12, n=8, channels=3)
    nc, _ = compress(teacher, images, method="nc", keep=0.5)
    fast = MirConfig(steps=30, lr=1e-3, augment=False)
    for student, report in (
        run_method("mir", teacher, images, keep=0.5, mir=fast),
        compress(teacher, images, method="nc", keep=0.5, refine="mir", mir=fast),
    ):
        assert student.widths == nc.widths
        assert report.refine["feature_layer"] == "avgpool"
        assert report.refine["loss_after"] < report.refine["loss_before"]
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in _head(student).items())


def test_refine_after_a_baseline_and_unstructured_sparsity_is_kept():
    teacher, images = _teacher(get_model("resnet20", 10, 1))
    l1, rep = run_method("l1", teacher, images, keep=0.5, prune="unstructured")
    refined, rep_r = run_method("l1", teacher, images, keep=0.5, prune="unstructured", refine="mir", mir=FEW)
    assert rep_r.refine["steps_run"] == 3 and rep_r.sparsity == pytest.approx(rep.sparsity)
    for (name, a), b in zip(l1.named_parameters(), refined.parameters(), strict=True):
        if a.dim() > 1:
            assert torch.equal(a == 0, b == 0), name
    assert any(not torch.equal(a, b) for a, b in zip(l1.parameters(), refined.parameters(), strict=True))


def test_mir_refine_leaves_input_student_and_teacher_untouched_and_rejects_bad_settings():
    teacher, images = _teacher(get_model("resnet20", 10, 1))
    student, _ = compress(teacher, images, method="nc", keep=0.5)
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    mir_refine(student, teacher, images, FEW)
    assert all(torch.equal(v, before_s[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    for bad in ({"optimizer": "lbfgs"}, {"steps": -1}, {"bn_mode": "x"}, {"holdout_folds": 1}, {"nope": 1}):
        with pytest.raises(UserError):
            mir_refine(student, teacher, images, FEW, **bad)
    with pytest.raises(UserError, match="refine"):
        CompressConfig(refine="bp").validate()


def test_holdout_folds_rotate_one_image_per_class_disjoint_from_training():
    labels = torch.arange(4).repeat_interleave(3)  # K = 3 per class, class order
    folds = holdout_folds(len(labels), 3, labels)
    assert len(folds) == 3
    seen = set()
    for train, held in folds:
        assert not set(train.tolist()) & set(held.tolist())
        assert sorted(train.tolist() + held.tolist()) == list(range(12))
        assert sorted(labels[held].tolist()) == [0, 1, 2, 3]  # one per class
        seen |= set(held.tolist())
    assert seen == set(range(12))  # every image held out once
    with pytest.raises(UserError, match="K >= 2"):
        holdout_folds(4, 2, torch.arange(4))


def test_holdout_chooses_the_steps_and_falls_back_to_fixed_steps_at_k1():
    teacher, images = _teacher(get_model("resnet20", 10, 1), n=8)
    student, _ = run_method("l1", teacher, images, keep=0.5)
    labels = torch.arange(4).repeat_interleave(2)
    cfg = MirConfig(steps=10, eval_every=5, holdout_folds=2, lr=1e-3)
    _, info = mir_refine(student, teacher, images, cfg, extras=MirExtras(labels=labels))
    assert info["holdout"]["folds"] == 2 and [s for s, _ in info["holdout"]["curve"]] == [0, 5, 10]
    assert info["steps_run"] == info["holdout"]["steps_chosen"]
    _, info = mir_refine(student, teacher, images, cfg, extras=MirExtras(labels=torch.arange(8)))  # K = 1
    assert info["holdout"] == {"skipped": "K = 1"} and info["steps_run"] == 10


def test_validation_images_keep_the_best_weights():
    teacher, images = _teacher(get_model("resnet20", 10, 1), n=8)
    student, _ = run_method("l1", teacher, images, keep=0.5)
    _, info = mir_refine(
        student, teacher, images[:4], MirConfig(steps=10, eval_every=5), extras=MirExtras(val_images=images[4:])
    )
    curve = info["validation"]["curve"]
    assert [s for s, _ in curve] == [0, 5, 10] and info["validation"]["best_loss"] == min(v for _, v in curve)


def test_validation_draw_is_disjoint_from_the_few_shot_draw():
    labels = torch.arange(5).repeat(20)
    split = Split(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels)
    draw = few_shot_indices(split, 3, seed=1)
    val = few_shot_indices(split, 10, seed=2, exclude=draw)
    assert not set(draw.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [10] * 5


def test_load_validation_draws_from_the_train_split_without_the_few_shot_images(fashion_dir):
    from crossdistill.data import load_dataset, load_few_shot, load_validation

    train = load_dataset("fashion-mnist", "train", fashion_dir)
    draw = few_shot_indices(train, 2, seed=0, num_classes=10)
    few, few_labels = load_few_shot("fashion-mnist", 2, seed=0, data_dir=fashion_dir)
    vx, vy = load_validation("fashion-mnist", 20, seed=0, exclude=draw, data_dir=fashion_dir)
    assert torch.equal(train.labels[draw], few_labels)  # the indices are load_few_shot's draw
    assert vx.shape == (200, 1, 28, 28) and torch.bincount(vy).tolist() == [20] * 10
    assert not (vx.flatten(1)[:, None] == few.flatten(1)[None]).all(-1).any()  # no few-shot image reused


class _Chain(nn.Module):
    """A user model without a class-level family: a plain chain, or with ``skip`` a residual sum."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h)) + h if self.skip else F.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def test_settings_per_model_family_registry_and_traced_user_models():
    from crossdistill.baselines import default_params
    from crossdistill.mir import method_defaults, refine_defaults
    from crossdistill.models import model_family

    assert [model_family(get_model(n, 10, 1)) for n in ("resnet20", "vgg16", "lenet5")] == [
        "residual",
        "plain",
        "plain",
    ]
    assert model_family(_Chain(skip=True)) == "residual" and model_family(_Chain(skip=False)) == "plain"
    resnet, vgg = get_model("resnet56", 10, 1), get_model("vgg16", 10, 1)
    for make in (method_defaults, refine_defaults):
        assert make(resnet).lr <= 1e-4 and make(vgg).lr <= 1e-4  # 1e-3 collapses both families (validation)
    assert method_defaults(resnet).recalibrate_bn and not refine_defaults(resnet).recalibrate_bn
    assert default_params("fitnet", resnet).lr == 1e-4 and default_params("l1+bp", vgg).lr == 1e-4
    assert default_params("thinet", resnet) == default_params("thinet", vgg)  # no per-family setting


def test_refine_without_settings_uses_the_teachers_family_defaults_after_compress_and_a_baseline(monkeypatch):
    from crossdistill import mir
    from crossdistill.mir import refine_defaults

    monkeypatch.setitem(mir._REFINE_DEFAULTS, "plain", {"lr": 3e-5, "steps": 2})  # cheap, and told apart
    teacher, images = _teacher(_Chain(skip=False))  # a plain chain
    for method in ("nc", "l1"):
        _, report = run_method(method, teacher, images, keep=0.5, refine="mir")
        expected = refine_defaults(teacher)
        assert report.refine["config"]["lr"] == expected.lr and report.refine["steps_run"] == expected.steps
        assert report.config["refine"] == "mir"
