"""Evaluate a model: top-1 accuracy plus the counts of :mod:`crossdistill.measure`, as one report.

``accuracy`` is the package's one accuracy function (teacher training, the
CLI, the benchmarks and :func:`evaluate` all use it). The counting and timing
helpers live in :mod:`crossdistill.measure` (re-exported here for old import
paths); the table the CLI prints is built in :mod:`crossdistill.cli`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import eval_mode
from .checkpoint import load_checkpoint
from .checks import check_model
from .data import DatasetInfo, Split, dataset_info, load_dataset, normalize
from .errors import UserError
from .measure import (
    checkpoint_size,
    count_flops,
    count_nonzero_params,
    count_params,
    count_sparse_flops,
    measure_latency,
    measure_latency_pair,
    state_dict_size,
)

__all__ = [
    "EvalReport",
    "EvalOptions",
    "accuracy",
    "evaluate",
    "evaluate_checkpoint",
    # re-exported from measure.py
    "count_params",
    "count_nonzero_params",
    "count_flops",
    "count_sparse_flops",
    "measure_latency",
    "measure_latency_pair",
    "checkpoint_size",
    "state_dict_size",
]


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo | None = None, batch_size: int = 500
) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode; images labelled -1 (unlabelled) are left out.

    ``images``: uint8 (N, C, H, W) normalised here with ``info``'s mean/std, or
    floats already normalised when ``info`` is None. Batches go to the model's
    device; the model's train/eval mode is restored afterwards.
    """
    labelled = labels >= 0
    if not bool(labelled.all()):
        images, labels = images[labelled], labels[labelled]
    if len(labels) == 0:
        raise UserError("no labelled images to measure accuracy on; give one sub-folder per class")
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for i in range(0, len(labels), batch_size):
            x = images[i : i + batch_size]
            x = normalize(x, info) if info is not None else x
            correct += (model(x.to(device)).argmax(1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
    return correct / len(labels)


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


@dataclass
class EvalOptions:
    """How :func:`evaluate` measures; every field can also be passed to it as a keyword."""

    data_dir: str | Path | None = None  # folder holding the data set files
    limit: int | None = None  # evaluate on the first N test images only
    input_shape: Sequence[int] | None = None  # (C, H, W) for FLOPs and latency; default: the images'
    latency: bool = True  # measure CPU latency at batch 1 and 64
    repeats: int = 20  # timed passes per latency
    size_bytes: int | None = None  # default: the state dict's safetensors size


def _options(options: EvalOptions | None, settings: dict[str, Any]) -> EvalOptions:
    opts = EvalOptions(**asdict(options)) if options is not None else EvalOptions()
    known = {f.name for f in fields(EvalOptions)}
    for k, v in settings.items():
        if k not in known:
            raise UserError(f"unknown evaluation setting {k!r}; choose from {', '.join(sorted(known))}")
        setattr(opts, k, v)
    return opts


def evaluate(
    model: nn.Module,
    dataset: str | None = None,
    split: Split | None = None,
    options: EvalOptions | None = None,
    **settings: Any,
) -> EvalReport:
    """Measure ``model``: top-1 accuracy, parameters, FLOPs, size and CPU latency.

    Accuracy is taken on ``split`` if given, else on the full test split of
    ``dataset`` (or its first ``limit`` images), normalised with ``dataset``'s
    mean/std. Images labelled -1 (unlabelled folders) are left out of the
    accuracy. The input shape for FLOPs and latency is ``input_shape`` if given,
    else that of the split's images, else the data set's (1x28x28 for
    Fashion-MNIST). ``size_bytes`` defaults to the state dict's safetensors size.
    Keywords (``limit=``, ``latency=``, ``data_dir=`` ...) set :class:`EvalOptions` fields.
    """
    opts = _options(options, settings)
    check_model(model)  # NaN/inf in weights or BN statistics would be measured as a model
    info = dataset_info(dataset) if dataset is not None else None
    if split is not None and info is None:
        raise UserError("evaluate() needs dataset= to normalise the split with its mean/std")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"limit must be at least 1 image, got {opts.limit}")
    if split is None and info is not None:
        split = load_dataset(info.name, "test", opts.data_dir)
    if split is not None and opts.limit is not None:
        split = Split(split.images[: opts.limit], split.labels[: opts.limit])
    input_shape = opts.input_shape
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
        n_test = int((split.labels >= 0).sum())
        if n_test:
            acc = accuracy(model, split.images, split.labels, info)

    b1 = b64 = None
    if opts.latency:
        b1 = measure_latency(model, input_shape, 1, repeats=opts.repeats) * 1e3
        b64 = measure_latency(model, input_shape, 64, warmup=2, repeats=opts.repeats) * 1e3

    return EvalReport(
        accuracy=acc,
        test_images=n_test,
        params=count_params(model),
        nonzero_params=count_nonzero_params(model),
        flops=flops,
        sparse_flops=sparse_flops,
        size_bytes=state_dict_size(model) if opts.size_bytes is None else opts.size_bytes,
        latency_b1_ms=b1,
        latency_b64_ms=b64,
        threads=torch.get_num_threads(),
        input_shape=input_shape,
    )


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    split: Split | None = None,
    verify: bool = True,
    model_file: str | None = None,
    **settings: Any,
) -> tuple[EvalReport, dict[str, Any]]:
    """Load a checkpoint (sha256-verified) and :func:`evaluate` it; size is the weights file on disk.

    ``dataset`` defaults to the one recorded in the checkpoint's metadata;
    ``model_file`` / ``trust_model_file=True``: see :func:`load_checkpoint` (a user's model file);
    other keywords set :class:`EvalOptions` fields. Returns ``(report, meta)``.
    """
    trust = bool(settings.pop("trust_model_file", False))
    model, meta = load_checkpoint(path, verify=verify, model_file=model_file, trust_model_file=trust)
    opts = _options(None, settings)
    opts.size_bytes = checkpoint_size(path)
    if opts.input_shape is None and meta.get("input_shape"):  # a user model's student has no data set
        opts.input_shape = meta["input_shape"]
    return evaluate(model, dataset or meta.get("dataset"), split, opts), meta
