"""Saving a compressed student so that it loads with or without crossdistill.

- ``student.safetensors`` + ``student.json``: weights and the architecture
  (registry name + per-layer widths); ``load_checkpoint`` rebuilds it.
- ``student.pt2``: a ``torch.export`` program; ``torch.export.load(path).module()``
  runs it with plain PyTorch, no crossdistill import needed (batch size is dynamic).
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
    paths = {"weights": out / "student.safetensors", "program": out / "student.pt2",
             "report": out / "report.json"}  # fmt: skip
    save_checkpoint(student, paths["weights"], meta)
    x = example.cpu()[:2]
    program = torch.export.export(student, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(paths["program"], lambda tmp: torch.export.save(program, tmp))
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(paths["report"], lambda tmp: Path(tmp).write_text(text))
    return paths
