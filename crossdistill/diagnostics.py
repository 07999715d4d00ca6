"""Per-layer reconstruction error of a student against its teacher, and its plot."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .capture import layer_outputs
from .files import atomic_write

__all__ = ["layer_output_errors", "plot_layer_errors"]


@torch.no_grad()
def layer_output_errors(
    teacher: nn.Module, student: nn.Module, names: list[str], images: torch.Tensor, batch_size: int = 256
) -> list[float]:
    """Relative error ||y^T - y^S||^2 / ||y^T||^2 of each named layer's output (raw conv output),
    each network fed its own inputs: the error accumulated up to and including that layer."""
    sums = {n: [0.0, 0.0] for n in names}
    teacher.eval()
    student.eval()
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        yT, yS = layer_outputs(teacher, names, x), layer_outputs(student, names, x)
        for n in names:
            if yS[n].shape != yT[n].shape:  # output channels were removed: not comparable
                continue
            sums[n][0] += float((yT[n] - yS[n]).pow(2).sum())
            sums[n][1] += float(yT[n].pow(2).sum())
    return [s[0] / max(s[1], 1e-12) if s[1] else float("nan") for s in sums.values()]


def plot_layer_errors(curves: dict[str, list[float]], names: list[str], path: str | Path, title: str = "") -> Path:
    """Line plot of per-layer relative output error, one line per method (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for label, errs in curves.items():
        xs = [i for i, e in enumerate(errs) if e == e and e > 0]  # NaN: width changed; 0: layer untouched
        ax.plot(xs, [errs[i] for i in xs], marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("relative output error vs teacher")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
