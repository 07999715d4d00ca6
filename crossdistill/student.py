"""Saving a compressed student so that it loads with or without crossdistill.

- ``student.safetensors`` + ``student.json``: weights and the architecture: the
  registry name (our models) or the user's ``model_file`` (``path.py:function``;
  the file is copied into the folder and named relative to it, so a moved
  folder still loads) plus the shapes of every narrowed module;
  ``load_checkpoint`` rebuilds either.
- ``student.pt2``: a ``torch.export`` program; ``torch.export.load(path).module()``
  runs it with plain PyTorch, no crossdistill import needed (batch size is dynamic).
- ``student.onnx`` (when the ``onnx`` package is installed, ``pip install crossdistill[export]``):
  the same network for onnxruntime and other ONNX runtimes; input ``images``,
  output ``output``, dynamic batch size.
- ``report.json``: the compression report and the resolved config.
The files are built in a temporary folder next to ``out_dir`` and swapped in as
one unit (``outdir.write_folder``): a crash leaves the previous set or the new one.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .errors import UserError
from .files import atomic_write
from .outdir import kill_point, write_folder
from .structure import layer_widths

__all__ = ["save_student", "export_onnx", "onnx_available"]


def onnx_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Write ``model`` as ONNX (opset 17, dynamic batch) with the TorchScript-based exporter."""
    model = model.cpu().eval()
    x = _two(example)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            kwargs = dict(
                input_names=["images"],
                output_names=["output"],
                opset_version=17,
                dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
            )
            try:
                torch.onnx.export(model, (x,), tmp, dynamo=False, **kwargs)
            except TypeError:  # torch < 2.5 has no dynamo= argument
                torch.onnx.export(model, (x,), tmp, **kwargs)

    atomic_write(path, write)
    return Path(path)


def save_student(
    student: nn.Module,
    out_dir: str | Path,
    teacher_meta: dict[str, Any],
    report: dict[str, Any],
    example: torch.Tensor,
    *,
    overwrite: bool = False,
    **extra_meta: Any,
) -> dict[str, Path]:
    """Write the student (safetensors + JSON, torch.export, ONNX) and its report into ``out_dir``.

    ``teacher_meta`` names the architecture: ``model`` (a registry name, with ``num_classes`` and
    ``in_channels``) or ``model_file`` (``path.py:function`` building the user's model). ``onnx=``:
    write ``student.onnx`` (None, the default: when the onnx package is installed). Further keywords
    (``method=``, ``k=``, ``seed=``; or a dict as ``extra_meta=``, the older spelling) go into student.json,
    except ``files=``: ``{file name: write(path)}``, more files of the set (e.g. a plot).
    A non-empty ``out_dir`` is refused unless ``overwrite``; the files appear together or not at all.
    """
    onnx = extra_meta.pop("onnx", None)
    more_files = extra_meta.pop("files", None) or {}
    extra_meta = {**(extra_meta.pop("extra_meta", None) or {}), **extra_meta}
    out = Path(out_dir)
    student = student.cpu().eval()
    meta = {
        "model": teacher_meta.get("model"),
        "num_classes": teacher_meta.get("num_classes"),
        "in_channels": teacher_meta.get("in_channels", example.shape[1]),
        "dataset": teacher_meta.get("dataset"),
        "teacher_sha256": teacher_meta.get("sha256"),
        "input_shape": list(example.shape[1:]),
        "widths": layer_widths(student),
        **(extra_meta or {}),
    }
    model_source = None
    if teacher_meta.get("model_file"):
        # a copy of the file travels with the student: the sidecar names it relative to the folder
        path, _, fn = str(teacher_meta["model_file"]).rpartition(":")
        model_source = Path(path).resolve()
        meta["model_file"] = f"{model_source.name}:{fn}"
        meta["model_file_source"] = str(model_source)
    for key in ("mean", "std", "classes"):
        if key in teacher_meta:
            meta[key] = teacher_meta[key]
    names = {"weights": "student.safetensors", "program": "student.pt2", "report": "report.json"}
    if model_source is not None:
        names["model_file"] = model_source.name
    if onnx or (onnx is None and onnx_available()):
        names["onnx"] = "student.onnx"
    text = json.dumps(report, indent=2, default=str) + "\n"

    def write(folder: Path) -> None:
        save_checkpoint(student, folder / names["weights"], meta)
        if model_source is not None:
            atomic_write(folder / model_source.name, lambda tmp: Path(tmp).write_bytes(model_source.read_bytes()))
        kill_point("student-weights-written")
        x = _two(example)
        try:
            program = torch.export.export(student, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as e:  # noqa: BLE001 - any export failure: nothing is written to out_dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"torch.export cannot export the student ({first}); nothing was written to {out}") from e
        atomic_write(folder / names["program"], lambda tmp: torch.export.save(program, tmp))
        if "onnx" in names:
            export_onnx(student, folder / names["onnx"], x)
        atomic_write(folder / names["report"], lambda tmp: Path(tmp).write_text(text))
        for name, write_file in more_files.items():
            write_file(folder / name)

    write_folder(out, write, overwrite)
    return {**{key: out / name for key, name in names.items()}, **{name: out / name for name in more_files}}


def _two(example: torch.Tensor) -> torch.Tensor:
    """Two example images: with one, torch.export would specialise the batch dimension to 1."""
    x = example.cpu()[:2]
    return torch.cat([x, x]) if len(x) == 1 else x
