"""The CLI end to end on the shipped ResNet-20 teacher, and its one-line errors for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crossdistill.baselines import BASELINES
from crossdistill.checkpoint import load_checkpoint
from crossdistill.cli import DEMO_TEACHER, app

runner = CliRunner()


def test_compress_writes_a_student_that_loads_with_and_without_crossdistill(tmp_path: Path, fashion_dir) -> None:
    out = tmp_path / "student"
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", "ours",
                              "--out", str(out), "--test-limit", "200", "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    student, meta = load_checkpoint(out / "student.safetensors")
    teacher, _ = load_checkpoint(DEMO_TEACHER)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    program = torch.export.load(str(out / "student.pt2")).module()
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(program(x), student(x), atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["k"] == 1 and report["config"]["method"] == "ours"
    assert report["flops_after"] < report["flops_before"]
    # a trained teacher: the re-fit beats the no-re-fit start on the views, the safety net keeps the student
    assert (
        report["safety"]["returned"] == "student"
        and report["safety"]["student_error"] < report["safety"]["start_error"]
    )


def test_safety_option_reaches_the_config_and_bad_values_are_refused(tmp_path: Path, fashion_dir) -> None:
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", "nc",
                              "--safety", "off", "--out", str(tmp_path), "--test-limit", "100", "--no-latency",
                              "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["safety"] == "off" and report["safety"] is None
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--safety", "on",
                              "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 2 and "safety must be 'views' or 'off'" in res.output


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_compress_runs_every_baseline(method: str, tmp_path: Path, fashion_dir) -> None:
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", method,
                              "--out", str(tmp_path), "--test-limit", "100", "--no-latency",
                              "--data-dir", str(fashion_dir), "--mir-steps", "5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "peak memory" in res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["method"] == method and report["flops_after"] < report["flops_before"]


def test_refine_mir_runs_after_a_method_and_is_recorded(tmp_path: Path, fashion_dir) -> None:
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", "nc",
                              "--refine", "mir", "--mir-steps", "3", "--out", str(tmp_path), "--test-limit", "100",
                              "--no-latency", "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["refine"] == "mir" and report["refine"]["steps_run"] == 3
    assert report["refine"]["feature_layer"] == "pool"
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--refine", "bp",
                              "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 2 and "refine must be None or 'mir'" in res.output


def test_ridge_auto_runs_from_the_command_line_and_is_refused_by_baselines(tmp_path: Path, fashion_dir) -> None:
    # the CLI validated "auto" as a number and refused it before compress() could choose the ridge
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "2", "--method", "nc",
                              "--ridge", "auto", "--holdout", "0.2", "--out", str(tmp_path), "--test-limit", "100",
                              "--no-latency", "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["ridge"] in (1e-3, 1e-2, 0.1, 1.0)
    res = runner.invoke(app, ["compress", "--teacher", str(DEMO_TEACHER), "--k", "1", "--method", "l1",
                              "--ridge", "auto", "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 2 and "give baseline 'l1' a number" in " ".join(res.output.split())


def test_evaluate_prints_a_table(fashion_dir) -> None:
    res = runner.invoke(app, ["evaluate", str(DEMO_TEACHER), "--limit", "100", "--no-latency",
                              "--data-dir", str(fashion_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Top-1 accuracy" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "--teacher", "missing.safetensors"], "does not exist"),
        (["compress", "--teacher", str(DEMO_TEACHER), "--k", "100000"], "lower --k"),
        (["compress", "--teacher", str(DEMO_TEACHER), "--keep", "0"], "keep must lie in (0, 1]"),
        (["compress", "--teacher", str(DEMO_TEACHER), "--method", "magic"], "unknown --method"),
        (["evaluate", "missing.safetensors"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str, fashion_dir) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    meta = json.loads(DEMO_TEACHER.with_suffix(".json").read_text())
    bad.with_suffix(".json").write_text(json.dumps(meta))
    res = runner.invoke(app, ["evaluate", str(bad)])
    assert res.exit_code == 2
    assert "sha256" in res.output or "corrupt" in res.output
