"""Shared helpers for the benchmark scripts: machine info, JSONL results, teacher paths."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from crossdistill import models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = ROOT / "teachers"


def official_mu(model: str) -> float:
    """The official mu of a registered model (a class attribute in crossdistill/models.py)."""
    return models.official_mu(models.get_model(model))


def teacher_path(model: str, dataset: str) -> Path:
    return TEACHERS / f"{model}_{dataset}.safetensors"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    """One line per finished cell, flushed at once, so an interrupted grid resumes where it stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def validation_draws(info, seeds, ks, val_per_class: int):
    """Per (seed, K): the few-shot draw from the train split (as ``load_few_shot``) with its labels, and
    ``val_per_class`` validation images per class from the train split, disjoint from the draw (never test)."""
    from crossdistill.data import few_shot_indices, load_dataset, load_validation, normalize

    train = load_dataset(info.name, "train")
    for seed in seeds:
        for k in ks:
            draw = few_shot_indices(train, k, seed, info.num_classes)
            vx, vy = load_validation(info.name, val_per_class, seed=0, exclude=draw)
            yield seed, k, normalize(train.images[draw], info), train.labels[draw], vx, vy
