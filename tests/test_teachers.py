"""The shipped teachers load, match their checksums, and keep their stored accuracy on real test images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossdistill.checkpoint import load_checkpoint, sha256_file
from crossdistill.data import dataset_info, load_dataset
from crossdistill.evaluate import accuracy

TEACHERS = sorted((Path(__file__).resolve().parent.parent / "teachers").glob("*.safetensors"))
SLICE = 2000  # test images re-measured; the binomial std of a 92% accuracy on 2000 images is 0.6%
FLOOR = {"resnet18": 0.89}  # 4 epochs on a shared machine (README "Teachers"): 89.75 %


def test_at_least_one_teacher_is_shipped() -> None:
    assert TEACHERS, "no teacher in teachers/"


@pytest.mark.parametrize("path", TEACHERS, ids=[p.stem for p in TEACHERS])
def test_shipped_teacher_matches_checksum_and_accuracy(path: Path, fashion_dir: Path) -> None:
    meta = json.loads(path.with_suffix(".json").read_text())
    assert sha256_file(path) == meta["sha256"]
    model, meta = load_checkpoint(path)
    info = dataset_info(meta["dataset"])
    test = load_dataset(info.name, "test", fashion_dir)
    acc = accuracy(model, test.images[:SLICE], test.labels[:SLICE], info)
    assert abs(acc - meta["test_accuracy"]) < 0.025, (acc, meta["test_accuracy"])
    assert meta["test_accuracy"] > FLOOR.get(meta["model"], 0.9)
