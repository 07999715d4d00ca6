"""Checks that run before any expensive work: models, options and paths a user hands us.

Each check raises :class:`UserError` with one line naming the problem and the fix; callers
call them with one line each, so a mistake is reported before capture or training starts,
never after minutes of work (or, worse, after a half-written output).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

__all__ = [
    "check_model_finite",
    "check_float_weights",
    "check_model",
    "check_model_output",
    "check_device",
    "check_positive",
    "check_compress_options",
    "check_patterns_match",
    "check_input_file",
    "check_input_dir",
    "check_output_dir",
    "check_output_file",
    "SHIPPED_TEACHERS",
]

# the folder of the teachers shipped with the package: never written to without --overwrite
SHIPPED_TEACHERS = (Path(__file__).resolve().parent.parent / "teachers").resolve()
# pseudo file systems: writing there either fails late or does something other than store a file
_SYSTEM_ROOTS = tuple(Path(p) for p in ("/proc", "/sys", "/dev"))
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


# --------------------------------------------------------------------------- models


def check_model_finite(model: nn.Module, what: str = "the model") -> None:
    """NaN/inf in any floating parameter *or buffer* (BN running statistics included) is refused."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{what} has NaN or inf in {name}; the weights are corrupt: retrain or restore them")


def check_float_weights(model: nn.Module, what: str = "the model") -> None:
    """Integer-typed conv/linear weights would be silently cast by the solvers: refuse them."""
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(w, torch.Tensor) and not w.is_floating_point():
            raise UserError(
                f"{what}: layer {name} has {str(w.dtype).replace('torch.', '')} weights; "
                "crossdistill needs float weights (convert the model with model.float())"
            )


def check_model(model: nn.Module, what: str = "the model") -> None:
    """A model we are about to measure or compress: float weights, all finite."""
    if not isinstance(model, nn.Module):
        raise UserError(f"{what} is a {type(model).__name__}, not a torch.nn.Module")
    check_float_weights(model, what)
    check_model_finite(model, what)


def check_model_output(out: object, what: str = "the model", logits: bool = False) -> None:
    """Compression needs one output tensor per batch, not a tuple or dict; accuracy (``logits``)
    needs it shaped (N, classes)."""
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"{what} returns a {type(out).__name__}, not a tensor; make forward() return the logits tensor "
            "(e.g. wrap the model and return output[0])"
        )
    if logits and out.dim() != 2:
        raise UserError(f"{what} returns shape {tuple(out.shape)}; forward() must return logits (N, classes)")


# --------------------------------------------------------------------------- options


def check_device(device: str) -> None:
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise UserError(f"unknown device {device!r}; use --device cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")


def check_positive(name: str, value: float | int | None, integer: bool = False, allow_none: bool = True) -> None:
    """``value`` > 0 (and finite; a whole number when ``integer``). ``name`` is the CLI spelling, e.g. --lr."""
    if value is None and allow_none:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    bad = bad or not math.isfinite(value) or value <= 0 or (integer and int(value) != value)
    if bad:
        kind = "a whole number >= 1" if integer else "a positive number"
        raise UserError(f"{name} must be {kind}, got {value!r}")


def check_compress_options(cfg: object) -> None:
    """Ranges of the numeric CompressConfig fields (the CLI spelling is named in each message)."""
    check_positive("--iterations", getattr(cfg, "iterations", 1), integer=True)
    check_positive("--lr", getattr(cfg, "lr", 1.0))
    check_positive("batch_size", getattr(cfg, "batch_size", 1), integer=True)
    check_positive("steps", getattr(cfg, "steps", 1), integer=True)
    ridge = getattr(cfg, "ridge", 0.0)
    # "auto" is resolved by compress() into one run per candidate ridge (each then a number)
    if ridge != "auto" and (not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0):
        raise UserError(f"ridge must be a finite number >= 0 or 'auto', got {ridge!r}")
    if getattr(cfg, "ridge_cv", False) and getattr(cfg, "ridge_guard", False):
        raise UserError("ridge_cv and ridge_guard both choose each layer's ridge; turn one of them off")
    prune = getattr(cfg, "prune", "structured")
    if prune not in ("structured", "unstructured"):
        raise UserError(f"prune must be 'structured' or 'unstructured', got {prune!r}")
    check_device(getattr(cfg, "device", "cpu"))


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]


def check_patterns_match(model: nn.Module, patterns: Iterable[str] | None, flag: str) -> None:
    """Every layer-name pattern (``--include``, ``--exclude``, ``--keep-file``) matches some layer:
    a typo would otherwise silently compress with the defaults."""
    names = _layer_names(model)
    for p in patterns or ():
        if not any(fnmatch(n, p) for n in names):
            sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise UserError(f"{flag} pattern {p!r} matches no Conv2d/Linear layer (layers are named like {sample})")


# --------------------------------------------------------------------------- paths


def _under_system_root(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == r or r in resolved.parents for r in _SYSTEM_ROOTS)


def check_input_file(path: str | Path, flag: str) -> Path:
    """An existing regular file (not a folder) that we can read."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file")
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path} is not readable; fix its permissions")
    return path


def check_input_dir(path: str | Path, flag: str) -> Path:
    """An existing folder we can list."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder (one sub-folder per class, or flat)")
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; check the path")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not readable; fix its permissions")
    return path


def _writable_parent(path: Path, flag: str) -> None:
    if _under_system_root(path):
        raise UserError(f"{flag} {path} is under a system folder (/proc, /sys, /dev); choose a normal folder")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{flag} {path}: {anc} is a file, not a folder; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: folder {anc} is not writable; choose another path")


def _shipped(path: Path) -> bool:
    resolved = path.resolve()
    return resolved == SHIPPED_TEACHERS or SHIPPED_TEACHERS in resolved.parents


def _own_leftover(name: str) -> bool:
    # temporary folders of an interrupted run (outdir.py) do not make a folder "non-empty"
    return ".crossdistill-" in name


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """A folder we may write a set of files into: not a file, not a system path, writable, and
    empty (or absent) unless ``overwrite``."""
    path = Path(path)
    _writable_parent(path, flag)
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise UserError(f"{flag} {path} is the current folder (or holds it); choose a new sub-folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, but a folder is needed; choose another {flag}")
    if _shipped(path) and not overwrite:
        raise UserError(f"{flag} {path} is the shipped teachers folder; choose another {flag} (or add --overwrite)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable; choose another {flag}")
        if not overwrite and any(not _own_leftover(p.name) for p in path.iterdir()):
            raise UserError(f"{flag} {path} is not empty; choose a new folder or add --overwrite to replace it")
    return path


def check_output_file(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """A file we may (re)write: not a folder, not a system path, writable parent, absent unless ``overwrite``."""
    path = Path(path)
    _writable_parent(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, but a file is needed; name a file inside it")
    if _shipped(path) and not overwrite:
        raise UserError(f"{flag} {path} would replace a shipped teacher; choose another {flag} (or add --overwrite)")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; choose another {flag} or add --overwrite to replace it")
    return path
