"""Measure a model: accuracy, size, FLOPs and CPU latency, and show teacher vs student side by side.

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
  convolution's and linear layer's share multiplied by the fraction of its
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
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import load_checkpoint
from .checks import check_model
from .data import Split, dataset_info, load_dataset
from .errors import UserError
from .train import accuracy as _accuracy

__all__ = [
    "EvalReport", "count_params", "count_nonzero_params", "count_flops", "count_sparse_flops",
    "measure_latency", "measure_latency_pair", "checkpoint_size", "state_dict_size", "evaluate", "evaluate_checkpoint",
    "render_table",
]  # fmt: skip


# --------------------------------------------------------------------------- helpers


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm must not update its statistics while measured), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a batch of 1 image of ``input_shape`` (C, H, W).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: a multiply-add
    is 2 FLOPs, and only convolutions and matrix products are counted. Layers
    whose channels were physically removed cost proportionally less.
    """
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(_example(model, input_shape))
    return int(counter.get_total_flops())


def _layer_flops(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """FLOPs of one Conv/Linear call, with the same formula as FlopCounterMode (2 per MAC, no bias)."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return 2 * out.numel() * m.in_features
    if m.transposed:  # ConvTransposeNd: every input pixel meets every filter tap
        return 2 * inp.numel() * prod(w.shape[1:])
    return 2 * out.numel() * prod(w.shape[1:])


def count_sparse_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs as :func:`count_flops`, with each Conv/Linear layer's FLOPs multiplied by its weight density.

    Density is the fraction of the layer's weights that are nonzero, so a layer
    with half its weights zeroed counts half its FLOPs: what a sparse kernel
    skipping zero weights would compute. Work outside Conv/Linear layers (if
    any is counted) is kept as is. For a dense model this equals ``count_flops``.
    """
    saved: list[float] = []  # FLOPs each layer call would save by skipping zeros

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        w = m.weight.detach()
        density = torch.count_nonzero(w).item() / max(w.numel(), 1)
        saved.append(_layer_flops(m, args[0], out) * (1.0 - density))

    layers = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    try:
        total = count_flops(model, input_shape)
    finally:
        for h in handles:
            h.remove()
    return int(round(total - sum(saved)))


def _median_times(models: Sequence[nn.Module], x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Median seconds of one forward pass of each model on ``x``, the models timed in turn, pass by pass."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack, torch.inference_mode():
        for m in models:
            stack.enter_context(_eval_mode(m))
        for _ in range(warmup):
            for m in models:
                m(x)
        for _ in range(repeats):
            for m, ts in zip(models, times, strict=True):
                t0 = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t0)
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


def checkpoint_size(path: str | Path) -> int:
    """Bytes of a safetensors weights file on disk (the JSON sidecar is not included)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    return path.stat().st_size


def state_dict_size(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes that ``model``'s state dict takes as a safetensors file (written to a temporary file).

    ``dtype`` (e.g. ``torch.float16``) casts floating-point tensors as
    :func:`crossdistill.checkpoint.save_checkpoint` does for fp16 storage.
    """
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)


# --------------------------------------------------------------------------- reports


@dataclass
class EvalReport:
    """Everything measured about one model. ``accuracy`` is a fraction in [0, 1] (None: not measured)."""

    accuracy: float | None
    test_images: int
    params: int
    nonzero_params: int
    flops: int  # FlopCounterMode FLOPs (2 per multiply-add), batch 1
    sparse_flops: int  # flops with each Conv/Linear scaled by its weight density
    size_bytes: int  # safetensors file size
    latency_b1_ms: float | None
    latency_b64_ms: float | None
    threads: int  # torch intra-op threads the latency was measured with
    input_shape: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def evaluate(
    model: nn.Module,
    dataset: str | None = None,
    split: Split | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    input_shape: Sequence[int] | None = None,
    latency: bool = True,
    repeats: int = 20,
    size_bytes: int | None = None,
) -> EvalReport:
    """Measure ``model``: top-1 accuracy, parameters, FLOPs, size and CPU latency.

    Accuracy is taken on ``split`` if given, else on the full test split of
    ``dataset`` (or its first ``limit`` images), normalised with ``dataset``'s
    mean/std. Images labelled -1 (unlabelled folders) are left out of the
    accuracy. The input shape for FLOPs and latency is ``input_shape`` if given,
    else that of the split's images, else the data set's (1x28x28 for
    Fashion-MNIST). ``size_bytes`` defaults to the state dict's safetensors size.
    """
    check_model(model)  # NaN/inf in weights or BN statistics would be measured as a model
    info = dataset_info(dataset) if dataset is not None else None
    if split is not None and info is None:
        raise UserError("evaluate() needs dataset= to normalise the split with its mean/std")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 image, got {limit}")
    if split is None and info is not None:
        split = load_dataset(info.name, "test", data_dir)
    if split is not None and limit is not None:
        split = Split(split.images[:limit], split.labels[:limit])
    if input_shape is None:
        if split is not None:
            input_shape = tuple(split.images.shape[1:])
        elif info is not None:
            input_shape = (info.in_channels, info.size, info.size)
        else:
            raise UserError("evaluate() needs dataset=, split= or input_shape= to know the input size")
    input_shape = tuple(int(s) for s in input_shape)

    try:
        flops = count_flops(model, input_shape)
    except RuntimeError as e:
        raise UserError(
            f"the model cannot run on inputs of shape {input_shape} ({str(e).splitlines()[0]}); "
            "it was built for another data set"
        ) from e
    sparse_flops = count_sparse_flops(model, input_shape)

    acc, n_test = None, 0
    if split is not None:
        labelled = split.labels >= 0
        images, labels = split.images[labelled], split.labels[labelled]
        n_test = len(labels)
        if n_test:
            acc = _accuracy(model, images, labels, info)

    b1 = b64 = None
    if latency:
        b1 = measure_latency(model, input_shape, 1, repeats=repeats) * 1e3
        b64 = measure_latency(model, input_shape, 64, warmup=2, repeats=repeats) * 1e3

    return EvalReport(
        accuracy=acc,
        test_images=n_test,
        params=count_params(model),
        nonzero_params=count_nonzero_params(model),
        flops=flops,
        sparse_flops=sparse_flops,
        size_bytes=state_dict_size(model) if size_bytes is None else size_bytes,
        latency_b1_ms=b1,
        latency_b64_ms=b64,
        threads=torch.get_num_threads(),
        input_shape=input_shape,
    )


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    split: Split | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    latency: bool = True,
    repeats: int = 20,
    verify: bool = True,
    model_file: str | None = None,
    trust_model_file: bool = False,
) -> tuple[EvalReport, dict[str, Any]]:
    """Load a checkpoint (sha256-verified) and :func:`evaluate` it; size is the weights file on disk.

    ``dataset`` defaults to the one recorded in the checkpoint's metadata.
    ``model_file`` / ``trust_model_file``: see :func:`load_checkpoint` (a user's model file).
    Returns ``(report, meta)``.
    """
    model, meta = load_checkpoint(path, verify=verify, model_file=model_file, trust_model_file=trust_model_file)
    report = evaluate(
        model, dataset or meta.get("dataset"), split, data_dir, limit,
        latency=latency, repeats=repeats, size_bytes=checkpoint_size(path),
        input_shape=meta.get("input_shape"),  # a student of a user's model has no data set, but this
    )  # fmt: skip
    return report, meta


# --------------------------------------------------------------------------- display


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _fmt_flops(n: int) -> str:
    return f"{n / 1e9:.2f} GFLOPs" if n >= 1e9 else f"{n / 1e6:.2f} MFLOPs"


def _fmt_bytes(n: int) -> str:  # decimal units: 1 KB = 1000 bytes
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


_ROWS: list[tuple[str, str, Any, bool]] = [  # label, field, formatter, show ratio to the first column
    ("Top-1 accuracy", "accuracy", lambda a: "-" if a is None else f"{100 * a:.2f} %", False),
    ("Test images", "test_images", lambda n: f"{n:,}", False),
    ("Parameters", "params", _fmt_count, True),
    ("Nonzero parameters", "nonzero_params", _fmt_count, True),
    ("FLOPs (2/MAC, batch 1)", "flops", _fmt_flops, True),
    ("Sparse FLOPs", "sparse_flops", _fmt_flops, True),
    ("Size on disk", "size_bytes", _fmt_bytes, True),
    ("Latency batch 1", "latency_b1_ms", _fmt_ms, True),
    ("Latency batch 64", "latency_b64_ms", _fmt_ms, True),
    ("CPU threads", "threads", str, False),
]


def render_table(reports: dict[str, EvalReport], title: str | None = None) -> Table:
    """A rich table with one column per model (e.g. ``{"teacher": ..., "student": ...}``) and one row per metric.

    From the second column on, size and speed figures also show their
    percentage of the first column's value (e.g. a student against its teacher).
    """
    table = Table(title=title)
    table.add_column("metric", style="bold")
    names = list(reports)
    for name in names:
        table.add_column(name, justify="right")
    first = reports[names[0]] if names else None
    for label, key, fmt, ratio in _ROWS:
        cells = []
        for name in names:
            value = getattr(reports[name], key)
            text = fmt(value)
            base = getattr(first, key)
            if ratio and reports[name] is not first and value is not None and base:
                text += f" ({100 * value / base:.0f}%)"
            cells.append(text)
        table.add_row(label, *cells)
    return table
