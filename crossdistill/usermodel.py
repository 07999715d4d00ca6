"""A user's own model and images: build from ``file.py:function``, load weights, normalise a folder.

- ``load_model_file("my_model.py:build")`` imports the file and calls ``build()``
  (no arguments) to get an ``nn.Module``.
- ``load_weights(model, "w.pt")``: a ``.safetensors`` file, or a ``torch.save``d
  state dict (also inside a dict under ``state_dict`` / ``model``), loaded
  with ``weights_only=True`` (no pickled code runs).
- ``images_from_folder(dir, channels, size, mean, std)``: the images of an
  image folder as floats in [0, 1], then ``(x - mean) / std`` per channel;
  mean/std default to the per-channel statistics of these very images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .checks import check_input_file
from .data import Split, load_image_folder
from .errors import UserError

__all__ = ["load_model_file", "load_weights", "images_from_folder", "channel_stats", "normalise_with", "accuracy"]


def _split_spec(spec: str) -> tuple[Path, str]:
    path, sep, fn = str(spec).rpartition(":")
    if not sep or not path or not fn.isidentifier():
        raise UserError(f"--model-file must look like path/to/file.py:function, got {spec!r}")
    return Path(path), fn


def load_model_file(spec: str) -> nn.Module:
    """Import ``path.py`` and call its ``function()``: the user's (untrained or to-be-loaded) model."""
    path, fn = _split_spec(spec)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; check the path")
    name = "crossdistill_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    build = getattr(module, fn, None)
    if not callable(build):
        raise UserError(f"{path} has no function {fn!r}; name a function that returns the nn.Module")
    try:
        model = build()
    except Exception as e:
        raise UserError(f"{path}:{fn}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"{path}:{fn}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (safetensors, or torch.save'd .pt/.pth) into ``model``; strict key/shape match."""
    path = check_input_file(path, "--weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": noise, the load is safe either way
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights {path} ({type(e).__name__}: {e}); save a state_dict") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = " ".join(str(e).strip().splitlines()[:2])
        raise UserError(f"weights in {path} do not fit the model ({lines})") from e
    return model.eval()


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of float images (N, C, H, W)."""
    mean = x.mean((0, 2, 3))
    std = x.std((0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def normalise_with(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float ``(x/255 - mean) / std``; one value broadcasts to every channel."""
    x = images.float().div(255)
    c = x.shape[1]
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise UserError(f"--{name} needs 1 or {c} values (one per channel), got {len(v)}")
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if (s <= 0).any():
        raise UserError("--std values must be positive")
    return (x - m) / s


def images_from_folder(
    root: str | Path,
    channels: int,
    size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    classes: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float], list[str]]:
    """Normalised images of a folder (one sub-folder per class, or flat and unlabelled: labels -1).

    Returns ``(images, labels, mean, std, classes)``; mean/std are the ones used (computed from the
    images in [0, 1] when not given). ``classes``: label sub-folders by these names (a test folder
    takes the class list of the compression images), see :func:`load_image_folder`.
    """
    split: Split
    split, classes = load_image_folder(root, size=size, channels=channels, classes=classes)
    if mean is None or std is None:
        m, s = channel_stats(split.images.float().div(255))
        mean, std = mean or m, std or s
    return normalise_with(split.images, mean, std), split.labels, list(mean), list(std), classes


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
    """(top-1 accuracy, number of labelled images) on normalised ``images``; labels -1 are left out."""
    keep = labels >= 0
    images, labels = images[keep], labels[keep]
    if len(labels) == 0:
        raise UserError("the test folder has no labelled images; give one sub-folder per class")
    model = model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = model(images[i : i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(labels), len(labels)
