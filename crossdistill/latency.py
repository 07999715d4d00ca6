"""A per-layer latency table measured on this device, for latency targets.

The latency of a model is modelled as the sum of its layers' latencies,
each looked up by layer type and shape (Conv2d: in/out channels, kernel,
stride, padding, groups, input H x W; Linear: in/out features; BatchNorm2d:
channels, H x W; all at the target's batch size). A shape not in the table
is measured once on the spot (the layer alone, random weights, median of a
few runs after warm-up) and the table is saved to the user cache directory,
one file per device (``latency-<hash>.json``: CPU model or GPU name, torch
version, threads), written to a temporary name then renamed.

What the model misses (activations, residual sums, pooling, Python
overhead) is roughly constant as channels narrow, so it shifts both teacher
and student; :func:`model_error` compares the table's sum with end-to-end
timing so the error is known (benchmarks report it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .capture import eval_mode, removing
from .data import default_cache_dir
from .files import atomic_write

__all__ = ["LatencyTable", "device_key", "latency_measure", "model_error"]

_TIMED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device | str = "cpu") -> str:
    """Short hash naming this device: CPU model (or GPU name), torch version, threads."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    text = f"{name}|{torch.__version__}|{torch.get_num_threads()}|{device.type}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _key(layer: nn.Module, in_shape: Sequence[int], batch: int) -> str:
    if isinstance(layer, nn.Conv2d):
        spec = [
            layer.in_channels,
            layer.out_channels,
            *layer.kernel_size,
            *layer.stride,
            str(layer.padding),
            layer.groups,
            *in_shape[-2:],
        ]
    elif isinstance(layer, nn.Linear):
        spec = [layer.in_features, layer.out_features]
    else:  # BatchNorm2d
        spec = [layer.num_features, *in_shape[-2:]]
    return "|".join(str(v) for v in [type(layer).__name__, *spec, batch])


class LatencyTable:
    """Layer type + shape -> milliseconds on this device, cached in ``path`` (default: the user cache)."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu", repeats: int = 7):
        self.device = torch.device(device)
        self.path = Path(path) if path else default_cache_dir() / f"latency-{device_key(self.device)}.json"
        self.repeats = repeats
        self.entries: dict[str, float] = {}
        self.measured = 0  # entries measured by this instance (the rest came from the cache)
        if self.path.exists():
            try:
                self.entries = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.entries = {}  # a corrupt cache is re-measured, not fatal

    def save(self) -> None:
        text = json.dumps(self.entries, indent=0, sort_keys=True)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    @torch.inference_mode()
    def _time(self, layer: nn.Module, in_shape: Sequence[int], batch: int) -> float:
        layer = _fresh(layer).to(self.device).eval()
        x = torch.randn(batch, *in_shape[1:], device=self.device)
        times = []
        for i in range(2 + self.repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            layer(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i >= 2:  # two warm-up runs
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def lookup(self, layer: nn.Module, in_shape: Sequence[int], batch: int) -> float:
        """Milliseconds of ``layer`` on a batch of ``batch`` inputs of shape ``in_shape[1:]``."""
        key = _key(layer, in_shape, batch)
        if key not in self.entries:
            self.entries[key] = self._time(layer, in_shape, batch)
            self.measured += 1
        return self.entries[key]

    def model_ms(self, model: nn.Module, input_shape: Sequence[int], batch: int) -> float:
        """The model's latency in the table: the sum over its Conv2d, Linear and BatchNorm2d calls."""
        shapes: list[tuple[nn.Module, tuple[int, ...]]] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, args: shapes.append((mod, tuple(args[0].shape))))
            for m in model.modules()
            if isinstance(m, _TIMED)
        ]
        with removing(hooks), eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
        before = self.measured
        total = sum(self.lookup(m, s, batch) for m, s in shapes)
        if self.measured > before:
            self.save()
        return total


def _fresh(layer: nn.Module) -> nn.Module:
    """A new layer of the same type and shape (random weights): timing never touches the model's."""
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
        )
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    return nn.BatchNorm2d(layer.num_features)


def latency_measure(
    input_shape: Sequence[int], batch: int = 64, table: LatencyTable | None = None
) -> Callable[[nn.Module], float]:
    """model -> milliseconds in this device's latency table at ``batch`` (the cost of a latency target)."""
    table = table or LatencyTable()
    return lambda model: table.model_ms(model, input_shape, batch)


def model_error(
    models: Sequence[nn.Module], input_shape: Sequence[int], batch: int = 64, table: LatencyTable | None = None
) -> list[dict[str, float]]:
    """Per model: table sum vs end-to-end median latency (ms) and the relative error of the table."""
    from .measure import measure_latency

    table = table or LatencyTable()
    out = []
    for m in models:
        predicted = table.model_ms(m, input_shape, batch)
        measured = measure_latency(m, input_shape, batch, warmup=3, repeats=10) * 1e3
        out.append({"table_ms": predicted, "measured_ms": measured, "relative_error": predicted / measured - 1})
    return out
