"""Exact reload: a saved student, its folder moved, loads back as the same network (equal outputs).

Students of every registry model and of the architecture patterns in tests/zoo.py (a BatchNorm
subclass owning its activation, squeeze-excite, concatenation, inverted residuals, channels-last
Linear blocks) are compressed, saved with ``save_student``, the folder is renamed, and
``load_checkpoint`` must rebuild a network whose outputs equal the in-memory student's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.baselines import l1_prune
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import compress, recalibrate_bn
from crossdistill.errors import UserError
from crossdistill.models import get_model, list_models, load_model_file
from crossdistill.structure import apply_widths, layer_widths
from crossdistill.student import save_student

ZOO = Path(__file__).parent / "zoo.py"
ZOO_MODELS = ["bn_act", "inverted_residual", "efficientnet", "mobilenet_v3", "convnext", "densenet", "ghostnet",
              "squeezenet"]  # fmt: skip


def _zoo(name: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = load_model_file(f"{ZOO}:{name}")
    recalibrate_bn(model, x)
    return model.eval()


def _save_move_load(tmp_path: Path, student: nn.Module, meta: dict, x: torch.Tensor, report: dict) -> nn.Module:
    save_student(student, tmp_path / "out", meta, report, x[:2], onnx=False)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    (tmp_path / "out").rename(moved)
    loaded, _ = load_checkpoint(moved / "student.safetensors", trust_model_file=True)
    return loaded


def _assert_same(student: nn.Module, loaded: nn.Module, x: torch.Tensor) -> None:
    assert [type(m).__name__ for m in student.modules()] == [type(m).__name__ for m in loaded.modules()]
    with torch.no_grad():
        assert torch.equal(student.eval()(x), loaded(x))


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_student_reloads_exactly_from_a_moved_folder(tmp_path: Path, name: str) -> None:
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    teacher = _zoo(name, x)
    student, report = compress(teacher, x, method="ours", keep=0.5, include_linear=True)
    assert report.params_after < report.params_before, name  # something was narrowed
    with pytest.warns(UserWarning, match="trust_model_file"):
        loaded = _save_move_load(tmp_path, student, {"model_file": f"{ZOO}:{name}"}, x, report.to_dict())
    _assert_same(student, loaded, x)


@pytest.mark.parametrize("name", list_models())
def test_registry_student_reloads_exactly(tmp_path: Path, name: str) -> None:
    in_ch, size = (1, 28) if name == "lenet5" else (3, 32)
    x = torch.randn(4, in_ch, size, size, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    teacher = get_model(name, 10, in_ch).eval()
    student, report = l1_prune(teacher, x, keep=0.5)
    assert report.params_after < report.params_before
    meta = {"model": name, "num_classes": 10, "in_channels": in_ch}
    _assert_same(student, _save_move_load(tmp_path, student, meta, x, report.to_dict()), x)


def test_a_batchnorm_subclass_keeps_its_activation_after_resizing() -> None:
    # rebuilding BatchNormAct2d from its class and num_features turned SiLU / ReLU6 / Identity into ReLU
    x = torch.randn(8, 3, 16, 16)
    student, _ = compress(_zoo("bn_act", x), x, keep=0.5)
    fresh = load_model_file(f"{ZOO}:bn_act")
    apply_widths(fresh, layer_widths(student))
    fresh.load_state_dict(student.state_dict())
    assert [type(fresh[i].act) for i in (1, 3, 5, 7)] == [nn.SiLU, nn.ReLU6, nn.Identity, nn.SiLU]
    assert fresh[3].eps == 1e-3 and fresh[3].num_features == student[3].num_features < 16
    _assert_same(student, fresh.eval(), x)


def test_the_model_file_travels_with_the_student_and_still_needs_trust(tmp_path: Path) -> None:
    x = torch.randn(8, 3, 16, 16)
    student, report = compress(_zoo("squeezenet", x), x, keep=0.5)
    paths = save_student(student, tmp_path / "out", {"model_file": f"{ZOO}:squeezenet"}, {}, x[:2], onnx=False)
    assert paths["model_file"].read_text() == ZOO.read_text()
    side = (tmp_path / "out" / "student.json").read_text()
    assert '"model_file": "zoo.py:squeezenet"' in side  # relative to the folder
    with pytest.raises(UserError, match="--trust-model-file"):
        load_checkpoint(tmp_path / "out" / "student.safetensors")


def test_old_sidecars_without_shapes_still_load() -> None:
    student = get_model("lenet5", 10, 1)
    student.features[0] = nn.Conv2d(1, 4, 5, padding=2)
    student.features[3] = nn.Conv2d(4, 9, 5)
    student.classifier[0] = nn.Linear(9 * 25, 120)
    old = {
        "features.0": {"type": "conv2d", "in": 1, "out": 4, "groups": 1},
        "features.3": {"type": "conv2d", "in": 4, "out": 9, "groups": 1},
        "classifier.0": {"type": "linear", "in": 225, "out": 120},
    }
    rebuilt = apply_widths(get_model("lenet5", 10, 1), old)
    rebuilt.load_state_dict(student.state_dict())
    assert rebuilt.features[3].out_channels == 9 and rebuilt.classifier[0].in_features == 225
