from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.nn.utils import prune

from crossdistill.checkpoint import save_checkpoint
from crossdistill.cli import render_table
from crossdistill.data import Split
from crossdistill.errors import UserError
from crossdistill.evaluate import EvalReport, evaluate, evaluate_checkpoint
from crossdistill.measure import (
    checkpoint_size,
    count_flops,
    count_nonzero_params,
    count_params,
    count_sparse_flops,
    measure_latency,
    measure_latency_pair,
    state_dict_size,
)
from crossdistill.models import get_model

SHAPE = (1, 8, 8)


def tiny(width: int = 4, classes: int = 3) -> nn.Sequential:
    """Conv2d(1, width, 3, no bias) on 1x8x8 -> width x 6 x 6 -> Linear(width*36, classes)."""
    return nn.Sequential(nn.Conv2d(1, width, 3, bias=False), nn.Flatten(), nn.Linear(width * 36, classes))


def hand_params(width: int, classes: int = 3) -> int:
    return width * 1 * 3 * 3 + width * 36 * classes + classes


def hand_flops(width: int, classes: int = 3) -> int:
    conv = 2 * (width * 6 * 6) * (1 * 3 * 3)  # 2 FLOPs per MAC, one 3x3x1 dot product per output pixel
    linear = 2 * (width * 36) * classes
    return conv + linear


def test_params_and_flops_match_hand_count() -> None:
    model = tiny()
    assert count_params(model) == hand_params(4) == 471
    assert count_flops(model, SHAPE) == hand_flops(4) == 3456
    assert count_nonzero_params(model) == 471
    assert count_sparse_flops(model, SHAPE) == 3456


def test_removed_channels_reduce_flops() -> None:
    full, narrow = tiny(4), tiny(4)
    keep = [0, 2]  # physically remove conv filters 1 and 3 and the linear columns they fed
    narrow[0] = nn.Conv2d(1, 2, 3, bias=False)
    narrow[0].weight.data = full[0].weight.data[keep].clone()
    cols = torch.arange(4 * 36).view(4, 36)[keep].flatten()
    narrow[2] = nn.Linear(72, 3)
    narrow[2].weight.data = full[2].weight.data[:, cols].clone()
    assert count_flops(full, SHAPE) - count_flops(narrow, SHAPE) == hand_flops(4) - hand_flops(2) == 1728
    assert count_params(narrow) == hand_params(2)


def test_sparse_flops_halve_with_half_the_weights() -> None:
    model = tiny()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight.view(-1)
            w[torch.randperm(w.numel())[: w.numel() // 2]] = 0
        model[2].bias.fill_(1.0)
    assert count_flops(model, SHAPE) == 3456  # dense FLOPs do not see zeros
    assert count_sparse_flops(model, SHAPE) == 3456 // 2
    assert count_nonzero_params(model) == 18 + 216 + 3


def test_torch_prune_masks_are_counted() -> None:
    model = tiny()
    prune.l1_unstructured(model[2], "weight", amount=0.5)  # weight -> weight_orig * weight_mask
    assert count_params(model) == 471
    assert count_nonzero_params(model) == 36 + 216 + 3
    assert count_sparse_flops(model, SHAPE) == 2592 + 864 // 2


@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_dense_sparse_flops_agree_with_counter(name: str, shape: tuple[int, ...]) -> None:
    model = get_model(name, 10, shape[0]).train()
    flops = count_flops(model, shape)
    assert flops > 0 and count_sparse_flops(model, shape) == flops
    assert model.training  # mode restored


def test_lenet5_flops_hand_count() -> None:
    convs = 2 * (6 * 28 * 28 * 25) + 2 * (16 * 10 * 10 * 6 * 25)
    linears = 2 * (400 * 120 + 120 * 84 + 84 * 10)
    assert count_flops(get_model("lenet5", 10, 1), (1, 28, 28)) == convs + linears


def test_counting_does_not_touch_batchnorm_stats() -> None:
    model = get_model("resnet20", 10, 1).train()
    before = model.bn1.running_mean.clone()
    count_flops(model, (1, 28, 28))
    measure_latency(model, (1, 28, 28), 2, warmup=1, repeats=1)
    assert torch.equal(model.bn1.running_mean, before)


def test_latency_is_positive() -> None:
    model = tiny()
    t1 = measure_latency(model, SHAPE, 1, warmup=1, repeats=3)
    t8 = measure_latency(model, SHAPE, 8, warmup=1, repeats=3)
    assert 0 < t1 < 1 and 0 < t8 < 1


def test_sizes(tmp_path: Path) -> None:
    model = tiny()
    size = state_dict_size(model)
    raw = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert raw < size < raw + 1024  # payload plus a small JSON header
    assert state_dict_size(model, torch.float16) < 0.6 * size
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"model": "x", "num_classes": 3, "in_channels": 1})
    assert checkpoint_size(path) == os.path.getsize(path) == size
    with pytest.raises(UserError):
        checkpoint_size(tmp_path / "missing.safetensors")


def constant_model() -> nn.Sequential:
    """Always predicts class 0."""
    model = tiny()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    return model


def synthetic_split(n: int = 40) -> Split:
    images = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0] * (n // 4))
    return Split(images, labels)


def test_evaluate_on_synthetic_split() -> None:
    report = evaluate(constant_model(), "fashion-mnist", split=synthetic_split(), latency=True, repeats=2)
    assert isinstance(report, EvalReport)
    assert report.accuracy == pytest.approx(0.5) and report.test_images == 40
    assert report.input_shape == SHAPE
    assert (report.params, report.flops) == (471, 3456)
    assert report.nonzero_params == 36 + 1 and report.sparse_flops == 2592  # zeroed Linear costs nothing
    assert report.size_bytes == state_dict_size(constant_model())
    assert report.latency_b1_ms > 0 and report.latency_b64_ms > 0
    assert report.threads == torch.get_num_threads()
    d = report.to_dict()
    assert d["accuracy"] == report.accuracy and d["input_shape"] == [1, 8, 8]


def test_evaluate_limit_and_unlabelled() -> None:
    split = synthetic_split()
    report = evaluate(tiny(), "fashion-mnist", split=split, limit=10, latency=False)
    assert report.test_images == 10 and 0.0 <= report.accuracy <= 1.0
    assert report.latency_b1_ms is None and report.latency_b64_ms is None
    unlabelled = Split(split.images, torch.full_like(split.labels, -1))
    report = evaluate(tiny(), "fashion-mnist", split=unlabelled, latency=False)
    assert report.accuracy is None and report.test_images == 0


def test_evaluate_argument_errors() -> None:
    with pytest.raises(UserError, match="input"):
        evaluate(tiny(), latency=False)
    with pytest.raises(UserError, match="dataset="):
        evaluate(tiny(), split=synthetic_split(), latency=False)
    with pytest.raises(UserError, match="limit"):
        evaluate(tiny(), "fashion-mnist", split=synthetic_split(), limit=0, latency=False)
    with pytest.raises(UserError, match="cannot run on inputs"):
        evaluate(tiny(), input_shape=(3, 8, 8), latency=False)
    report = evaluate(tiny(), input_shape=SHAPE, latency=False)
    assert report.accuracy is None and report.flops == 3456


def test_evaluate_fashion_mnist_prefix(fashion_dir: Path) -> None:
    report = evaluate(get_model("lenet5", 10, 1), "fashion-mnist", data_dir=fashion_dir, limit=200, latency=False)
    assert report.test_images == 200 and 0.0 <= report.accuracy <= 1.0
    assert report.input_shape == (1, 28, 28)


def test_evaluate_checkpoint(tmp_path: Path) -> None:
    model = get_model("lenet5", 10, 1)
    path = tmp_path / "lenet.safetensors"
    save_checkpoint(model, path, {"model": "lenet5", "dataset": "fashion-mnist", "num_classes": 10, "in_channels": 1})
    split = Split(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.arange(16) % 10)
    report, meta = evaluate_checkpoint(path, split=split, latency=False)
    assert meta["model"] == "lenet5"
    assert report.size_bytes == os.path.getsize(path)
    assert report.test_images == 16 and 0.0 <= report.accuracy <= 1.0
    assert report.params == count_params(model)


def test_render_table() -> None:
    teacher = evaluate(tiny(8), "fashion-mnist", split=synthetic_split(), latency=False)
    student = evaluate(tiny(4), "fashion-mnist", split=synthetic_split(), latency=False)
    student.latency_b1_ms, teacher.latency_b1_ms = 1.5, 3.0
    table = render_table({"teacher": teacher, "student": student}, title="compression")
    assert [c.header for c in table.columns] == ["metric", "teacher", "student"]
    assert table.row_count == 10
    out = io.StringIO()
    Console(file=out, width=160).print(table)
    text = out.getvalue()
    for needle in ("Parameters", "MFLOPs", "KB", "1.50 ms", "(50%)", "%", "-"):
        assert needle in text, needle


def test_latency_pair_times_both_models_and_sees_the_bigger_one() -> None:
    small = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    big = nn.Sequential(nn.Conv2d(1, 64, 3), nn.Conv2d(64, 64, 3), nn.Flatten())
    t_small, t_big = measure_latency_pair(small, big, SHAPE, 8, warmup=1, repeats=5)
    assert 0 < t_small < t_big
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_pair(small, big, SHAPE, repeats=0)


def test_evaluate_rejects_an_unknown_setting() -> None:
    with pytest.raises(UserError, match="unknown evaluation setting 'latncy'"):
        evaluate(tiny(), input_shape=SHAPE, latncy=False)
