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

import warnings
from pathlib import Path

import torch
from torch import nn

from .checks import check_input_file
from .data import Split, load_image_folder
from .data import normalize_with as normalise_with  # old spelling, kept for users' scripts
from .errors import UserError
from .evaluate import accuracy  # re-exported: the one accuracy function
from .models import load_model_file

__all__ = ["load_model_file", "load_weights", "images_from_folder", "channel_stats", "normalise_with", "accuracy"]


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
