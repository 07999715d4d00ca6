"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient
ConvNets", ICLR 2017): the data-free baseline of Bai et al. (AAAI 2020).

Structured: for each pruned layer of the plan (the same layers and kept
counts as :func:`crossdistill.compress.compress`), the input channels kept
are those whose *producer* filters have the largest L1 norm
``s_j = sum |W_producer[j, :, :, :]|`` (the producer is the layer whose
output channels the removal couples to, found by :class:`ChannelRemover`).
The kept channels are then removed physically: the consumer's input slices,
the producer's filters and their BatchNorm entries.

Unstructured: per-layer weight magnitude, keep the top ``keep_count(numel,
keep)`` weights of each planned layer, zero the rest (Han et al. 2015 style;
Li et al. prune only filters).

Choices the paper leaves open:

- *Independent* strategy (Li et al. section 3.3): every layer's filters are
  ranked on the teacher's weights, not on weights already changed by the
  pruning of earlier layers. For ResNets this prunes the first conv of each
  block (the producer of the planned consumer), as Li et al. do; the
  sensitive blocks skipped are the plan's (``prune_skip``).
- No data, no retraining: BN statistics are the teacher's (set
  ``recalibrate_bn`` in the config to re-estimate them on the images).
- The images are used only for tracing, checks and the report. The layer
  records carry ``loss_before = loss_after = 0`` (no objective is optimised).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..plan import keep_count
from ..pruning import apply_mask
from ..run import CompressReport, LayerRecord
from ..solvers import select_channels, weight_mask
from .common import Run, finish, resolve_configs, start

__all__ = ["L1Config", "l1_prune", "prune_l1", "producer_of", "filter_l1_keep"]


@dataclass
class L1Config:
    """L1-norm pruning has no hyperparameters beyond the compression config (layers, keep ratio)."""


def producer_of(run: Run, name: str) -> str:
    """The layer whose output channels are removed with the input channels of ``name``."""
    assert run.remover is not None
    _ins, outs = run.remover.coupled_layers(run.student.get_submodule(name))
    if len(outs) != 1:
        raise RuntimeError(f"layer {name} has {len(outs)} producers; the plan should only hold prunable layers")
    return outs[0]


def filter_l1_keep(producer: nn.Module, n_keep: int) -> torch.Tensor:
    """Indices (sorted) of the ``n_keep`` output filters of ``producer`` with the largest L1 norm."""
    norms = producer.weight.detach().flatten(1).abs().sum(1)  # (C_out,)
    return norms.topk(n_keep).indices.sort().values


def input_l1_keep(
    run: Run, sources: dict[int, tuple[str, int]], n_keep: int, groups: torch.Tensor | None
) -> torch.Tensor:
    """The ``n_keep`` input channels whose producing filters have the largest L1 norms (each channel's
    own producer), the same share of each group when a producer is a grouped conv."""
    channels = torch.tensor(sorted(sources))
    norms = torch.stack(
        [run.student.get_submodule(sources[j][0]).weight.detach()[sources[j][1]].abs().sum() for j in sources]
    )
    return select_channels(channels, norms, n_keep, groups, n_keep).sort().values


def prune_l1(run: Run) -> dict[str, torch.Tensor]:
    """Prune ``run.student`` in place by L1 norm and append one record per layer.

    Returns, structured: producer name -> kept output-channel indices in the
    teacher's numbering (kept channel i of the student is teacher channel
    ``kept[i]``); unstructured: layer name -> boolean weight mask.
    """
    kept: dict[str, torch.Tensor] = {}
    if run.structured:
        # rank every producer on the teacher's weights first (independent strategy), then remove
        chosen = []
        for p in run.plan:
            t0 = time.perf_counter()
            layer = run.student.get_submodule(p.name)
            total = layer.weight.shape[1]
            n_keep = keep_count(total, p.keep)
            sources = run.remover.channel_sources(p.name)
            producers = sorted({src for src, _o in sources.values()})
            groups = run.remover.channel_groups(p.name)
            if len(producers) == 1 and groups is None:
                producer = producer_of(run, p.name)
                idx = filter_l1_keep(run.student.get_submodule(producer), n_keep)
            else:  # a concat of several producers (fire, inception) or a grouped producer: rank channels
                idx = input_l1_keep(run, sources, n_keep, groups)
            chosen.append((p.name, idx, n_keep, total, time.perf_counter() - t0))
        for name, idx, _n_keep, total, seconds in chosen:
            t0 = time.perf_counter()
            sources = run.remover.channel_sources(name)
            idx = run.remover.remove_input_channels(name, idx)  # may keep one channel more: no empty layer
            for producer in sorted({src for src, _o in sources.values()}):
                kept[producer] = torch.tensor(
                    sorted(o for j, (src, o) in sources.items() if src == producer and j in set(idx.tolist()))
                )
            seconds += time.perf_counter() - t0
            run.records.append(LayerRecord(name, len(idx), total, 0.0, 0.0, seconds))
    else:
        for p in run.plan:
            t0 = time.perf_counter()
            layer = run.student.get_submodule(p.name)
            n_keep = keep_count(layer.weight.numel(), p.keep)
            mask = weight_mask(layer.weight.detach(), None, n_keep, "magnitude")
            apply_mask(layer, mask)
            kept[p.name] = mask
            run.records.append(LayerRecord(p.name, n_keep, mask.numel(), 0.0, 0.0, time.perf_counter() - t0))
    return kept


def l1_prune(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: L1Config | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """L1-norm pruning of ``teacher`` to the plan of ``config``; ``images`` only trace the model."""
    cfg, hp = resolve_configs(config, params, L1Config, overrides)
    run = start("l1", teacher, images, labels, cfg)
    prune_l1(run)
    return finish(run, hp)
