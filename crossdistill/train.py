"""Teacher training: SGD + Nesterov momentum, one-cycle learning rate, crop/flip augmentation.

Resumable: a ``<out>.resume.pt`` file holding model, optimiser, scheduler and
RNG state is written atomically after every epoch and removed at the end. It is
read with ``torch.load(weights_only=True)`` (tensors and plain containers only:
a planted pickle runs no code), must have been written for the same recipe
(model, data set, epochs, lr, batch size, seed...), and a corrupt one is moved
aside (``.corrupt``) with a one-line error, so the next run starts over.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .checks import check_model_finite, check_output_file, check_positive
from .data import augment, dataset_info, load_dataset, normalize
from .errors import UserError
from .evaluate import accuracy
from .files import atomic_write
from .models import get_model
from .outdir import kill_point
from .progress import progress

__all__ = ["TrainConfig", "train_teacher", "accuracy"]  # accuracy: evaluate.accuracy, re-exported


@dataclass
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_frac: float = 0.15  # fraction of steps spent rising to the peak lr
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    fp16_storage: bool = False  # store weights as float16 on disk (VGG-16: 60 MB -> 30 MB)


# recipe fields a resume file must share with the command that continues it
_RESUME_KEYS = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "warmup_frac",
    "seed",
)


def check_train_config(cfg: TrainConfig) -> None:
    """Option ranges, checked before any data is read (CLI spellings in the messages)."""
    for flag, v, integer in (
        ("--epochs", cfg.epochs, True),
        ("--batch-size", cfg.batch_size, True),
        ("--lr", cfg.lr, False),
    ):
        check_positive(flag, v, integer=integer, allow_none=False)
    try:
        get_model(cfg.model, 10, 1)  # an unknown model name fails here, before the data set is loaded
    except ValueError as e:
        raise UserError(f"--model: {e}") from e


def _load_resume(resume: Path, cfg: TrainConfig) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol": noise, weights_only is safe either way
            warnings.simplefilter("ignore")
            st = torch.load(resume, map_location="cpu", weights_only=True)
        recipe = st["recipe"]
        _ = st["model"], st["opt"], st["sched"], st["gen"], st["epoch"], st["elapsed"]
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, planted or foreign: never run, never crash
        aside = resume.with_name(resume.name + ".corrupt")
        os.replace(resume, aside)
        raise UserError(
            f"resume file {resume} is unreadable or not ours ({type(e).__name__}); moved it to {aside.name}: "
            "rerun the command to start over"
        ) from e
    diff = [k for k in _RESUME_KEYS if recipe.get(k) != getattr(cfg, k)]
    if diff:
        pairs = ", ".join(f"--{k.replace('_', '-')} {recipe.get(k)} (now {getattr(cfg, k)})" for k in diff)
        raise UserError(
            f"resume file {resume} was written with {pairs}; rerun with those options, or delete it to start over"
        )
    return st


def train_teacher(
    cfg: TrainConfig, out: str | Path, data_dir: str | Path | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and save it as ``out`` (.safetensors + .json).

    An existing ``out`` (or a path among the shipped teachers) is refused unless ``overwrite``.
    """
    out = Path(out)
    check_train_config(cfg)
    check_output_file(out, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = dataset_info(cfg.dataset)
    train, test = load_dataset(info.name, "train", data_dir), load_dataset(info.name, "test", data_dir)
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model, info.num_classes, info.in_channels).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images)")
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup_frac
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, elapsed = 0, 0.0
    resume = out.with_suffix(".resume.pt")
    if resume.exists():
        st = _load_resume(resume, cfg)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        start_epoch, elapsed = st["epoch"], st["elapsed"]
        print(f"resuming {out.name} at epoch {start_epoch}/{cfg.epochs}")
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        perm = torch.randperm(len(train), generator=gen)
        total_loss = 0.0
        with progress() as bar:
            task = bar.add_task(f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch)
            for step in range(steps_per_epoch):
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = augment(normalize(train.images[idx], info), info.pad, gen)
                x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):  # nothing non-finite is saved, and the last good epoch stays
                    raise UserError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                        "lower --lr (the resume file keeps the last good epoch)"
                    )
                if step == steps_per_epoch // 2:
                    kill_point(f"train-epoch-{epoch + 1}-mid")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item()
                desc = f"{cfg.model} epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}"
                bar.update(task, advance=1, description=desc)
        elapsed += time.time() - t0
        print(f"epoch {epoch + 1}: mean loss {total_loss / steps_per_epoch:.4f}, {elapsed:.0f}s so far", flush=True)
        state = {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "gen": gen.get_state(),
            "epoch": epoch + 1,
            "elapsed": elapsed,
            "recipe": asdict(cfg),
        }
        atomic_write(resume, lambda tmp, state=state: torch.save(state, tmp))
        kill_point(f"train-epoch-{epoch + 1}")
    model = model.to(memory_format=torch.contiguous_format)
    kill_point("train-before-save")
    check_model_finite(model, f"{cfg.model} after training")
    acc = accuracy(model, test.images, test.labels, info)
    meta = {
        "model": cfg.model,
        "dataset": info.name,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "test_accuracy": acc,
        "train_time_s": round(elapsed, 1),
        "recipe": asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    meta = save_checkpoint(model, out, meta, dtype=torch.float16 if cfg.fp16_storage else None)
    resume.unlink(missing_ok=True)
    return meta
