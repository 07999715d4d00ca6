"""Latency targets: the calibration root-finds the table's target on a (fake, deterministic) timed ratio; an
out-of-reach channel target names its bound; mixed drops more blocks where channels time slower than the table."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from crossdistill.calibrate import calibrate
from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.evaluate import count_flops
from crossdistill.models import get_model
from crossdistill.structure import DroppedBlock


def _continuous(asked: float):
    return asked, asked, round(asked, 6), False


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_calibration_converges_where_the_timed_ratio_is_an_affine_map_of_the_table(fraction: float) -> None:
    timed = []

    def timer(table: float) -> tuple[float, float]:
        timed.append(table)
        return 1.3 * table + 0.1 * (1 - table), 0.0  # slower than the table everywhere but at the teacher

    table, info = calibrate(fraction, _continuous, timer, rounds=8)
    assert info["met"] and abs(info["timed_ratio"] - fraction) <= 0.02
    assert info["table_ratio"] == table and table < fraction  # the table's target was lowered to get there
    assert info["rounds"] == len(timed) <= 4 and "bound" not in info


def test_calibration_stops_at_the_proposers_limit_and_names_the_bound() -> None:
    def propose(asked: float):  # nothing below 0.45 of the table: every layer at the lowest floor
        table = max(asked, 0.45)
        return table, table, round(table, 6), asked < 0.45 / 1.01

    table, info = calibrate(0.5, propose, lambda t: (1.3 * t + 0.1, 0.0), rounds=8)
    assert not info["met"] and info["bound"] == pytest.approx(1.3 * 0.45 + 0.1)
    assert table == 0.45 and info["timed_ratio"] == info["bound"]


def test_calibration_times_at_most_rounds_students_and_keeps_the_nearest() -> None:
    calls = []

    def timer(table: float) -> tuple[float, float]:
        calls.append(table)
        return 0.9, 0.0  # never moves: nothing the table asks gets nearer

    _, info = calibrate(0.5, _continuous, timer, rounds=3)
    assert len(calls) <= 3 and info["rounds"] == len(calls) and not info["met"]


def test_it_stops_within_one_noise_and_counts_two_noises_as_met() -> None:
    table, info = calibrate(0.5, _continuous, lambda t: (t + 0.015, 0.02), rounds=8)
    assert info["met"] and info["rounds"] == 1 and table == 0.5  # 0.515 is within the noise: stop
    table, info = calibrate(0.5, _continuous, lambda t: (t + 0.03, 0.02), rounds=8)
    assert info["rounds"] == 2 and abs(info["timed_ratio"] - 0.5) <= 0.02  # 0.53: met, but it aims nearer
    _, info = calibrate(0.5, _continuous, lambda t: (0.53, 0.02), rounds=3)  # never nearer than 0.53
    assert info["met"] and info["timed_ratio"] == 0.53  # within max(2 x 0.02, 0.02)


def test_a_load_spike_is_timed_again_rather_than_widening_the_tolerance() -> None:
    timings = iter([(0.7, 0.15), (0.62, 0.01)] + [(0.5, 0.01)] * 10)  # the first: one ratio hit by a spike

    _, info = calibrate(0.5, _continuous, lambda t: next(timings), rounds=8)
    assert info["met"] and info["timed_ratio"] == 0.5 and info["rounds"] == 2  # 0.7 +- 0.15 was not accepted


# --------------------------------------------------------------------------- through compress(), timing faked


def _blocks_left(model: nn.Module) -> float:
    from crossdistill.models import BasicBlock

    kept = sum(isinstance(m, BasicBlock) for m in model.modules())
    return kept / max(kept + sum(isinstance(m, DroppedBlock) for m in model.modules()), 1)


@pytest.fixture
def fake_latency(monkeypatch):
    """Latency stood in by FLOPs in the table; timed: FLOPs plus an overhead per residual block that channels
    cannot shrink (activations, sums; as measured on ResNet-56, benchmarks/probe_latency_bound.py) and a
    ``fixed`` share nothing removes."""
    import crossdistill.latency
    import crossdistill.target

    overhead = {"per_block": 0.0, "fixed": 0.0}

    def flops_ms(shape, batch=64, table=None):
        return lambda m: float(count_flops(m, shape))

    def timed(teacher, student, shape, batch):
        ratio = count_flops(student, shape) / count_flops(teacher, shape)
        o, fixed = overhead["per_block"], overhead["fixed"]
        return fixed + (1 - fixed) * ((1 - o) * ratio + o * _blocks_left(student)), 0.0

    monkeypatch.setattr(crossdistill.latency, "latency_measure", flops_ms)
    monkeypatch.setattr(crossdistill.target, "timed_ratio", timed)
    return overhead


def _resnet20():
    x = torch.randn(10, 1, 16, 16)
    model = get_model("resnet20", 10, 1)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def test_channels_out_of_reach_warn_with_the_timed_bound_and_record_it(fake_latency) -> None:
    fake_latency["per_block"] = 0.5  # half the latency does not shrink with channels: at best ~0.5
    model, x = _resnet20()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = compress(model, x, target={"latency": 0.3}, method="nc")
    text = " ".join(str(w.message) for w in caught)
    timing = report.allocation["timing"]
    assert "channels alone reach at most" in text and "depth='mixed'" in text
    assert timing["bound"] > 0.5 and not timing["met"] and f"{timing['bound']:.3f}" in text
    assert report.allocation["achieved"] == timing["timed_ratio"] == timing["bound"]


def test_mixed_drops_more_blocks_where_channels_time_slower_than_the_table(fake_latency) -> None:
    model, x = _resnet20()
    _, as_table = compress(model, x, target={"latency": 0.3}, method="nc", depth="mixed")
    fake_latency["per_block"] = 0.5
    student, timed = compress(model, x, target={"latency": 0.3}, method="nc", depth="mixed")
    assert len(timed.allocation["dropped_blocks"]) > len(as_table.allocation["dropped_blocks"])
    assert timed.allocation["timing"]["met"] and abs(timed.allocation["achieved"] - 0.3) <= 0.02
    ratio = count_flops(student, (1, 16, 16)) / count_flops(model, (1, 16, 16))
    assert timed.allocation["achieved"] == pytest.approx(0.5 * ratio + 0.5 * _blocks_left(student))


def test_blocks_meet_a_timed_target_to_one_block(fake_latency) -> None:
    fake_latency["per_block"] = 0.5
    model, x = _resnet20()
    student, report = compress(model, x, target={"latency": 0.5}, method="nc", depth="blocks")
    assert report.allocation["depth"] == "blocks" and report.allocation["dropped_blocks"]
    assert abs(report.allocation["achieved"] - 0.5) <= 0.06  # 9 blocks: about 0.1 of the latency each
    fake_latency["fixed"] = 0.2  # what no block drop removes (stem, head, input): 0.05 out of reach
    with pytest.raises(UserError, match="dropping every block"):
        compress(model, x, target={"latency": 0.05}, method="nc", depth="blocks")
