"""What a compression achieved: a warning naming the layers left whole when it falls short of keep,
in the report (``shortfall``, ``left_whole``) and under the CLI table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from crossdistill.cli import DEMO_TEACHER, app
from crossdistill.compress import compress
from crossdistill.coverage import ShortfallWarning
from crossdistill.methods import run_method
from crossdistill.models import get_model

runner = CliRunner()


def _whole(report) -> dict[str, str]:
    return {d["name"]: d["reason"] for d in report.left_whole}


def test_a_network_of_linear_layers_falls_short_and_says_why() -> None:
    x = torch.randn(6, 1, 28, 28)
    with pytest.warns(ShortfallWarning, match=r"fell short.*classifier\.0 \(Linear layer \(include_linear is off\)\)"):
        _, report = compress(get_model("lenet5", 10, 1).eval(), x, keep=0.5)
    assert report.params_after / report.params_before > 0.75
    assert _whole(report)["classifier.0"] == "Linear layer (include_linear is off)"
    assert json.loads(json.dumps(report.to_dict()))["shortfall"] == report.shortfall  # lands in report.json


@pytest.mark.parametrize("method", ["ours", "l1"])
def test_no_warning_when_keep_is_reached(method: str, recwarn) -> None:
    x = torch.randn(4, 3, 32, 32)
    _, report = run_method(method, get_model("resnet20", 10, 3).eval(), x, keep=0.5)
    assert report.shortfall is None and not [w for w in recwarn if w.category is ShortfallWarning]
    # the first conv and the block outputs are tied by the residual sums: listed, with that reason
    assert _whole(report)["conv1"].startswith("residual sum")


def _grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip


def test_grouped_convs_are_named_when_nothing_can_be_pruned() -> None:
    x = torch.randn(6, 3, 12, 12)
    with pytest.warns(ShortfallWarning, match="grouped conv"):
        _, report = compress(_grouped(), x, method="nc", keep=0.5)
    whole = _whole(report)
    assert whole["2"].startswith("grouped conv (groups=4)") and whole["4"].startswith("grouped conv")
    assert whole["0"] == "feeds a grouped conv"


def test_no_check_where_the_user_chose_the_layers() -> None:
    # --include / --keep-file make keep a per-layer choice: no global expectation to fall short of
    x = torch.randn(6, 1, 28, 28)
    _, report = compress(get_model("lenet5", 10, 1).eval(), x, keep=0.5, include=["features.3"])
    assert report.shortfall is None and "classifier.0" in _whole(report)


def test_unstructured_runs_have_no_left_whole_list() -> None:
    x = torch.randn(6, 1, 28, 28)
    _, report = compress(get_model("lenet5", 10, 1).eval(), x, keep=0.5, prune="unstructured")
    assert report.shortfall is None and report.left_whole == []


def test_cli_prints_the_shortfall_under_the_table(tmp_path: Path, fashion_dir) -> None:
    # only layer3 is pruned: FLOPs stay far above what keep 0.5 asks for
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", "l1",
                              "--exclude", "layer1.*", "--exclude", "layer2.*", "--out", str(tmp_path / "s"),
                              "--test-limit", "50", "--no-latency", "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning (l1): compression fell short" in text and "layer1.0.conv1 (excluded (--exclude))" in text
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert "fell short" in report["shortfall"]
    assert {"name": "layer1.0.conv2", "type": "Conv2d", "reason": "excluded (--exclude)"} in report["left_whole"]


# --------------------------------------------------------------------------- held-out error


def test_split_holdout_is_seeded_disjoint_and_never_empty() -> None:
    from crossdistill.run import split_holdout

    x = torch.arange(10.0).view(10, 1, 1, 1)
    fit, held = split_holdout(x, 0.2, 0)
    assert (len(fit), len(held)) == (8, 2)
    assert set(fit.flatten().tolist()).isdisjoint(held.flatten().tolist())
    assert torch.equal(split_holdout(x, 0.2, 0)[1], held) and not torch.equal(split_holdout(x, 0.2, 1)[1], held)
    assert [len(t) for t in split_holdout(x[:2], 0.01, 0)] == [1, 1]


def _wide_chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 5),
    ).eval()  # fmt: skip


def test_heldout_error_is_reported_and_overfitting_warned() -> None:
    # 3 fitted images of 6x6 give 108 rows per layer for 432 unknowns: NC fits them exactly, not the others
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(ShortfallWarning, match="held-out images"):
        _, report = compress(_wide_chain(), x, method="nc", keep=0.5, holdout=0.5, ridge=1e-9)
    held = report.heldout
    assert held["images"] == 3 and held["output_error"] > 3 * held["fit_output_error"]
    assert set(held["layers"]) == {"4"}  # the layers whose output width is the teacher's
    assert held["layers"]["4"]["heldout"] > held["layers"]["4"]["fit"]


def test_no_heldout_report_without_holdout_and_bad_fractions_refused() -> None:
    from crossdistill.errors import UserError

    x = torch.randn(6, 3, 6, 6)
    _, report = compress(_wide_chain(), x, method="nc", keep=0.5)
    assert report.heldout is None
    with pytest.raises(UserError, match="holdout must lie in"):
        compress(_wide_chain(), x, holdout=1.0)


def test_val_images_go_with_a_model_file_only(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--val-images", str(tmp_path),
                              "--out", str(tmp_path / "s")])  # fmt: skip
    assert res.exit_code == 2 and "--val-images goes with --model-file" in " ".join(res.output.split())


def test_auto_ridge_is_chosen_on_the_heldout_images() -> None:
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    _, report = compress(_wide_chain(), x, method="nc", keep=0.5, holdout=0.5, ridge="auto")
    candidates = report.heldout["ridge_candidates"]
    assert set(candidates) == {"0.001", "0.01", "0.1", "1.0"}
    assert report.config["ridge"] == float(min(candidates, key=candidates.get)) and report.config["ridge_auto"]
    assert report.heldout["output_error"] == min(candidates.values())
    from crossdistill.errors import UserError

    with pytest.raises(UserError, match="set holdout too"):
        compress(_wide_chain(), x, ridge="auto")


def test_cli_ridge_option_is_checked(tmp_path: Path, fashion_dir) -> None:
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--ridge", "lots", "--out", str(tmp_path),
                              "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 2 and "--ridge takes a number >= 0 or 'auto'" in " ".join(res.output.split())
