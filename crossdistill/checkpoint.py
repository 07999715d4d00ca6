"""Checkpoints: safetensors weights plus a JSON sidecar, both written atomically.

A checkpoint ``name.safetensors`` has a sidecar ``name.json`` holding the model
name (or ``model_file``, ``path.py:function``, for a user's model), its
constructor arguments, the dataset, the measured accuracy, the recipe
and the sha256 of the weights file. ``load_checkpoint`` rebuilds the model from
the registry (or, for compressed students, from the stored channel widths).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import check_model
from .errors import UserError
from .files import atomic_write, file_digest
from .models import get_model, load_model_file
from .structure import apply_widths

# atomic_write and file_digest live in files.py; re-exported for old import paths
__all__ = [
    "atomic_write",
    "file_digest",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
    "sha256_file",
    "storage_state",
]


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def storage_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict as written to disk: on the CPU, contiguous, floats cast to ``dtype`` if given."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(
    model: nn.Module, path: str | Path, meta: dict[str, Any], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Save ``model``'s state dict as safetensors and ``meta`` (+ sha256) as JSON beside it.

    ``dtype`` (e.g. ``torch.float16``) shrinks floating-point tensors on disk;
    they are cast back to float32 on load.
    """
    path = Path(path)
    state = storage_state(model, dtype)
    atomic_write(path, lambda tmp: save_file(state, tmp))
    meta = {**meta, "weights": path.name, "sha256": sha256_file(path)}
    if dtype is not None:
        meta["storage_dtype"] = str(dtype).replace("torch.", "")
    atomic_write(_sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    side = _sidecar(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path (teachers ship in teachers/)")
    if not side.exists():
        raise UserError(f"checkpoint {path} has no metadata file {side.name}; save it with save_checkpoint")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"metadata {side} is not valid JSON ({e}); restore it or re-save the checkpoint") from e


def load_state(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    path = Path(path)
    meta = read_meta(path)
    if verify and "sha256" in meta and sha256_file(path) != meta["sha256"]:
        raise UserError(f"checkpoint {path} does not match its recorded sha256; the file is corrupt or was replaced")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as safetensors ({e}); the file is corrupt") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_checkpoint(
    path: str | Path, verify: bool = True, model_file: str | None = None, trust_model_file: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the sidecar and load its weights. Returns ``(model, meta)``.

    A sidecar naming a ``model_file`` (a user's model) is data, and importing that file runs its
    code: it is imported only when the caller passes ``model_file`` explicitly (the file to build
    the model from) or opts in with ``trust_model_file=True`` (a warning names the file).
    """
    meta = read_meta(path)
    state = load_state(path, verify)
    try:
        if meta.get("model_file") or model_file:  # a user's model (compress --model-file): rebuild from the file
            model = load_model_file(_model_file_to_import(path, meta, model_file, trust_model_file))
        else:
            model = get_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"])
    except KeyError as e:
        raise UserError(f"metadata of {path} lacks {e}; it was not written by crossdistill") from e
    except ValueError as e:
        raise UserError(str(e)) from e
    if meta.get("widths"):
        apply_widths(model, meta["widths"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise UserError(
            f"weights in {path} do not fit architecture {meta.get('model') or meta.get('model_file')!r} "
            f"({' '.join(first)}); "
            "the checkpoint belongs to another model"
        ) from e
    check_model(model, f"checkpoint {path}")
    return model.eval(), meta


def _model_file_to_import(path: str | Path, meta: dict[str, Any], given: str | None, trust: bool) -> str:
    if given:
        return given
    named = _resolve_model_file(Path(path), str(meta["model_file"]))
    if not trust:
        raise UserError(
            f"checkpoint {path} names the model file {named}; importing it runs its code, so pass "
            f"--model-file {named} yourself (or --trust-model-file)"
        )
    warnings.warn(f"importing {named}, named by {path} (trust_model_file): its code runs now", stacklevel=3)
    return named


def _resolve_model_file(path: Path, spec: str) -> str:
    """A sidecar's ``file.py:function`` with a relative file resolved against the checkpoint's folder."""
    file, _, fn = spec.rpartition(":")
    if not file or Path(file).is_absolute():
        return spec
    return f"{(path.parent / file).resolve()}:{fn}"
