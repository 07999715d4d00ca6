"""Per-layer output error against the teacher, and its plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from crossdistill.compress import compress
from crossdistill.diagnostics import layer_output_errors, plot_layer_errors
from crossdistill.models import get_model


def test_teacher_against_itself_has_zero_error_and_a_pruned_student_does_not(tmp_path: Path) -> None:
    teacher = get_model("resnet20", 10, 1).eval()
    x = torch.randn(8, 1, 16, 16)
    names = ["layer1.0.conv1", "layer1.0.conv2", "fc"]
    assert layer_output_errors(teacher, teacher, names, x) == [0.0, 0.0, 0.0]
    student, _ = compress(teacher, x, method="nc", keep=0.5)
    errs = layer_output_errors(teacher, student, names, x)
    assert math.isnan(errs[0])  # layer1.0.conv1 lost output channels: not comparable
    assert errs[1] > 0 and errs[2] > 0
    png = plot_layer_errors({"NC": errs}, names, tmp_path / "e.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
