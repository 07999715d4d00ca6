"""Saving a compressed student so that it loads with or without crossdistill.

- ``student.safetensors`` + ``student.json``: weights and the architecture
  (registry name + per-layer widths); ``load_checkpoint`` rebuilds it.
- ``student.torchscript.pt``: a TorchScript program; ``torch.jit.load`` runs
  it with plain PyTorch, no crossdistill import needed.
- ``report.json``: the compression report and the resolved config.
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write, save_checkpoint
from .structure import layer_widths

__all__ = ["save_student"]


def save_student(
    student: nn.Module,
    out_dir: str | Path,
    teacher_meta: dict[str, Any],
    report: dict[str, Any],
    example: torch.Tensor,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the student (safetensors + JSON, TorchScript) and its report into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student = student.cpu().eval()
    meta = {
        "model": teacher_meta["model"],
        "num_classes": teacher_meta["num_classes"],
        "in_channels": teacher_meta["in_channels"],
        "dataset": teacher_meta.get("dataset"),
        "teacher_sha256": teacher_meta.get("sha256"),
        "widths": layer_widths(student),
        **(extra_meta or {}),
    }
    paths = {"weights": out / "student.safetensors", "torchscript": out / "student.torchscript.pt",
             "report": out / "report.json"}  # fmt: skip
    save_checkpoint(student, paths["weights"], meta)
    with torch.no_grad():
        scripted = torch.jit.trace(student, example.cpu()[:1])
    atomic_write(paths["torchscript"], lambda tmp: torch.jit.save(scripted, tmp))
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(paths["report"], lambda tmp: Path(tmp).write_text(text))
    return paths
