"""The worked example runs end to end (subprocess, as a user would run it) and its student reloads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from crossdistill.checkpoint import load_checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "compress_custom_model.py"


def test_compress_custom_model_example_runs_and_exports(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path), "--train-images", "1000", "--epochs", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "compressed with 50 images (10 classes)" in res.stdout and "done in" in res.stdout
    student_dir = tmp_path / "student"
    assert {p.name for p in student_dir.iterdir()} >= {"student.safetensors", "student.json", "student.pt2"}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        assert "onnxruntime output matches PyTorch" in res.stdout
    # the student rebuilds from the example's build() plus the recorded widths, and equals the export
    student, meta = load_checkpoint(student_dir / "student.safetensors", model_file=f"{EXAMPLE}:build")
    assert meta["model_file"].endswith("compress_custom_model.py:build")
    program = torch.export.load(str(student_dir / "student.pt2")).module()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(program(x), student(x))
