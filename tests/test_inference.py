from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill.compress import CompressConfig, compress
from crossdistill.inference import count_batchnorms, optimize_for_inference
from crossdistill.models import get_model, list_models


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a wrong fold would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list_models())
def test_optimized_model_computes_the_same_function_without_batchnorm(name: str) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(get_model(name, num_classes=10, in_channels=1))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        fast = optimize_for_inference(model)
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert count_batchnorms(fast) == 0
    assert count_batchnorms(model) == count_batchnorms(get_model(name, 10, 1))  # the original is untouched
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compressed_student_keeps_its_outputs_after_optimization() -> None:
    torch.manual_seed(0)
    teacher = _randomize_bn(get_model("resnet20", 10, 1))
    student, _ = compress(teacher, torch.randn(20, 1, 28, 28), CompressConfig())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(optimize_for_inference(student)(x), student.eval()(x), rtol=1e-4, atol=1e-4)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # data-dependent branch: torch.fx cannot trace it


def test_untraceable_model_warns_and_still_runs() -> None:
    model = _randomize_bn(_Untraceable())
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="BatchNorm not folded"):
        fast = optimize_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    assert count_batchnorms(fast) == 1
