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


def _noise_case(arch: str, n_fit: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random-init zoo network, ``n_fit`` noise images to fit and 16 fresh ones (tests/test_patterns.py's
    for seed 0)."""
    torch.manual_seed(seed)
    teacher = getattr(zoo, arch)() if hasattr(zoo, arch) else zoo.PATTERNS[arch]()
    g = torch.Generator().manual_seed(1 if seed == 0 else seed + 10)
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


def test_the_second_views_are_other_views_of_the_images() -> None:
    x = torch.randn(20, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    for images, n in ((x, 8), (x[:3], 8)):  # more images than views (other images), fewer (diagonal moves)
        first, second = make_views(images, n, 0.125), make_views(images, n, 0.125, second=True)
        assert first.shape == second.shape and torch.equal(second, make_views(images, n, 0.125, second=True))
        assert not any(torch.equal(a, b) for a in first for b in second)
    one = make_views(x[:2], 1, 0.125, second=True)[0]  # the other image, moved diagonally: content up and left by 1
    assert torch.equal(one[:, :-1, :-1], x[1].flip(-1)[:, 1:, 1:])


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


def test_safety_fires_on_a_blow_up_and_returns_the_guarded_rerun() -> None:
    # NC on the tiny EfficientNet with 4 noise images: the re-fit misses fresh images by x3 of L1; the re-run with
    # each layer guarded on 16 views beats the start on them and on 16 other views, and on fresh images
    teacher, fit, held = _noise_case("efficientnet", 4)
    off, off_report = _quiet("nc", teacher, fit, safety="off")
    with pytest.warns(SafetyWarning, match='returned the re-run with ridge_guard="views"'):
        student, report = run_method("nc", teacher, fit, keep=0.5)
    s = report.safety
    assert s["fired"] and s["returned"] == "guarded" and s["student_error"] > s["start_error"]
    assert s["views"] == 8 and s["views_second"] == 16  # 4 images: at most 16 views of each kind
    assert s["guarded_error"] <= s["start_error_second"] and set(s["layers"]) <= {r.name for r in report.layers}
    assert s["guarded_error_guard_views"] <= s["start_error_guard_views"]
    assert s["reference"] == "start" and s["kept_error_second"] == s["guarded_error"] < s["l1_start_error"]
    second = make_views(fit, 16, 0.0625, second=True)
    assert output_error(student, teacher, second) == pytest.approx(s["guarded_error"], rel=1e-4)
    l1, _ = _quiet("l1", teacher, fit)
    assert output_error(off, teacher, held) > 2 * output_error(l1, teacher, held)
    assert output_error(student, teacher, held) <= 1.05 * output_error(l1, teacher, held)
    assert report.to_dict()["safety"]["returned"] == "guarded"


def test_safety_returns_the_start_when_the_guarded_rerun_is_no_better() -> None:
    # Ours on the tiny ResNeXt (grouped convs) with 8 noise images: the student and the guarded re-run are above the
    # start on the views; the start comes back (the same function as the masked start), below the L1 start
    teacher, fit, held = _noise_case("grouped", 8)
    off, off_report = _quiet("ours", teacher, fit, safety="off")
    with pytest.warns(SafetyWarning, match="returned the start"):
        student, report = run_method("ours", teacher, fit, keep=0.5)
    s = report.safety
    assert s["fired"] and s["returned"] == "start" and s["student_error"] > s["start_error"]
    assert s["guarded_error"] > s["start_error_second"] == s["kept_error_second"] < s["l1_start_error"]
    assert output_error(student, teacher, make_views(fit, 8, 0.0625)) == pytest.approx(s["start_error"], rel=1e-4)
    assert report.params_after == off_report.params_after  # the start has the student's architecture
    l1, _ = _quiet("l1", teacher, fit)
    assert output_error(student, teacher, held) < min(output_error(off, teacher, held), output_error(l1, teacher, held))


def test_a_guarded_rerun_must_also_pass_the_views_it_was_guarded_on() -> None:
    # NC on the tiny MobileNetV3 with 4 noise images: the guarded re-run beats the start on the second views but not
    # on its guard's own views; the start comes back, within L1 on fresh images (margin 1: the start is then kept over
    # the L1 start; with the default margin the L1 start, a few % better on the second views, replaces it)
    teacher, fit, held = _noise_case("mobilenet_v3", 4)
    student, report = _quiet("nc", teacher, fit, safety_l1_margin=1.0)
    s = report.safety
    assert s["returned"] == "start" and s["guarded_error"] <= s["start_error_second"]
    assert s["guarded_error_guard_views"] > s["start_error_guard_views"]
    l1, _ = _quiet("l1", teacher, fit)
    assert output_error(student, teacher, held) <= 1.05 * output_error(l1, teacher, held)


def test_safety_leaves_a_student_that_is_better_than_the_start_bit_identical() -> None:
    teacher, fit, _ = _noise_case("bn_act", 8)
    for method in ("nc", "ours", "ours-s"):
        off, off_report = _quiet(method, teacher, fit, safety="off")
        on, report = _quiet(method, teacher, fit)
        assert report.output_error == off_report.output_error  # the teacher, masked for the check, is restored
        assert not report.safety["fired"] and report.safety["student_error"] < report.safety["start_error"]
        assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), on.state_dict().values(), strict=True))


# the #13 bound on the zoo's overfitting cases, with the defaults. mobilenet_v3 with 4 images: Ours' channel choice
# is above L1 there and the L1 reference returns the L1 student; Ours-S's guarded re-run beats the L1 start on the
# second views of 4 images by 1.4 % only (1.036 vs 1.051) and is x1.10 of L1 on fresh images: safety_l1_margin
# (a fired student must win by 5 %) returns the L1 student instead
_CASES = [
    ("efficientnet", 4, ("nc", "ours", "ours-s")),
    ("mobilenet_v3", 4, ("nc", "ours", "ours-s")),
    ("mobilenet_v3", 8, ("nc", "ours", "ours-s")),
]


@pytest.mark.parametrize(("arch", "n_fit", "methods"), _CASES)
def test_default_students_are_no_worse_than_l1_on_fresh_images(arch: str, n_fit: int, methods: tuple) -> None:
    teacher, fit, held = _noise_case(arch, n_fit)
    err = {m: output_error(_quiet(m, teacher, fit)[0], teacher, held) for m in ("l1", *methods)}
    assert all(err[m] <= 1.05 * err["l1"] for m in methods), err


# --------------------------------------------------------------------------- the L1 start, a second reference


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_l1_reference_returns_the_l1_student_where_the_channel_choice_is_worse() -> None:
    # Ours on the tiny MobileNetV3 with 4 noise images: the student passes its own start on the first views
    # (its start, channels by energy on 4 noise images, is as bad), but is above the L1 start on the second; its
    # re-fit on the L1 channels is worse still, so the L1 student itself comes back
    teacher, fit, held = _noise_case("mobilenet_v3", 4)
    with pytest.warns(SafetyWarning, match="above the L1 start's .*returned the L1 student"):
        student, report = run_method("ours", teacher, fit, keep=0.5)
    s = report.safety
    assert s["fired"] and s["reference"] == "l1" and s["returned"] == "l1-start" and s["kept"] == "student"
    assert s["student_error"] <= s["start_error"]  # its own start did not catch it
    assert s["kept_error_second"] > s["l1_start_error"] and s["l1_refit_error"] > s["l1_start_error"]
    l1, _ = _quiet("l1", teacher, fit)
    assert _same_weights(student, l1) and report.to_dict()["safety"]["returned"] == "l1-start"
    assert output_error(student, teacher, make_views(fit, 16, 0.0625, second=True)) == pytest.approx(
        s["l1_start_error"], rel=1e-5
    )
    off, _ = _quiet("ours", teacher, fit, safety="off")
    assert output_error(off, teacher, held) > 1.05 * output_error(l1, teacher, held)  # what it caught


def test_l1_reference_keeps_the_refit_on_the_l1_channels_when_it_beats_the_l1_start() -> None:
    # the tiny ShuffleNetV2 (another draw): Ours' student is above the L1 start on the second views, its re-fit on
    # the L1 channels below it
    teacher, fit, held = _noise_case("shuffle", 4, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student, report = run_method("ours", teacher, fit, keep=0.5, safety_l1_ratio=0.0, safety_l1_margin=1.0)
    assert any(
        c.category is SafetyWarning and "returned the re-fit on the L1 channels" in str(c.message) for c in caught
    )
    s = report.safety
    assert s["reference"] == "l1" and s["returned"] == "l1-refit"
    assert s["l1_refit_error"] <= s["l1_start_error"] < s["kept_error_second"]
    l1, l1_report = _quiet("l1", teacher, fit)
    l1_kept = {r.name: r.kept_channels for r in l1_report.layers if r.kept_channels is not None}
    assert {r.name: r.kept_channels for r in report.layers if r.kept_channels is not None} == l1_kept
    assert not _same_weights(student, l1)  # re-fitted
    assert output_error(student, teacher, held) <= 1.05 * output_error(l1, teacher, held)


def test_a_fired_student_must_beat_the_l1_start_by_the_margin() -> None:
    # Ours-S on the tiny MobileNetV3 with 4 noise images: its guarded re-run wins on the second views by 1.4 % only
    teacher, fit, held = _noise_case("mobilenet_v3", 4)
    _, loose = _quiet("ours-s", teacher, fit, safety_l1_margin=1.0)
    assert loose.safety["fired"] and loose.safety["returned"] == "guarded"
    assert 0.95 * loose.safety["l1_start_error"] < loose.safety["kept_error_second"] <= loose.safety["l1_start_error"]
    student, report = _quiet("ours-s", teacher, fit)
    assert report.safety["reference"] == "l1" and report.safety["returned"] in ("l1-start", "l1-refit")
    l1, _ = _quiet("l1", teacher, fit)
    assert output_error(student, teacher, held) <= 1.05 * output_error(l1, teacher, held)


def test_l1_reference_is_consulted_only_near_the_own_start_and_changes_nothing_when_the_student_wins() -> None:
    teacher, fit, _ = _noise_case("bn_act", 8)
    off, _ = _quiet("nc", teacher, fit, safety="off")
    _, report = _quiet("nc", teacher, fit)  # 0.29 x its start: far below, L1 not run
    assert report.safety["student_error"] < 0.45 * report.safety["start_error"]
    assert "l1_start_error" not in report.safety
    always, report = _quiet("nc", teacher, fit, safety_l1_ratio=0.0)
    s = report.safety
    assert not s["fired"] and s["returned"] == "student" and s["kept_error_second"] < s["l1_start_error"]
    assert _same_weights(always, off)


def test_l1_reference_is_skipped_for_unstructured_pruning_and_given_channels() -> None:
    teacher, fit, _ = _noise_case("mobilenet_v3", 4)
    _, report = _quiet("ours", teacher, fit, prune="unstructured", safety_l1_ratio=0.0)
    assert "l1_start_error" not in report.safety
    _, l1_report = _quiet("l1", teacher, fit)
    kept = {r.name: r.kept_channels for r in l1_report.layers if r.kept_channels is not None}
    _, report = _quiet("ours", teacher, fit, kept_channels=kept, safety_l1_ratio=0.0)
    assert "l1_start_error" not in report.safety


def test_safety_with_unstructured_pruning_and_a_holdout_runs() -> None:
    teacher, fit, _ = _noise_case("mobilenet_v3", 8)
    student, report = _quiet("ours-s", teacher, fit, prune="unstructured", holdout=0.25)
    assert report.safety["views"] == 8 and report.safety["returned"] in ("student", "guarded", "start")
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
        ("safety_l1_ratio", -0.1, "safety_l1_ratio must be a number >= 0"),
        ("safety_l1_margin", 1.5, r"safety_l1_margin must lie in \(0, 1\]"),
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


def test_l1_reference_that_cannot_be_built_leaves_the_first_check_standing(monkeypatch) -> None:
    compress_module = sys.modules["crossdistill.compress"]  # the package's name "compress" is the function

    def refuse(*args, **kwargs):
        raise UserError("removing these channels would leave a layer empty")

    monkeypatch.setattr(compress_module, "l1_start", refuse)
    teacher, fit, _ = _noise_case("mobilenet_v3", 4)
    off, _ = _quiet("ours", teacher, fit, safety="off")
    student, report = _quiet("ours", teacher, fit)  # the L1 start would have replaced it
    assert report.safety["returned"] == "student" and "leave a layer empty" in report.safety["l1_skipped"]
    assert _same_weights(student, off)
