"""Shared helpers for the benchmark scripts: machine info, JSONL results, teacher paths."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = ROOT / "teachers"
# Official mu per family (METHOD.md): 0.9 for the CIFAR ResNets, 0.6 for VGG-16.
OFFICIAL_MU = {"resnet": 0.9, "vgg": 0.6}


def official_mu(model: str) -> float:
    return OFFICIAL_MU["vgg" if model.startswith("vgg") else "resnet"]


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
