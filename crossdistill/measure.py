"""Measure a model: parameters, FLOPs (dense and sparse), CPU latency and size. Torch and safetensors only.

What is counted, and why:

- **Parameters** (:func:`count_params`): every trainable tensor element (BatchNorm
  running statistics are buffers and are not counted). A structurally pruned
  student has physically narrower layers, so this shrinks with it.
- **Nonzero parameters** (:func:`count_nonzero_params`): the same tensors with
  zeros left out, the size measure for unstructured (weight-level) sparsity.
  Weights pruned with ``torch.nn.utils.prune`` are counted through their
  masked value (``weight = weight_orig * weight_mask``).
- **FLOPs** (:func:`count_flops`): from :class:`torch.utils.flop_counter.FlopCounterMode`
  on one batch-1 forward pass. That counter counts a multiply-add as **2 FLOPs**
  (``FLOPs = 2 x MACs``) and counts only matrix work (convolutions, matmuls);
  BatchNorm, ReLU, pooling, residual additions and bias additions are not
  counted. Papers that quote "FLOPs" as multiply-accumulates report half of
  this number.
- **Sparse FLOPs** (:func:`count_sparse_flops`): the FLOPs above with each
  convolution's and linear layer's share (FlopCounterMode's own count for that
  module) multiplied by the fraction of its
  weights that are nonzero, i.e. the work a sparse kernel that skips zero
  weights would do. Equal to :func:`count_flops` for a dense model.
- **Size** (:func:`checkpoint_size`, :func:`state_dict_size`): bytes of the
  safetensors weights file (header included; the JSON sidecar is not counted).
- **Latency** (:func:`measure_latency`): median wall-clock seconds of one
  forward pass on CPU in eval mode under ``torch.inference_mode``, after
  warm-up runs, with ``torch.get_num_threads()`` intra-op threads (recorded in
  the report, because latency depends on it).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .capture import eval_mode
from .checkpoint import storage_state
from .errors import UserError

__all__ = [
    "count_params",
    "count_nonzero_params",
    "count_flops",
    "FlopCount",
    "count_sparse_flops",
    "measure_latency",
    "measure_latency_pair",
    "cpu_time_pair",
    "checkpoint_size",
    "state_dict_size",
]


# --------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _example(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, *input_shape, device=_device(model))


def _effective_params(model: nn.Module) -> Iterator[torch.Tensor]:
    """Each parameter once, with ``torch.nn.utils.prune``'s ``x_orig`` replaced by the masked ``x``."""
    seen: set[int] = set()
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("_orig") and hasattr(m, name[: -len("_orig")] + "_mask"):
                yield getattr(m, name[: -len("_orig")])
            else:
                yield p


# --------------------------------------------------------------------------- counts


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable weights and biases; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Number of nonzero parameter elements: the size measure for unstructured sparsity."""
    return sum(int(torch.count_nonzero(t.detach())) for t in _effective_params(model))


def _flops_by_module(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of a batch-1 forward and FlopCounterMode's per-module totals, keyed by module name."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(_example(model, input_shape))
    root = type(model).__name__  # FlopCounterMode names modules "<RootClass>.<qualified name>"
    per_module = {
        name.removeprefix(root + "."): int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()
    }
    return int(counter.get_total_flops()), per_module


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a batch of 1 image of ``input_shape`` (C, H, W).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: a multiply-add
    is 2 FLOPs, and only convolutions and matrix products are counted. Layers
    whose channels were physically removed cost proportionally less.
    """
    return _flops_by_module(model, input_shape)[0]


class FlopCount:
    """FLOPs of ``model`` counted once (:func:`count_flops`), and of the same model with channels removed
    without tracing it again (:meth:`recount`).

    FlopCounterMode counts a Conv2d or Linear as 2 x its output positions x its weight elements, and
    removing channels changes neither the positions nor anything outside those layers. So when every
    counted FLOP lies in a Conv2d / Linear layer, the same layers, narrower, cost the sum of each layer's
    FLOPs per weight element times its weight elements now: exactly FlopCounterMode's own count, from the
    shapes. Otherwise (a matmul in a ``forward``, layers renamed, added or dropped) it counts again.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        self.input_shape = tuple(input_shape)
        self.total, per_module = _flops_by_module(model, input_shape)
        layers = _flop_layers(model)
        per_weight: dict[str, tuple[type, int]] | None = {}
        for name, m in layers.items():
            flops, numel = per_module.get(name, 0), m.weight.numel()
            if numel == 0 or flops % numel:
                per_weight = None
                break
            per_weight[name] = (type(m), flops // numel)
        if per_weight is not None and sum(per_module.get(n, 0) for n in layers) != self.total:
            per_weight = None  # FLOPs outside the layers
        self.per_weight = per_weight  # layer -> (type, FLOPs per weight element); None: count again

    def recount(self, model: nn.Module) -> int:
        """FLOPs of ``model``: the counted model with channels removed (from its shapes), else counted anew."""
        if self.per_weight is not None:
            layers = _flop_layers(model)
            same = layers.keys() == self.per_weight.keys()
            if same and all(type(m) is self.per_weight[n][0] for n, m in layers.items()):
                return sum(self.per_weight[n][1] * m.weight.numel() for n, m in layers.items())
        return count_flops(model, self.input_shape)


def _flop_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def count_sparse_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs as :func:`count_flops`, with each Conv/Linear layer's FLOPs multiplied by its weight density.

    Density is the fraction of the layer's weights that are nonzero, so a layer
    with half its weights zeroed counts half its FLOPs: what a sparse kernel
    skipping zero weights would compute. Each layer's FLOPs are FlopCounterMode's
    own count for that module (every call summed). Work outside Conv/Linear
    layers (if any is counted) is kept as is. For a dense model this equals ``count_flops``.
    """
    total, per_module = _flops_by_module(model, input_shape)
    saved = 0.0  # FLOPs the layers would save by skipping zero weights
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and name in per_module:
            w = m.weight.detach()
            density = torch.count_nonzero(w).item() / max(w.numel(), 1)
            saved += per_module[name] * (1.0 - density)
    return int(round(total - saved))


def _median_times(
    models: Sequence[nn.Module], x: torch.Tensor, warmup: int, repeats: int, clock=time.perf_counter
) -> list[float]:
    """Median seconds of one forward pass of each model on ``x``, the models timed in turn, pass by pass."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack, torch.inference_mode():
        for m in models:
            stack.enter_context(eval_mode(m))
        for _ in range(warmup):
            for m in models:
                m(x)
        for _ in range(repeats):
            for m, ts in zip(models, times, strict=True):
                t0 = clock()
                m(x)
                ts.append(clock() - t0)
    return [statistics.median(ts) for ts in times]


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, warmup: int = 5, repeats: int = 20
) -> float:
    """Median wall-clock seconds of one forward pass on a random batch of ``batch_size`` images.

    Runs in eval mode under ``torch.inference_mode`` after ``warmup`` untimed
    passes (allocator and kernel warm-up); the median of ``repeats`` timed
    passes is robust to the odd scheduling hiccup. Uses the current
    ``torch.get_num_threads()`` threads.
    """
    return _median_times([model], _example(model, input_shape, batch_size), warmup, repeats)[0]


def measure_latency_pair(
    first: nn.Module,
    second: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
) -> tuple[float, float]:
    """Median seconds of one forward pass of each model, timed alternately on the same batch.

    Alternating (first, second, first, ...) makes slow drifts in machine speed
    (a shared or throttled CPU) hit both models alike, so their ratio, the
    speed-up, is steadier than from two separate :func:`measure_latency` runs.
    """
    t_first, t_second = _median_times([first, second], _example(first, input_shape, batch_size), warmup, repeats)
    return t_first, t_second


def cpu_time_pair(
    first: nn.Module,
    second: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
) -> tuple[float, float]:
    """:func:`measure_latency_pair` on the calling thread's CPU clock (``time.thread_time``).

    On one CPU thread (``torch.get_num_threads() == 1``) that is the latency
    without what other processes take of the core: on the loaded 2-core
    machine the same ResNet-56 pair timed 0.39-0.86 wall-clock and 0.50-0.54
    on the thread's clock (six tries each). With more threads it counts the
    calling thread only: use :func:`measure_latency_pair` there.
    """
    x = _example(first, input_shape, batch_size)
    t_first, t_second = _median_times([first, second], x, warmup, repeats, clock=time.thread_time)
    return t_first, t_second


def checkpoint_size(path: str | Path) -> int:
    """Bytes of a safetensors weights file on disk (the JSON sidecar is not included)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    return path.stat().st_size


def state_dict_size(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes that ``model``'s state dict takes as a safetensors file (written to a temporary file).

    ``dtype`` (e.g. ``torch.float16``) casts floating-point tensors exactly as
    :func:`crossdistill.checkpoint.save_checkpoint` does (both use ``storage_state``).
    """
    state = storage_state(model, dtype)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)
