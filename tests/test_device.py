"""--device: compression, solvers and evaluation on a CUDA GPU give the CPU's student (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.evaluate import accuracy, evaluate
from crossdistill.models import get_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _images(n: int = 8, channels: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, 16, 16, generator=torch.Generator().manual_seed(0))


def _depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip


def test_auto_device_runs_where_there_is_no_gpu_too() -> None:
    model = get_model("lenet5", 10, 1).eval()
    student, report = compress(model, torch.randn(4, 1, 28, 28), device="auto", keep=0.5)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(student.parameters()).device.type == expected
    assert report.params_after < report.params_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no CUDA GPU"):
        compress(get_model("lenet5", 10, 1), torch.randn(2, 1, 28, 28), device="cuda")


@needs_cuda
@pytest.mark.parametrize("prune", ["structured", "unstructured"])
@pytest.mark.parametrize("build", [lambda: get_model("resnet20", 10, 1).eval(), _depthwise_net], ids=["resnet20", "dw"])
def test_cuda_student_matches_the_cpu_student(build, prune) -> None:
    torch.manual_seed(0)
    teacher, x = build(), _images()
    cpu, rep_cpu = compress(teacher, x, keep=0.5, prune=prune, method="nc")
    gpu, rep_gpu = compress(teacher, x, keep=0.5, prune=prune, method="nc", device="cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert rep_gpu.peak_memory_mb is not None and rep_gpu.params_after == rep_cpu.params_after
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_adam_solver_and_evaluation_stay_on_the_gpu() -> None:
    teacher, x = _depthwise_net(), _images()
    student, _ = compress(teacher, x, keep=0.5, solver="adam", iterations=10, device="cuda")
    report = evaluate(student, input_shape=(1, 16, 16), latency=False)
    assert report.params < sum(p.numel() for p in teacher.parameters())
    acc = accuracy(student, x, torch.zeros(len(x), dtype=torch.long))
    assert 0.0 <= acc <= 1.0
