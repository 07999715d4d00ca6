from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from crossdistill.checkpoint import atomic_write, load_checkpoint, read_meta, save_checkpoint, sha256_file
from crossdistill.errors import UserError
from crossdistill.models import get_model
from crossdistill.structure import layer_widths


def meta_for(name: str = "lenet5", in_channels: int = 1, num_classes: int = 10) -> dict:
    return {"model": name, "dataset": "fashion-mnist", "num_classes": num_classes, "in_channels": in_channels}


def saved(tmp_path: Path, name: str = "lenet5", **kw) -> tuple[nn.Module, Path]:
    model = get_model(name, 10, 1).eval()
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(model, path, meta_for(name), **kw)
    return model, path


def test_round_trip(tmp_path: Path) -> None:
    model, path = saved(tmp_path, "resnet20")
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha256"] == sha256_file(path) and side["weights"] == path.name
    loaded, meta = load_checkpoint(path)
    assert meta["model"] == "resnet20" and not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_fp16_storage(tmp_path: Path) -> None:
    model, path32 = saved(tmp_path)
    path16 = tmp_path / "half.safetensors"
    meta = save_checkpoint(model, path16, meta_for(), dtype=torch.float16)
    assert meta["storage_dtype"] == "float16"
    assert path16.stat().st_size < 0.6 * path32.stat().st_size
    loaded, _ = load_checkpoint(path16)
    for k, v in loaded.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype, k  # cast back to float32 on load
        torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-3, atol=1e-3)


def test_corrupt_file(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path, verify=False)


def test_sha_mismatch(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in get_model("lenet5", 10, 1).state_dict().items()}
    save_file(other, str(path))  # a valid file, but not the one the sidecar vouches for
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        load_checkpoint(path)


def test_wrong_architecture(tmp_path: Path) -> None:
    _, path = saved(tmp_path, "resnet20")
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "model": "resnet32"}))
    with pytest.raises(UserError, match="do not fit architecture"):
        load_checkpoint(path)
    side.write_text(json.dumps({**meta, "model": "resnet999"}))
    with pytest.raises(UserError, match="unknown model"):
        load_checkpoint(path)
    side.write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    with pytest.raises(UserError, match="lacks"):
        load_checkpoint(path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    _, path = saved(tmp_path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_meta(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="no metadata"):
        load_checkpoint(path)


def test_narrowed_student_round_trip(tmp_path: Path) -> None:
    """A physically narrowed model is rebuilt from its recorded widths."""
    student = get_model("lenet5", 10, 1)
    student.features[0] = nn.Conv2d(1, 4, 5, padding=2)
    student.features[3] = nn.Conv2d(4, 9, 5)
    student.classifier[0] = nn.Linear(9 * 25, 120)
    student.eval()
    path = tmp_path / "student.safetensors"
    save_checkpoint(student, path, {**meta_for(), "widths": layer_widths(student)})
    loaded, _ = load_checkpoint(path)
    assert loaded.features[3].out_channels == 9
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(student(x), loaded(x))


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def writer(tmp: str) -> None:
        Path(tmp).write_text("half-written")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        atomic_write(target, writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # temporary file cleaned up
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"
