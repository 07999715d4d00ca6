"""What a compression no longer repeats: the FLOP count after (from the shapes, FlopCounterMode's own number)
and the student's output for the report's error (the end of the one-pass stream, the student's own output)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.capture import GraphStream
from crossdistill.compress import compress
from crossdistill.measure import FlopCount, count_flops
from crossdistill.run import output_error

sys.path.insert(0, str(Path(__file__).parent))
from zoo import cache_net, noise_batch  # noqa: E402


class _MatmulHead(nn.Module):
    """A conv net whose forward multiplies two maps itself: FLOPs outside any Conv2d / Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return (h.flatten(2) @ h.flatten(2).transpose(1, 2)).flatten(1)


@pytest.mark.parametrize("arch", ["resnet20", "densenet", "mobilenet", "ghost", "matmul"])
def test_flops_after_from_the_shapes_are_flop_counter_modes_own(arch: str) -> None:
    model = _MatmulHead().eval() if arch == "matmul" else cache_net(arch)
    counted = FlopCount(model, (3, 16, 16))
    assert counted.total == count_flops(model, (3, 16, 16))
    assert (counted.per_weight is None) == (arch == "matmul")  # a matmul in forward: counted again
    student, report = compress(model, noise_batch(8), method="ours", keep=0.5)
    assert report.flops_after < report.flops_before == counted.total
    assert report.flops_after == counted.recount(student) == count_flops(student, (3, 16, 16))


def test_flops_are_counted_again_when_the_layers_differ() -> None:
    model = cache_net("resnet20")
    counted = FlopCount(model, (3, 16, 16))
    other = copy.deepcopy(model)
    other.fc = nn.Sequential(nn.Linear(other.fc.in_features, 7), nn.Linear(7, 5))  # a layer more
    assert counted.recount(other) == count_flops(other, (3, 16, 16))


def test_the_stream_ends_with_the_models_own_output() -> None:
    model, x = cache_net("resnet20"), noise_batch(10)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    stream = GraphStream(model, names, [[n] for n in names], x, batch_size=4)
    stream.with_output()
    for name in names:
        stream.next_input()
        with torch.no_grad():
            model.get_submodule(name).weight.mul_(0.9)  # each step changes its layer, as a re-fit does
    with torch.no_grad():
        expected = torch.cat([model(x[i : i + 4]) for i in range(0, 10, 4)])
    assert torch.equal(stream.output(), expected)


@pytest.mark.parametrize("arch", ["resnet20", "densenet", "mobilenet"])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_the_reports_output_error_is_the_students_own(arch: str, recalibrate: bool, monkeypatch) -> None:
    ends = []
    original = GraphStream.output
    monkeypatch.setattr(GraphStream, "output", lambda self: ends.append(1) or original(self))
    model, x = cache_net(arch), noise_batch(8)
    student, report = compress(model, x, method="ours", keep=0.5, recalibrate_bn=recalibrate)
    assert report.capture == "one-pass"
    assert len(ends) == (0 if recalibrate else 1)  # BN statistics re-estimated after the stream: run again
    assert report.output_error == output_error(student, model, x)
