"""The safety net (CompressConfig.safety, crossdistill.safety) and ridge_guard="views"."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.config import CompressConfig
from crossdistill.errors import UserError
from crossdistill.methods import run_method
from crossdistill.objectives import objective_terms
from crossdistill.ridgecv import guard_solve
from crossdistill.run import output_error, recalibrate_bn
from crossdistill.safety import SafetyWarning, make_views
from crossdistill.solvers import LayerProblem, LstsqOptions

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

SIZE = 16


def _noise_case(arch: str, n_fit: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random-init zoo network, ``n_fit`` noise images to fit and 16 fresh ones (tests/test_patterns.py's)."""
    torch.manual_seed(0)
    teacher = getattr(zoo, arch)()
    g = torch.Generator().manual_seed(1)
    fit, held = torch.randn(n_fit, 3, SIZE, SIZE, generator=g), torch.randn(16, 3, SIZE, SIZE, generator=g)
    recalibrate_bn(teacher, torch.cat([fit, held]))
    return teacher.eval(), fit, held


def _quiet(method: str, teacher: nn.Module, x: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_method(method, teacher, x, keep=0.5, **kw)


# --------------------------------------------------------------------------- views


def test_views_are_flipped_shifted_copies_never_the_images_themselves() -> None:
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    v = make_views(x, 3, 0.125)  # one view per image, shift 1 pixel
    assert v.shape == x.shape and torch.equal(v, make_views(x, 3, 0.125))  # deterministic
    flipped = x.flip(-1)
    assert torch.equal(v[0, :, :, :-1], flipped[0, :, :, 1:])  # first direction: content moves left by 1
    assert torch.equal(v[1, :, :-1, :], flipped[1, :, 1:, :])  # second: up by 1
    assert not any(torch.equal(v[i], x[j]) for i in range(3) for j in range(3))


def test_views_spread_over_the_images_and_repeat_an_image_in_new_directions() -> None:
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 4, 4).contiguous()  # image i is constant i
    assert make_views(x, 2, 0.25)[:, 0, 0, 0].tolist() == [0.0, 2.0]  # evenly spread: images 0 and 2
    many = make_views(x[:2], 100, 0.25)
    assert len(many) == 8  # at most 4 per image
    y = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    four = make_views(y, 4, 0.2)
    assert len({tuple(v.flatten().tolist()) for v in four}) == 4  # four directions, four different views


# --------------------------------------------------------------------------- ridge_guard="views"


def test_views_guard_keeps_the_start_where_the_refit_misses_the_views() -> None:
    # independent channels: the exact re-fit on 2 images chases their noise; views that are fresh noise judge it
    g = torch.Generator().manual_seed(0)
    wT = torch.randn(32, 64, 1, 1, generator=g)
    layer, problem = nn.Conv2d(64, 32, 1, bias=False), LayerProblem(objective_terms("nc"), wT, wT.clone(), 16)
    fit, views = torch.randn(2, 64, 2, 2, generator=g), torch.randn(8, 64, 2, 2, generator=g)
    hT = torch.cat([fit, views])
    res, ridge = guard_solve(layer, problem, hT, hT + torch.randn(hT.shape, generator=g), LstsqOptions(), 2)
    assert ridge is None or ridge > LstsqOptions.ridge
    assert len(res.kept) == 16 and res.loss_after <= res.loss_masked + 1e-9


# --------------------------------------------------------------------------- the net in compress()


def test_safety_fires_on_a_blow_up_and_returns_the_start() -> None:
    # NC on the tiny MobileNetV3 with 4 noise images: the re-fit misses fresh images by x2.2 of L1; the views
    # guard does not save it either, so the start comes back (the same function as the masked start)
    teacher, fit, held = _noise_case("mobilenet_v3", 4)
    off, off_report = _quiet("nc", teacher, fit, safety="off")
    with pytest.warns(SafetyWarning, match="returned the start"):
        student, report = run_method("nc", teacher, fit, keep=0.5)
    s = report.safety
    assert s["fired"] and s["returned"] == "start" and s["student_error"] > s["start_error"]
    assert s["guarded_error"] > s["start_error"] and set(s["layers"]) <= {r.name for r in report.layers}
    views = make_views(fit, s["views"], 0.0625)
    assert output_error(student, teacher, views) == pytest.approx(s["start_error"], rel=1e-4)
    l1, _ = _quiet("l1", teacher, fit)
    assert report.params_after == off_report.params_after  # the start has the student's architecture
    assert output_error(off, teacher, held) > 2 * output_error(l1, teacher, held)
    assert output_error(student, teacher, held) <= 1.05 * output_error(l1, teacher, held)
    assert report.to_dict()["safety"]["returned"] == "start"


def test_safety_leaves_a_student_that_is_better_than_the_start_bit_identical() -> None:
    teacher, fit, _ = _noise_case("bn_act", 8)
    for method in ("nc", "ours", "ours-s"):
        off, off_report = _quiet(method, teacher, fit, safety="off")
        on, report = _quiet(method, teacher, fit)
        assert report.output_error == off_report.output_error  # the teacher, masked for the check, is restored
        assert not report.safety["fired"] and report.safety["student_error"] < report.safety["start_error"]
        assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), on.state_dict().values(), strict=True))


# the #13 bound on the zoo's overfitting cases, with the defaults. mobilenet_v3 with 4 images: Ours / Ours-S end at
# x1.07 / x1.07 of L1: the start itself (channels chosen on 4 noise images) is above L1 on fresh images there,
# and the views of 4 images near-tie student and start
_CASES = [
    ("efficientnet", 4),
    pytest.param(
        "mobilenet_v3", 4, marks=pytest.mark.xfail(reason="Ours / Ours-S at x1.07 / x1.07 of L1", strict=False)
    ),
    ("mobilenet_v3", 8),
]


@pytest.mark.parametrize(("arch", "n_fit"), _CASES)
def test_default_students_are_no_worse_than_l1_on_fresh_images(arch: str, n_fit: int) -> None:
    teacher, fit, held = _noise_case(arch, n_fit)
    err = {m: output_error(_quiet(m, teacher, fit)[0], teacher, held) for m in ("l1", "nc", "ours", "ours-s")}
    assert all(err[m] <= 1.05 * err["l1"] for m in ("nc", "ours", "ours-s")), err


def test_safety_with_unstructured_pruning_and_a_holdout_runs() -> None:
    teacher, fit, _ = _noise_case("mobilenet_v3", 8)
    student, report = _quiet("ours-s", teacher, fit, prune="unstructured", holdout=0.25)
    assert report.safety["views"] == 16 and report.safety["returned"] in ("student", "guarded", "start")
    assert student(fit).shape == teacher(fit).shape


def test_safety_is_skipped_with_train_mode_bn_and_says_why() -> None:
    teacher, fit, _ = _noise_case("bn_act", 4)
    _, report = _quiet("ours", teacher, fit, bn_mode="train")
    assert "bn_mode" in report.safety["skipped"] and not report.safety["fired"]
    _, report = _quiet("ours", teacher, fit, safety="off")
    assert report.safety is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("safety", "on", "safety must be 'views' or 'off'"),
        ("safety_views", 0, "safety_views must be a whole number"),
        ("safety_views", 2.5, "safety_views must be a whole number"),
        ("safety_shift", 0.5, r"safety_shift must lie in \[0, 0.5\)"),
        ("safety_slack", 0.0, "safety_slack must be a number > 0"),
        ("ridge_guard", "view", "ridge_guard must be False, True or 'views'"),
    ],
)
def test_bad_safety_settings_are_refused_clearly(field: str, value: object, match: str) -> None:
    with pytest.raises(UserError, match=match):
        CompressConfig(**{field: value}).validate()


def test_views_guard_needs_lstsq_and_eval_bn() -> None:
    for kw in ({"solver": "adam"}, {"bn_mode": "train"}):
        with pytest.raises(UserError, match='ridge_guard="views" needs solver="lstsq"'):
            CompressConfig(ridge_guard="views", **kw).validate()
