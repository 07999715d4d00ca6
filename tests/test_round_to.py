"""round_to: kept channel counts rounded to a multiple kernels like, never to zero, never above the width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.methods import run_method
from crossdistill.plan import LayerPlan, round_count


@pytest.mark.parametrize(
    ("n", "multiple", "low", "high", "expected"),
    [
        (36, 8, 1, 72, 32),  # 4.5 multiples: ties round down
        (37, 8, 1, 72, 40),
        (3, 8, 1, 64, 8),  # never to zero
        (70, 8, 1, 72, 72),
        (71, 16, 1, 72, 64),  # never above the width
        (5, 8, 1, 6, 5),  # no multiple of 8 fits a 6-wide layer: left as is
        (17, 8, 15, 20, 16),  # a concatenation consumer: at least its fixed channels + 1
        (12, 1, 1, 24, 12),
    ],
)
def test_round_count(n: int, multiple: int, low: int, high: int, expected: int) -> None:
    assert round_count(n, multiple, low, high) == expected


def test_plan_kept_counts_are_multiples() -> None:
    assert LayerPlan("a", 0.45, None, 8).n_keep(80) == 32  # floor(0.45 * 80) = 36 -> 32
    assert LayerPlan("a", 0.5, list(range(14, 20)), 8).n_keep(20) == 16  # 14 fixed + 3 -> 16


def _chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
        nn.Conv2d(40, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", ["ours", "l1"])
def test_students_have_rounded_widths(method: str) -> None:
    x = torch.randn(8, 3, 10, 10)
    student, report = run_method(method, _chain(), x, keep=0.3, round_to=8)
    # floor(0.3 * 40) = 12 -> 8 (tie down); floor(0.3 * 48) = 14 -> 16
    assert (student[3].in_channels, student[6].in_channels) == (8, 16)
    assert {r.name: r.kept for r in report.layers if r.kept < r.total} == {"3": 8, "6": 16}
    assert torch.isfinite(student(x)).all()


def test_round_to_must_be_a_positive_whole_number() -> None:
    with pytest.raises(UserError, match="round_to must be a whole number"):
        compress(_chain(), torch.randn(4, 3, 10, 10), round_to=0)


def test_cli_has_the_round_to_option() -> None:
    from typer.testing import CliRunner

    from crossdistill.cli import app

    res = CliRunner().invoke(app, ["compress", "--help"])
    assert res.exit_code == 0 and "--round-to" in res.output


def test_prunable_is_the_listed_channels_or_every_input_channel() -> None:
    model = nn.Sequential(nn.Conv2d(6, 4, 3), nn.Conv2d(4, 2, 1))
    assert LayerPlan("0", 0.5).prunable(model) == 6
    assert LayerPlan("1", 0.5, [0, 2, 3]).prunable(model) == 3
