"""A user's own model file, weights and image folder, through the library and the CLI; ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from crossdistill.checkpoint import load_checkpoint
from crossdistill.cli import app
from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.student import save_student
from crossdistill.usermodel import images_from_folder, load_model_file, load_weights

runner = CliRunner()

MODEL_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


def build():
    return Net()
"""


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    """model.py, weights.pt, a flat folder of 12 unlabelled PNGs and a labelled test folder (2 classes x 4)."""
    (tmp_path / "model.py").write_text(MODEL_SOURCE)
    torch.manual_seed(0)
    model = load_model_file(f"{tmp_path / 'model.py'}:build")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    rng = np.random.default_rng(0)
    few = tmp_path / "few"
    few.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(few / f"{i}.png")
    for c in ("cat", "dog"):
        (tmp_path / "test" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "test" / c / f"{i}.png")
    return {"root": tmp_path, "model": tmp_path / "model.py", "weights": tmp_path / "weights.pt",
            "few": few, "test": tmp_path / "test"}  # fmt: skip


def test_images_from_folder_normalises_with_the_images_own_statistics(user_files) -> None:
    x, labels, mean, std, classes = images_from_folder(user_files["few"], channels=3)
    assert x.shape == (12, 3, 16, 16) and classes == [] and (labels == -1).all()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    y, *_ = images_from_folder(user_files["few"], channels=3, mean=[0.5], std=[0.25])
    raw = np.asarray(Image.open(user_files["few"] / "0.png"), dtype=np.float32) / 255
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor((raw[0, 0] - 0.5) / 0.25))


def test_model_file_errors_name_the_problem(user_files, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="path/to/file.py:function"):
        load_model_file(str(user_files["model"]))
    with pytest.raises(UserError, match="no function 'nope'"):
        load_model_file(f"{user_files['model']}:nope")
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(f"{tmp_path / 'missing.py'}:build")
    bad = tmp_path / "bad.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="do not fit the model"):
        load_weights(load_model_file(f"{user_files['model']}:build"), bad)


def test_student_of_a_user_model_saves_and_reloads_everywhere(user_files, tmp_path: Path) -> None:
    model = load_weights(load_model_file(f"{user_files['model']}:build"), user_files["weights"])
    x, *_ = images_from_folder(user_files["few"], channels=3)
    student, report = compress(model, x, keep=0.5)
    assert report.params_after < report.params_before
    meta = {"model_file": f"{user_files['model']}:build", "in_channels": 3}
    paths = save_student(student, tmp_path / "out", meta, report.to_dict(), x, onnx=False)
    rebuilt, saved_meta = load_checkpoint(paths["weights"], trust_model_file=True)  # our own file: trusted
    # the model file is copied into the folder and named relative to it (a moved folder still loads)
    assert saved_meta["model_file"] == "model.py:build" and (tmp_path / "out" / "model.py").is_file()
    assert saved_meta["model_file_source"] == str(user_files["model"].resolve())
    torch.testing.assert_close(rebuilt(x), student(x))
    program = torch.export.load(str(paths["program"])).module()
    torch.testing.assert_close(program(x[:5]), student(x[:5]))
    assert "onnx" not in paths


def test_onnx_export_matches_pytorch_in_onnxruntime(user_files, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = load_weights(load_model_file(f"{user_files['model']}:build"), user_files["weights"])
    x, *_ = images_from_folder(user_files["few"], channels=3)
    student, report = compress(model, x, keep=0.5)
    paths = save_student(student, tmp_path / "out", {"model_file": f"{user_files['model']}:build"},
                         report.to_dict(), x)  # fmt: skip
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 7):  # the batch dimension is dynamic
        (out,) = session.run(None, {"images": x[:batch].numpy()})
        np.testing.assert_allclose(out, student(x[:batch]).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_cli_compresses_a_user_model_from_an_image_folder(user_files) -> None:
    out = user_files["root"] / "student"
    keep_file = user_files["root"] / "layers.yaml"
    keep_file.write_text('"features.10": 0.25\n')
    res = runner.invoke(app, [
        "compress", "--model-file", f"{user_files['model']}:build", "--weights", str(user_files["weights"]),
        "--images", str(user_files["few"]), "--test-images", str(user_files["test"]), "--keep-file", str(keep_file),
        "--out", str(out), "--no-latency",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Top-1 accuracy" in res.output
    student, meta = load_checkpoint(out / "student.safetensors", model_file=f"{user_files['model']}:build")
    assert student.features[10].in_channels == 4  # 16 * 0.25 from the keep file
    assert student.features[6].in_channels == 4  # 8 * 0.5: the depthwise conv's channels went with it
    assert student.features[3].groups == student.features[3].out_channels == 4
    assert len(meta["mean"]) == 3 and meta["model_file"].endswith("model.py:build")
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["teacher"]["test_images"] == 8
    assert report["flops_after"] < report["flops_before"]


def test_cli_without_test_images_reports_no_accuracy(user_files) -> None:
    out = user_files["root"] / "student"
    res = runner.invoke(app, ["compress", "--model-file", f"{user_files['model']}:build", "--images",
                              str(user_files["few"]), "--out", str(out), "--no-latency", "--mean", "0.5",
                              "--std", "0.5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["teacher"]["accuracy"] is None
    assert json.loads((out / "student.json").read_text())["mean"] == [0.5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "--images", "x"], "either --teacher"),
        (["compress", "--model-file", "m.py:build"], "needs --images"),
        (["compress", "--model-file", "nothere.py:build", "--images", "."], "does not exist"),
    ],
)
def test_cli_user_model_mistakes_are_one_line(args: list[str], message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in " ".join(res.output.split()) and "Traceback" not in res.output


def test_cli_reports_the_error_on_val_images(user_files) -> None:
    out = user_files["root"] / "student"
    res = runner.invoke(app, ["compress", "--model-file", f"{user_files['model']}:build", "--images",
                              str(user_files["few"]), "--val-images", str(user_files["test"]), "--out", str(out),
                              "--no-latency"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "held-out output error" in " ".join(res.output.split())
    held = json.loads((out / "report.json").read_text())["heldout"]
    assert held["images"] == 8 and held["output_error"] >= 0 and held["fit_output_error"] >= 0
    assert held["layers"]  # per layer: the re-fitted layers whose output width is the teacher's
