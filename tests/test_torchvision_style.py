"""ResNet-18 and MobileNetV2 of the registry: torchvision's layout, documented cost, every method, block drop, export.

The tests parametrized over ``list_models()`` (test_models, test_mir, test_reload, test_inference,
test_target) cover them too; these add what is particular to the torchvision families.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossdistill.baselines import BASELINES
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import compress, recalibrate_bn
from crossdistill.measure import count_flops, count_params
from crossdistill.methods import run_method
from crossdistill.mir import MirConfig
from crossdistill.models import get_model
from crossdistill.student import save_student

STEMS = {"resnet18": "conv1.weight", "mobilenet_v2": "features.0.0.weight"}
HEADS = {"resnet18": ("fc.weight", "fc.bias"), "mobilenet_v2": ("classifier.1.weight", "classifier.1.bias")}


def _teacher(name: str, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model(name, 10, 1)
    recalibrate_bn(model, x)  # BN statistics of the images, as in a trained teacher
    return model.eval()


@pytest.mark.parametrize("name", list(STEMS))
def test_state_dict_keys_and_shapes_are_torchvisions_but_for_the_stem_and_head(name: str) -> None:
    models = pytest.importorskip("torchvision.models")
    ref = getattr(models, name)().state_dict()  # 3 channels, 1000 classes
    ours = get_model(name, 10, 1).state_dict()
    assert list(ours) == list(ref)  # same names in the same order
    differ = {k for k in ref if ref[k].shape != ours[k].shape}
    assert differ == {STEMS[name], *HEADS[name]}


def test_mobilenet_v2_computes_torchvisions_function_from_its_weights() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ref = models.mobilenet_v2(num_classes=10).eval()
    ours = get_model("mobilenet_v2", 10, 3).eval()
    ours.load_state_dict(ref.state_dict())
    ours.features[0][0].stride = (2, 2)  # torchvision's stem; the rest must be torchvision's as it is
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_cost_per_28x28_image_is_the_documented_one() -> None:
    # the numbers in crossdistill/torchvision_style.py's docstring
    for name, flops, params in (("resnet18", 243_636_736, 11_172_810), ("mobilenet_v2", 43_501_216, 2_236_106)):
        model = get_model(name, 10, 1)
        assert (count_flops(model, (1, 28, 28)), count_params(model)) == (flops, params)


METHODS = ["nc", "ours", "ours-s", *BASELINES]
# few training steps so that each method runs in seconds on one core
FAST = {"l1+bp": {"iterations": 20}, "fitnet": {"hint_iterations": 20, "kd_iterations": 20},
        "cp": {"lasso_iterations": 50, "search_steps": 10}, "mir": {"mir": MirConfig(steps=3)}}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_every_method_narrows_mobilenet_v2_to_the_same_widths(method: str) -> None:
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % 3
    teacher = _teacher("mobilenet_v2", x)
    student, report = run_method(method, teacher, x, labels, keep=0.5, **FAST.get(method, {}))
    reference, _ = run_method("l1", teacher, x, keep=0.5)
    assert student.widths == reference.widths
    assert report.params_after < 0.5 * report.params_before  # every expand / project pair halved
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()


@pytest.mark.parametrize("method", ["ours", "ours-s"])
def test_resnet18_compresses_its_inner_convs(method: str) -> None:
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    teacher = _teacher("resnet18", x)
    student, report = run_method(method, teacher, x, keep=0.5)
    for s in range(1, 5):
        for b in range(2):  # the official rule: each block's inner width halved, its output kept
            conv, ref = student.get_submodule(f"layer{s}.{b}.conv2"), teacher.get_submodule(f"layer{s}.{b}.conv2")
            assert (conv.in_channels, conv.out_channels) == (ref.in_channels // 2, ref.out_channels)
    assert report.flops_after < 0.6 * report.flops_before
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()


def test_unstructured_resnet18_keeps_its_shapes() -> None:
    # (MobileNetV2 too, but its 1280 per-filter solves of the last 1x1 conv take 25 s on one core)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    teacher = _teacher("resnet18", x)
    student, report = compress(teacher, x, method="ours", prune="unstructured", keep=0.1)
    assert report.sparsity > 0.5
    assert [p.shape for p in student.parameters()] == [p.shape for p in teacher.parameters()]


def test_resnet18_drops_blocks_and_its_student_exports_and_reloads(tmp_path: Path) -> None:
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    student, report = compress(_teacher("resnet18", x), x, target={"flops": 0.7}, depth="blocks", method="nc")
    dropped = report.allocation["dropped_blocks"]
    assert dropped and report.flops_after <= 0.7 * 1.01 * report.flops_before
    meta = {"model": "resnet18", "num_classes": 10, "in_channels": 1}
    paths = save_student(student, tmp_path / "out", meta, report.to_dict(), x[:2])  # ONNX too if installed
    assert all(p.stat().st_size > 0 for p in paths.values())
    loaded, _ = load_checkpoint(paths["weights"])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), student.eval()(x))
