"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient
ConvNets", ICLR 2017): the data-free baseline of Bai et al. (AAAI 2020).

Structured: for each pruned layer of the plan (the same layers and kept
counts as :func:`crossdistill.compress.compress`), the input channels kept
are those whose *producer* filters have the largest L1 norm
``s_j = sum |W_producer[j, :, :, :]|`` (the producer is the layer whose
output channels the removal couples to, found by :class:`ChannelRemover`;
behind a concatenation each input channel has its own producer, e.g. the
two expand convs of a SqueezeNet fire module; :meth:`ChannelRemover.channel_sources`).
GhostNet's twin channels share one producer filter and go as one unit. Of a concatenation consumer
only the slices compress() prunes (``LayerPlan.channels``) compete; the
others are kept.
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
from ..plan import LayerPlan
from ..pruning import apply_mask
from ..run import CompressReport, LayerRecord
from ..solvers import select_channels, select_units, weight_mask
from .common import Run, finish, resolve_configs, start

__all__ = [
    "L1Config",
    "l1_prune",
    "prune_l1",
    "producer_of",
    "filter_l1_keep",
    "l1_input_keep",
]


@dataclass
class L1Config:
    """L1-norm pruning has no hyperparameters beyond the compression config (layers, keep ratio)."""


def producer_of(run: Run, name: str) -> str:
    """The layer whose output channels are removed with the input channels of ``name`` (one producer)."""
    assert run.remover is not None
    _ins, outs = run.remover.coupled_layers(run.student.get_submodule(name))
    if len(outs) != 1:
        raise RuntimeError(f"layer {name} has {len(outs)} producers; use ChannelRemover.channel_sources")
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


def l1_input_keep(run: Run, p: LayerPlan) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Kept input channels of planned layer ``p`` (sorted; ``p.n_keep`` of them) by their producers' filter
    L1 norms, and per producer the kept output filters. Channels outside ``p.channels`` are always kept."""
    assert run.remover is not None
    layer = run.student.get_submodule(p.name)
    total = layer.weight.shape[1]
    every: list[tuple[int, str, int]] = []
    sources = run.remover.channel_sources(p.name, every)
    free = list(range(total)) if p.channels is None else list(p.channels)
    norms = torch.tensor([_filter_norm(run, *sources[j]) for j in free])
    n_free = p.n_keep(total) - (total - len(free))
    ties = run.remover.channel_ties(p.name)
    if ties is not None:  # tied channels (GhostNet twins) share their filter: kept or removed as one unit
        chosen = set(select_units(torch.tensor(free), norms, n_free, ties).tolist())
    else:
        chosen = {free[i] for i in norms.topk(n_free).indices.tolist()}
        chosen = _each_producer_keeps_one(chosen, dict(zip(free, norms.tolist(), strict=True)), sources)
    kept = sorted(set(range(total)) - set(free) | chosen)
    per_producer: dict[str, list[int]] = {}
    kept_set = set(kept)
    for j, prod, i in every:
        if j in kept_set:
            per_producer.setdefault(prod, []).append(i)
    return torch.tensor(kept), per_producer


def _each_producer_keeps_one(
    chosen: set[int], score: dict[int, float], sources: dict[int, tuple[str, int]]
) -> set[int]:
    """Swap channels so no producer loses every filter (a SqueezeNet fire module: the 3x3 expand filters have
    larger norms than all 1x1 ones); each swap gives up the weakest channel of a producer that keeps several."""
    producers = {sources[j][0] for j in score if j in sources}
    chosen = set(chosen)
    for prod in sorted(producers):
        mine = [j for j in score if sources.get(j, ("",))[0] == prod]
        if any(j in chosen for j in mine):
            continue
        counts: dict[str, int] = {}
        for j in chosen:
            counts[sources[j][0]] = counts.get(sources[j][0], 0) + 1
        spare = [j for j in chosen if counts[sources[j][0]] > 1]
        if not spare:
            break  # fewer kept channels than producers: the removal refuses with its own message
        chosen.discard(min(spare, key=lambda j: score[j]))
        chosen.add(max(mine, key=lambda j: score[j]))
    return chosen


def _per_producer(sources: dict[int, tuple[str, int]], kept: torch.Tensor) -> dict[str, list[int]]:
    """Per producer, the output filters feeding the ``kept`` input channels."""
    out: dict[str, list[int]] = {}
    for j in kept.tolist():
        if j in sources:
            producer, i = sources[j]
            out.setdefault(producer, []).append(i)
    return out


def _filter_norm(run: Run, producer: str, i: int) -> float:
    return float(run.student.get_submodule(producer).weight.detach()[i].abs().sum())


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
            total = run.student.get_submodule(p.name).weight.shape[1]
            sources = run.remover.channel_sources(p.name)  # input channel -> (producer, its filter)
            groups = run.remover.channel_groups(p.name)
            if groups is not None:  # a grouped producer: the same share of each of its groups
                free = range(total) if p.channels is None else p.channels
                idx = input_l1_keep(run, {j: sources[j] for j in free}, p.n_keep(total), groups)
                per_producer = _per_producer(sources, idx)
            else:
                idx, per_producer = l1_input_keep(run, p)
            chosen.append((p.name, sources, per_producer, idx, total, time.perf_counter() - t0))
        for name, sources, per_producer, idx, total, seconds in chosen:
            t0 = time.perf_counter()
            reached = run.remover.remove_input_channels(name, idx)  # may keep one channel more: no empty layer
            if len(reached) != len(idx):
                per_producer = _per_producer(sources, reached)
            for producer, filters in per_producer.items():
                kept[producer] = torch.tensor(sorted(set(filters)))
            seconds += time.perf_counter() - t0
            record = LayerRecord(name, len(reached), total, 0.0, 0.0, seconds, kept_channels=reached.tolist())
            run.records.append(record)
    else:
        for p in run.plan:
            t0 = time.perf_counter()
            layer = run.student.get_submodule(p.name)
            n_keep = p.n_keep(layer.weight.numel())
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
