"""End-to-end compression on tiny random-weight networks: structure, FLOPs, special cases, input checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.capture import capture_input, capture_inputs
from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.evaluate import count_flops, count_params
from crossdistill.models import VGG, get_model
from crossdistill.objectives import METHODS
from crossdistill.structure import apply_widths

SMALL_VGG_CFG = [8, 8, "M", 16, 16]


def _images(n: int = 8, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return get_model("resnet20", 10, 1).eval()


def _small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return VGG(SMALL_VGG_CFG, num_classes=10, in_channels=1).eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"{k} changed"


def _blocks(model: nn.Module):
    return [
        (f"{stage}.{i}", b) for stage in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(model, stage))
    ]


@pytest.fixture(scope="module")
def resnet_structured():
    teacher = _resnet20()
    saved = _state_copy(teacher)
    x = _images()
    student, report = compress(teacher, x, method="ours", keep=0.5)
    return teacher, saved, x, student, report


# --------------------------------------------------------------------------- structured


def test_structured_resnet_student_runs_and_is_narrower(resnet_structured) -> None:
    teacher, _, x, student, report = resnet_structured
    out = _run(student, x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    for name, block in _blocks(student):
        full = block.conv2.out_channels  # = the teacher's conv2 in_channels in these blocks
        kept = math.floor(0.5 * full)
        assert block.conv2.in_channels == kept, name
        assert block.conv1.out_channels == kept and block.bn1.num_features == kept, name
        assert block.conv2.out_channels == full and block.bn2.num_features == full, name  # block outputs intact
    assert report.params_after < report.params_before
    assert report.params_after == count_params(student)
    assert report.params_before == count_params(teacher)
    assert report.flops_after < report.flops_before
    assert report.flops_after == count_flops(student, (1, 16, 16))


def test_structured_report_records_kept_channels_and_skips_unpruned_layers_for_ours(resnet_structured) -> None:
    _, _, _, _, report = resnet_structured
    by_name = {r.name: r for r in report.layers}
    assert "conv1" not in by_name  # the first conv is never processed
    for name, rec in by_name.items():
        if name.endswith("conv2"):
            assert not rec.skipped and rec.kept == rec.total // 2
            assert rec.loss_after >= 0
        else:  # unpruned conv1 of each block: a no-op for the mu-mix, so skipped
            assert rec.skipped and rec.kept == rec.total


def test_compress_leaves_the_teacher_untouched(resnet_structured) -> None:
    teacher, saved, _, _, _ = resnet_structured
    _assert_state_equal(teacher, saved)
    assert all(not hasattr(m, "weight_orig") for m in teacher.modules())


def test_student_widths_rebuild_the_student(resnet_structured) -> None:
    _, _, x, student, _ = resnet_structured
    rebuilt = apply_widths(get_model("resnet20", 10, 1), student.widths)
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(_run(rebuilt, x), _run(student, x))


def test_structured_small_vgg_matches_the_analytic_flop_count() -> None:
    teacher = _small_vgg()
    saved = _state_copy(teacher)
    x = _images()
    student, report = compress(teacher, x, method="ours", keep=0.5)
    convs = [m for m in student.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in student.features if isinstance(m, nn.BatchNorm2d)]
    # convs 2-4 keep floor(0.5 C) inputs; so convs 1-3 (and their BN) lose the matching outputs; conv 4 feeds the head
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 4), (4, 8), (8, 16)]
    assert [b.num_features for b in bns] == [4, 4, 8, 16]

    def analytic(widths):  # 2 FLOPs per MAC, 3x3 convs at 16x16 then 8x8, plus the two Linear layers
        (a, b), (c, d) = widths[:2], widths[2:]
        conv = 2 * 9 * (16 * 16 * (a[0] * a[1] + b[0] * b[1]) + 8 * 8 * (c[0] * c[1] + d[0] * d[1]))
        return conv + 2 * (16 * 512 + 512 * 10)

    before = analytic([(1, 8), (8, 8), (8, 16), (16, 16)])
    after = analytic([(1, 4), (4, 4), (4, 8), (8, 16)])
    assert report.flops_before == before == count_flops(teacher, (1, 16, 16))
    assert report.flops_after == after == count_flops(student, (1, 16, 16))
    assert report.params_after < report.params_before
    out = _run(student, x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    _assert_state_equal(teacher, saved)


def test_resnet56_sensitive_blocks_keep_full_width() -> None:
    torch.manual_seed(0)
    teacher = get_model("resnet56", 10, 1).eval()
    skip = set(teacher.prune_skip)
    assert skip == {"layer1.7.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer3.8.conv2"}
    x = _images(n=4)
    student, _ = compress(teacher, x, method="ours", keep=0.5)
    for name, block in _blocks(student):
        full = block.conv2.out_channels
        expected = full if f"{name}.conv2" in skip else math.floor(0.5 * full)
        assert block.conv2.in_channels == expected, name
        assert block.conv1.out_channels == expected and block.bn1.num_features == expected, name
    assert torch.isfinite(_run(student, x)).all()


# --------------------------------------------------------------------------- unstructured


def test_unstructured_keeps_exactly_the_target_weights_per_layer() -> None:
    teacher = _resnet20()
    x = _images()
    student, report = compress(teacher, x, method="ours", prune="unstructured", keep=0.1)
    processed = 0
    for name, m in student.named_modules():
        t = teacher.get_submodule(name)
        if name == "conv1" or isinstance(m, nn.Linear):
            assert torch.equal(m.weight, t.weight), f"{name} should stay untouched"
        elif isinstance(m, nn.Conv2d):
            assert m.weight.shape == t.weight.shape
            assert int(torch.count_nonzero(m.weight)) == math.floor(0.1 * m.weight.numel()), name
            processed += 1
    assert processed == 18
    assert report.sparsity == pytest.approx(0.9, abs=2e-3)
    assert report.params_after == report.params_before  # same shapes, zeros inside
    assert torch.isfinite(_run(student, x)).all()


# --------------------------------------------------------------------------- exact special cases


@pytest.mark.parametrize("prune", ["structured", "unstructured"])
def test_keep_one_with_ours_returns_the_teacher(prune) -> None:
    teacher = _resnet20()
    x = _images()
    student, report = compress(teacher, x, method="ours", keep=1.0, prune=prune)
    torch.testing.assert_close(_run(student, x), _run(teacher, x))
    assert report.params_after == report.params_before and report.flops_after == report.flops_before


def test_keep_one_with_nc_refits_every_layer_back_to_the_teacher() -> None:
    # nothing is pruned, so h^S = h^T at every layer and the NC least-squares optimum is W^T itself
    teacher = _resnet20()
    x = _images()
    student, report = compress(teacher, x, method="nc", keep=1.0)
    assert all(not r.skipped for r in report.layers) and len(report.layers) == 18
    for name, m in student.named_modules():
        if isinstance(m, nn.Conv2d):
            torch.testing.assert_close(m.weight, teacher.get_submodule(name).weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_run(student, x), _run(teacher, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["lstsq", "adam"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_solver_compresses_resnet20(method, solver) -> None:
    teacher = _resnet20()
    x = _images()
    student, report = compress(teacher, x, method=method, solver=solver, iterations=20, keep=0.5)
    out = _run(student, x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert student.layer2[1].conv2.in_channels == 16 and student.layer2[1].conv1.out_channels == 16
    assert report.flops_after < report.flops_before
    assert all(math.isfinite(r.loss_after) for r in report.layers)


def test_soft_with_alpha_plus_beta_one_skips_unpruned_layers() -> None:
    # 1 - 0.7 is 0.30000000000000004 in floating point: still the no-op case of docs/method.md
    _, report = compress(_resnet20(), _images(), method="ours-s", alpha=0.3, beta=0.7, keep=0.5)
    assert {r.name for r in report.layers if r.skipped} == {f"{n}.conv1" for n, _ in _blocks(_resnet20())}


def test_exact_solve_without_ridge_never_worsens_an_unpruned_layer() -> None:
    # late layers see few output positions (rank-deficient systems); the plain least-squares fallback must be exact
    _, report = compress(_resnet20(), _images(), method="nc", keep=0.5, ridge=0.0)
    unpruned = [r for r in report.layers if r.kept == r.total]
    assert len(unpruned) == 9
    for r in unpruned:
        assert r.loss_after <= r.loss_before + 1e-9, r


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides",
    [{"keep": 0}, {"keep": 1.5}, {"method": "fitnet"}, {"solver": "sgd"}, {"mu": 2.0}, {"no_such_setting": 1}],
    ids=["keep0", "keep1.5", "method", "solver", "mu", "unknown_setting"],
)
def test_bad_settings_raise_user_error(overrides) -> None:
    with pytest.raises(UserError):
        compress(_resnet20(), _images(), **overrides)


def test_bad_images_raise_user_error() -> None:
    teacher = _resnet20()
    nan = _images()
    nan[2, 0, 3, 3] = float("nan")
    for bad in (nan, _images(channels=3), torch.randn(8, 16, 16), torch.zeros(0, 1, 16, 16)):
        with pytest.raises(UserError):
            compress(teacher, bad)
    with pytest.raises(UserError, match="channels"):
        compress(teacher, _images(channels=3))


def test_nan_teacher_weight_raises_user_error() -> None:
    teacher = _resnet20()
    with torch.no_grad():
        teacher.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        compress(teacher, _images())


# --------------------------------------------------------------------------- BN recalibration


def test_recalibrate_bn_sets_running_stats_to_the_few_shot_statistics() -> None:
    teacher = _resnet20()
    x = _images()
    plain, _ = compress(teacher, x, method="ours", keep=1.0)
    recal, _ = compress(teacher, x, method="ours", keep=1.0, recalibrate_bn=True)
    assert torch.equal(plain.bn1.running_mean, teacher.bn1.running_mean)
    with torch.no_grad():
        y = teacher.conv1(x)
    torch.testing.assert_close(recal.bn1.running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(recal.bn1.running_var, y.var((0, 2, 3), unbiased=True))
    changed = [
        n
        for n, m in recal.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not torch.equal(m.running_mean, teacher.get_submodule(n).running_mean)
    ]
    assert len(changed) == 19  # every BN of resnet20
    assert not recal.training and all(not m.training for m in recal.modules())


# --------------------------------------------------------------------------- capture


def test_capture_input_stops_early_and_equals_capture_inputs() -> None:
    model = _resnet20()
    x = _images()
    calls = {"fc": 0, "layer3": 0}
    model.fc.register_forward_hook(lambda *_: calls.__setitem__("fc", calls["fc"] + 1))
    model.layer3.register_forward_hook(lambda *_: calls.__setitem__("layer3", calls["layer3"] + 1))
    name = "layer2.1.conv1"
    one = capture_input(model, name, x, batch_size=3)  # three batches: 3 + 3 + 2
    assert calls == {"fc": 0, "layer3": 0}  # the forward never reached the layers after it
    both = capture_inputs(model, [name, "fc"], x, batch_size=3)
    assert calls == {"fc": 3, "layer3": 3}
    assert one.shape == (8, 32, 8, 8)
    torch.testing.assert_close(one, both[name])
    assert both["fc"].shape == (8, 64)
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_capture_input_of_a_layer_never_called_is_an_error() -> None:
    model = _resnet20()
    model.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(RuntimeError, match="not called"):
        capture_input(model, "unused", _images(n=2))


def _unsupported_model() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()  # fmt: skip


def test_unsupported_layer_raises_an_error_naming_it() -> None:
    with pytest.raises(UserError, match=r"layer 3 .*padding_mode='reflect'.*--exclude"):
        compress(_unsupported_model(), torch.randn(6, 1, 12, 12))


def test_unsupported_layer_is_skipped_with_a_warning_when_allowed() -> None:
    model = _unsupported_model()
    with pytest.warns(UserWarning, match="leaving layer 3 untouched"):
        student, report = compress(model, torch.randn(6, 1, 12, 12), skip_unsupported=True)
    assert "3" not in [r.name for r in report.layers]
    assert torch.equal(student[3].weight, model[3].weight)


def test_per_layer_teacher_capture_gives_the_same_student_as_the_cache() -> None:
    model = get_model("resnet20", 10, 1).eval()
    x = torch.randn(8, 1, 16, 16)
    cached, _ = compress(model, x, method="nc")
    streamed, _ = compress(model, x, method="nc", teacher_cache_mb=0)
    assert torch.allclose(cached(x), streamed(x), atol=1e-5)


@pytest.mark.parametrize("method", ["ours", "nc"])
@pytest.mark.parametrize("arch", ["resnet20", "inverted_residual"])
def test_activations_spilled_to_disk_give_the_same_student(method: str, arch: str, monkeypatch) -> None:
    """spill_mb=0: every kept value and layer input goes through files, batch by batch (batch 3 of 8
    images: a short last batch), with the teacher streamed too; the student must be the in-memory one."""
    import crossdistill.capture
    import crossdistill.spill

    saved = []
    real_save = crossdistill.spill.save_raw
    for module in (crossdistill.spill, crossdistill.capture):
        monkeypatch.setattr(module, "save_raw", lambda x, path: (saved.append(path), real_save(x, path))[1])
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import inverted_residual

    model = get_model("resnet20", 10, 1).eval() if arch == "resnet20" else inverted_residual().eval()
    x = torch.randn(8, *((1, 16, 16) if arch == "resnet20" else (3, 16, 16)))
    common = dict(method=method, keep=0.5, batch_size=3)
    ref, r_ref = compress(model, x, **common)
    assert not saved
    spilled, r_sp = compress(model, x, spill_mb=0, teacher_cache_mb=0, **common)
    assert len(saved) > 20  # layer inputs and kept values went to disk
    assert r_ref.capture == r_sp.capture == "one-pass"
    for (name, a), (_, b) in zip(ref.state_dict().items(), spilled.state_dict().items(), strict=True):
        assert a.shape == b.shape, name
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name


def test_graph_stream_keeps_only_values_a_later_step_reads_without_recomputing() -> None:
    """Step 0 collects the input of conv 2 and changes conv 0 (its producer) too, so step 1 restarts at conv 0:
    it needs the image, not conv 0's or the ReLU's outputs (it computes them anew)."""
    from crossdistill.capture import GraphStream

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(2, 1, 12, 12)
    stream = GraphStream(model, ["2", "4"], [["0", "2"], ["4"]], x)
    h = stream.next_input()
    assert torch.allclose(h, model[1](model[0](x)))
    kept = [v for v in stream.env[0].values() if isinstance(v, torch.Tensor)]
    assert len(kept) == 1 and torch.equal(kept[0], x)
    assert torch.allclose(stream.next_input(), model[:4](x))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) + x


def test_graph_stream_on_disk_writes_a_kept_value_once_and_reads_it_only_when_needed(monkeypatch) -> None:
    """spill_mb=0: the image, kept for the residual sum through the three steps, is written once per batch
    (not again each step) and read back only by the steps that read it: step 1, which recomputes the changed
    conv a from it, and the output (the sum), not step 2 (conv b's input); the inputs are those of the
    in-memory stream."""
    import crossdistill.capture
    from crossdistill.capture import GraphStream
    from crossdistill.spill import load_raw, save_raw

    written, read = [], []
    monkeypatch.setattr(crossdistill.capture, "save_raw", lambda x, p: (written.append(p.name), save_raw(x, p))[1])
    monkeypatch.setattr(crossdistill.capture, "load_raw", lambda p, *a: (read.append(p.name), load_raw(p, *a))[1])
    model, x = _Residual().eval(), torch.randn(5, 2, 6, 6)
    names, changed = ["a", "b", "c"], [["a"], ["b"], ["c"]]
    streams = [GraphStream(model, names, changed, x, batch_size=3, spill_mb=mb) for mb in (None, 0)]
    image_files = ["0-0.bin", "1-0.bin"]  # node 0 (the image) of batches 0 and 1
    image_reads = []
    for s in streams:
        s.with_output()
    for _ in names:
        h_mem, h_disk = (s.next_input() for s in streams)
        assert torch.equal(h_mem, h_disk if isinstance(h_disk, torch.Tensor) else h_disk.cat())
        image_reads.append(sorted(r for r in read if r in image_files))
        read.clear()
    out = streams[1].output()
    assert torch.equal(streams[0].output(), out) and torch.allclose(out, model(x))
    assert sorted(r for r in read if r in image_files) == image_files
    assert image_reads == [[], image_files, []]
    assert sorted(w for w in written if w in image_files) == image_files  # once each


def test_raw_file_rewritten_leaves_a_tensor_read_from_it_unchanged(tmp_path: Path) -> None:
    """load_raw maps the file: save_raw must write a new file, not the mapped one in place."""
    from crossdistill.spill import load_raw, save_raw

    x = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "v.bin"
    read = load_raw(path, save_raw(x, path))
    save_raw(torch.zeros(3, 4), path)
    assert torch.equal(read, x)
    assert torch.equal(load_raw(path, (torch.Size([3, 4]), torch.float32)), torch.zeros(3, 4))


def test_batches_on_disk_read_back_as_written() -> None:
    from crossdistill.spill import Batches, pairs

    x = torch.randn(7, 2, 3)
    stored = Batches(on_disk=True)
    for j in range(0, 7, 3):
        stored.append(x[j : j + 3])
    assert stored.shape == (7, 2, 3) and len(stored) == 7
    assert torch.equal(stored.cat(), x)
    # a tensor and a Batches are cut at the same images, whatever the requested size
    got = list(pairs(x * 2, stored, 2))
    assert [len(a) for a, _ in got] == [2, 1, 2, 1, 1]
    assert all(torch.equal(a, 2 * b) for a, b in got)


def test_reported_output_error_equals_a_fresh_teacher_and_student_pass() -> None:
    """The output error reuses the teacher's output from the capture pass: it must equal the error of the
    returned student against the teacher run anew on the same images."""
    from crossdistill.run import output_error

    teacher, x = _resnet20().eval(), _images(6)
    student, report = compress(teacher, x, method="nc", keep=0.5)
    assert report.output_error == pytest.approx(output_error(student, teacher, x), rel=1e-6)


@pytest.mark.parametrize("method, holdout", [("ours", 0.0), ("nc", 0.0), ("cp", 0.0), ("ours", 0.3)])
def test_bn_train_mode_output_error_is_against_the_unmodified_teacher(method, holdout) -> None:
    """bn_mode='train' runs the run's teacher copy in train mode while capturing, which moves its BN running
    statistics: the report's output error (fitted or held-out images) must be against the teacher as given."""
    from crossdistill.baselines import run_baseline
    from crossdistill.run import output_error, split_holdout

    teacher, x = _resnet20().eval(), _images(10)
    with torch.no_grad():  # running statistics far from the images' own, so a moved copy shows
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
                m.running_var.fill_(3.0)
    settings = {"bn_mode": "train", "keep": 0.5, "holdout": holdout}
    if method in METHODS:
        student, report = compress(teacher, x, method=method, **settings)
    else:
        student, report = run_baseline(method, teacher, x, None, **settings)
    measured_on = x[split_holdout(x, holdout)[1]] if holdout else x
    assert report.output_error == pytest.approx(output_error(student, teacher, measured_on), rel=1e-6)


def test_eval_mode_and_removing_restore_the_model_when_the_block_fails() -> None:
    from crossdistill.capture import eval_mode, removing

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    seen = []
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model), removing([]) as handles:
        handles.append(model[0].register_forward_hook(lambda m, a, o: seen.append(m.training)))
        model(torch.randn(2, 1, 5, 5))
        raise RuntimeError("boom")
    assert seen == [False]  # ran in eval mode, hooked
    assert model.training and not model[0]._forward_hooks  # mode back, hook gone
