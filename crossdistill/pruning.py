"""Physical channel removal (torch-pruning's dependency graph) and weight masks.

Removing input channel j of a layer removes output channel j of the layer
that produces it, with its BatchNorm entry; torch-pruning's
``DependencyGraph`` finds that coupled group. :meth:`ChannelRemover.prunable_channels`
decides channel by channel: input channel j of a layer is *removable* when
its group touches the input channels of that layer alone and the output
channels of exactly one producer (a Conv2d with groups=1 or a Linear), with
a one-to-one channel mapping. Depthwise convs (groups = in = out) and
elementwise ops (BN, activations, pooling) between producer and consumer
are pass-throughs: their channels go with the producer's (MobileNetV2: the
project 1x1's inputs remove the expand 1x1's outputs and the depthwise
channels). Channels are *not* removable when they also feed another layer
(a residual sum, a dense concatenation reused later, the model output),
come from two producers (a residual sum), from a grouped (non-depthwise)
conv, from no layer (the input image), or through a flatten of a spatial map.
A layer whose every input channel is removable is *independently prunable*
(VGG convs 2-13, the inner conv of a residual block, a bottleneck); a
concatenation consumer is *partly prunable*: only the slices of producers
that feed it alone can go.

*Tied* channels: two input channels of one layer that share a producer filter (a GhostNet ghost module
concatenates a primary conv's outputs with a depthwise copy of them: input j and input j + C/2 both come
from primary filter j). Removing one removes the other, so they are chosen and counted together, as one
*unit* (:meth:`ChannelRemover.channel_ties`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from .errors import UserError

__all__ = ["ChannelRemover", "apply_mask", "sparsity", "is_depthwise"]

_PARAM_LAYERS = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def is_depthwise(layer: nn.Module) -> bool:
    """A conv with one filter per input channel (groups = in = out): channels pass straight through."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


@contextmanager
def _reshape_guard(mapped: bool = False) -> Iterator[None]:
    """torch-pruning 1.6 divides by an inferred channel count of 0 at some reshapes (torchvision's
    ShuffleNetV2: the channel shuffle after a split), while tracing and again in every
    ``get_pruning_group``, and aborts. Inside this block such a reshape is left without an index map instead
    (:meth:`ChannelRemover.prunable_channels` refuses channels that pass a reshape between convs anyway).
    torch-pruning's function is swapped only for the duration of our own call and restored on exit, so other
    users of torch-pruning in the process see it unchanged (not thread-safe against a concurrent trace).

    ``mapped``: the graph's index maps are up to date for the model as it is (:meth:`ChannelRemover.pruning_group`
    knows): ``get_pruning_group`` then skips re-deriving every map of the graph (a walk back from each
    reshape and concatenation), which it otherwise does on every call."""
    original = index_mapping.update_reshape_index_mapping
    update_all = index_mapping.update_index_mapping

    def guarded(graph, node):  # noqa: ANN001, ANN202 - torch-pruning's own signature
        try:
            return original(graph, node)
        except ZeroDivisionError:
            return None

    index_mapping.update_reshape_index_mapping = guarded
    if mapped:
        index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping.update_index_mapping = update_all


class ChannelRemover:
    """Dependency graph of ``model`` for removing input channels of chosen layers."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        # the graph is traced through autograd: frozen weights (a teacher copy) must take part while it is built
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            with torch.enable_grad(), _reshape_guard():
                self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as e:  # torch-pruning raises many types while tracing unknown models
            raise UserError(f"could not trace the model to find coupled channels ({e}); check the model runs") from e
        finally:
            for p in frozen:
                p.requires_grad_(False)
        self.names = {m: n for n, m in model.named_modules()}
        # groups already walked, valid while every parameter keeps its shape (see pruning_group)
        self._walked: dict[tuple, tp.Group] = {}
        self._owners = [m for m in model.modules() if m._parameters]  # modules holding parameters directly
        # the parameter shapes the graph's index maps were last derived for (build_dependency derives them)
        self._shapes: tuple | None = self._param_shapes()
        self._groups: dict[str, list[int]] = {}
        self._ties: dict[str, dict[int, int]] = {}  # layer -> {twin input channel: the channel it is tied to}
        self._shared: set[str] = set()

    def _param_shapes(self) -> tuple:
        # every parameter, read from its module each time: a removal replaces a module's parameter objects
        return tuple(p.shape for m in self._owners for p in m._parameters.values() if p is not None)

    def _group(self, layer: nn.Module, idxs: list[int]) -> tp.Group:
        fn = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
        return self.pruning_group(layer, fn, idxs)

    def pruning_group(self, layer: nn.Module, fn: Callable[..., Any], idxs: list[int]) -> tp.Group:
        """torch-pruning's group of ``fn`` (e.g. ``tp.prune_conv_out_channels``) on channels ``idxs`` of
        ``layer``, with the reshape guard (every caller goes through here, never ``graph.get_pruning_group``).

        Walked once per model state: a group and the graph's index maps depend only on the graph and the
        channel counts, so both are kept while every parameter of the model keeps its shape (a re-fit writes
        weights in place and keeps them; removing channels, here or by anyone, changes a shape and drops
        them). The same planning questions (prunable channels, touched modules, the channels about to go)
        then cost one walk each per compression. Callers read the group, or prune it (which changes the
        shapes); they do not modify it."""
        shapes = self._param_shapes()
        if shapes != self._shapes:
            self._walked.clear()
        key = (layer, fn, tuple(int(i) for i in idxs))
        group = self._walked.get(key)
        if group is None:
            with _reshape_guard(mapped=shapes == self._shapes):
                group = self.graph.get_pruning_group(layer, fn, idxs=list(idxs))
            self._shapes = shapes  # get_pruning_group re-derived the index maps (or they were current)
            self._walked[key] = group
        return group

    def coupled_layers(self, layer: nn.Module) -> tuple[list[str], list[str]]:
        """(layers whose input channels change, layers whose output channels change) if input channel 0 of
        ``layer`` goes. Depthwise convs in between are pass-throughs and not listed."""
        ins, outs = [], []
        for item in self._group(layer, [0]):
            mod, handler = item.dep.target.module, item.dep.handler
            if not isinstance(mod, _PARAM_LAYERS) or is_depthwise(mod):
                continue
            if self.graph.is_out_channel_pruning_fn(handler):
                outs.append(self.names.get(mod, "?"))
            elif self.graph.is_in_channel_pruning_fn(handler):
                ins.append(self.names.get(mod, "?"))
        return sorted(set(ins)), sorted(set(outs))

    def touched_modules(self, name: str, channels: list[int] | None = None) -> list[str]:
        """Names of the modules whose parameters change when input ``channels`` of ``name`` go (all if None):
        the layer, the producers, and the BN / depthwise layers in between."""
        layer = self.model.get_submodule(name)
        idxs = list(range(layer.weight.shape[1])) if channels is None else list(channels)
        out = {name}
        for item in self._group(layer, idxs):
            mod = item.dep.target.module
            if isinstance(mod, nn.Module) and mod in self.names:
                out.add(self.names[mod])
        return sorted(out)

    def prunable_channels(self, name: str, frozen: set[str] | frozenset[str] = frozenset()) -> list[int]:
        """Input channels of layer ``name`` that can be removed with their producer alone (module docstring).

        ``frozen``: names of layers whose output channels must not change (layers left untouched)."""
        layer = self.model.get_submodule(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or getattr(layer, "groups", 1) != 1:
            return []
        if name in self._shared:  # every input channel also feeds another layer (seen in an earlier group)
            self._groups[name], self._ties[name] = [], {}
            return []
        c_in = layer.weight.shape[1]
        if self._every_channel_shared(layer, c_in):
            self._groups[name], self._ties[name] = [], {}
            return []
        covered: dict[nn.Module, set[int]] = {}  # other consumers -> their input channels shared with ``layer``
        producers = [0] * c_in
        blocked = [False] * c_in
        producer_width = 0
        reshaped = False
        groups = [-1] * c_in  # group of the grouped producer each channel comes from (-1: not grouped)
        try:
            group = self._group(layer, list(range(c_in)))
        except (IndexError, ZeroDivisionError, KeyError):  # torch-pruning cannot follow these channels
            self._groups[name], self._ties[name] = [], {}
            return []
        for item in group:
            mod, handler = item.dep.target.module, item.dep.handler
            roots = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
            if isinstance(mod, (tp.ops._ReshapeOp, tp.ops._UnbindOp, tp.ops._ExpandOp)):
                reshaped = True
            if isinstance(mod, tp.ops._SplitOp):  # a channel split (ShuffleNetV2): its index map is not kept
                for r in roots:
                    blocked[r] = True
            if isinstance(mod, tp.ops._OutputOp):  # the channels are also a model output
                for r in roots:
                    blocked[r] = True
            if not isinstance(mod, _PARAM_LAYERS) or mod is layer or is_depthwise(mod):
                continue
            if self.graph.is_out_channel_pruning_fn(handler):
                # a grouped producer is fine: the consumer then keeps the same share of each of its groups
                ok = isinstance(mod, (nn.Linear, nn.Conv2d))
                ok = ok and len(set(int(i) for i in item.idxs)) == len(roots) and self.names.get(mod) not in frozen
                producer_width += mod.weight.shape[0]
                per_group = mod.weight.shape[0] // getattr(mod, "groups", 1)
                for r, o in zip(roots, item.idxs, strict=True):
                    producers[r] += 1
                    blocked[r] |= not ok
                    if getattr(mod, "groups", 1) > 1:
                        groups[r] = int(o) // per_group
            elif self.graph.is_in_channel_pruning_fn(handler):  # another consumer of the same channels
                for r in roots:
                    blocked[r] = True
                covered.setdefault(mod, set()).update(int(i) for i in item.idxs)
        # a consumer whose every input channel also feeds ``layer`` has nothing prunable either: remember it,
        # so a residual stream read by twenty layers is traced once, not twenty times
        for mod, idxs in covered.items():
            width = getattr(mod, "in_channels", getattr(mod, "in_features", -1))
            if len(idxs) == width and mod in self.names:
                self._shared.add(self.names[mod])
        if reshaped and (producer_width != c_in or isinstance(layer, nn.Conv2d)):
            # a flatten of a spatial map (features are not channels), or a reshape between two convs
            # (a channel shuffle): its index map is not followed
            return []
        chosen = [j for j in range(c_in) if producers[j] == 1 and not blocked[j]]
        orphans = {j for j in range(c_in) if producers[j] == 0 and not blocked[j]}
        ties = self._find_ties(layer, chosen, orphans, blocked) if orphans and chosen else {}
        chosen = sorted(set(chosen) - {t for t, r in ties.items() if r < 0} | {t for t, r in ties.items() if r >= 0})
        self._ties[name] = {t: r for t, r in ties.items() if r >= 0}
        for t, r in self._ties[name].items():
            groups[t] = groups[r]
        self._groups[name] = [groups[j] for j in chosen]
        return chosen

    def _every_channel_shared(self, layer: nn.Module, c_in: int) -> bool:
        """Whether input channel 0's group alone shows that no input channel of ``layer`` can go.

        When no dependency reachable from these channels maps them unevenly (a channel concatenation, split
        or slice: :meth:`_maps_channels`), every input channel's group is channel 0's with the indices
        moved, so when channel 0 also feeds another layer, comes from two producers or is a model output,
        so does every channel, and :meth:`prunable_channels` finds none. Walking one channel instead of all
        of them spares most of a plan's walking: a residual stream read by twenty layers is one large group.
        The other consumers then read every channel of ``layer``, and are marked shared, as the full walk
        marks them."""
        try:
            group = self._group(layer, [0])
        except (IndexError, ZeroDivisionError, KeyError):
            return False
        if self._maps_channels(layer):
            return False
        producers, blocked, others = 0, False, {}
        for item in group:
            mod, handler = item.dep.target.module, item.dep.handler
            blocked |= isinstance(mod, tp.ops._OutputOp)
            if not isinstance(mod, _PARAM_LAYERS) or mod is layer or is_depthwise(mod):
                continue
            if self.graph.is_out_channel_pruning_fn(handler):
                producers += 1  # (whether this producer may lose the channel is left to the full walk)
            elif self.graph.is_in_channel_pruning_fn(handler):
                blocked = True
                others.setdefault(mod, set()).update(int(i) for i in item.idxs)
        if not (blocked or producers > 1):
            return False
        for mod, idxs in others.items():  # channel 0's inputs of ``mod``, repeated for each of the c_in channels
            if len(idxs) * c_in == getattr(mod, "in_channels", getattr(mod, "in_features", -1)) and mod in self.names:
                self._shared.add(self.names[mod])
        return True

    def _maps_channels(self, layer: nn.Module) -> bool:
        """Whether any dependency that removing input channels of ``layer`` can trigger, whatever the
        channels, maps indices other than channel by channel alike (the graph's maps as of the last walk):
        a concatenation, split or slice of channels does; a flatten (channel c to features c*s ... c*s+s-1,
        and back) does not. torch-pruning's own walk without indices: every (node, pruning function)
        reachable, each once."""
        fn = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
        stack, seen = [(self.graph.module2node[layer], fn)], set()
        while stack:
            node, trigger = stack.pop()
            for dep in node.dependencies:
                if not dep.is_triggered_by(trigger):
                    continue
                if any(m is not None and not isinstance(m, _FlattenIndexMapping) for m in dep.index_mapping):
                    return True
                if (dep.target, dep.handler) not in seen:
                    seen.add((dep.target, dep.handler))
                    stack.append((dep.target, dep.handler))
        return False

    def _find_ties(self, layer: nn.Module, chosen: list[int], orphans: set[int], blocked: list[bool]) -> dict[int, int]:
        """Twin input channels of ``layer``: {twin: the chosen channel whose removal takes it along}. A twin is
        an input channel with no producer of its own in the full group (torch-pruning reaches the shared
        filter once, from the other channel); removing the chosen channels alone shows it in ``layer``'s
        own input indices. ``{chosen channel: -1}`` marks a chosen channel whose twin cannot go (blocked)."""
        ties: dict[int, int] = {}
        for item in self._group(layer, chosen):
            mod, handler = item.dep.target.module, item.dep.handler
            if mod is not layer or not self.graph.is_in_channel_pruning_fn(handler):
                continue
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            for r, i in zip(roots, item.idxs, strict=True):
                r, i = int(r), int(i)
                if i == r or i in chosen:
                    continue
                if i in orphans:
                    ties[i] = r
                elif blocked[i]:
                    ties[r] = -1
        # a unit whose removal also drops a blocked channel stays, its twins with it
        return {t: r for t, r in ties.items() if r < 0 or ties.get(r, 0) >= 0}

    def tie_channels(self, name: str, channels: list[int]) -> list[int]:
        """``channels`` of ``name`` (prunable, or squeeze-excite gated: plan.se_gated_channels) with the twins
        their removal takes along added and recorded as tied (a GhostNet ghost module behind an SE gate).
        A twin read by a layer the chosen channels do not feed, or reaching a reshape or the model output,
        keeps its unit whole (the channel it is tied to is taken out)."""
        if not channels:
            return channels
        layer = self.model.get_submodule(name)
        readers: set[str] = set()
        ties: dict[int, int] = {}
        for item in self._group(layer, list(channels)):
            mod, handler = item.dep.target.module, item.dep.handler
            if not self.graph.is_in_channel_pruning_fn(handler) or not isinstance(mod, _PARAM_LAYERS):
                continue
            if mod is not layer:
                readers.add(self.names.get(mod, "?"))
                continue
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            ties.update({int(i): int(r) for r, i in zip(roots, item.idxs, strict=True) if int(i) not in channels})
        if not ties:
            return channels
        bad: set[int] = set()
        for item in self._group(layer, sorted(ties)):
            mod, handler = item.dep.target.module, item.dep.handler
            roots = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
            stray = isinstance(mod, (tp.ops._OutputOp, tp.ops._ReshapeOp, tp.ops._UnbindOp, tp.ops._ExpandOp))
            if isinstance(mod, _PARAM_LAYERS) and mod is not layer and self.graph.is_in_channel_pruning_fn(handler):
                stray = self.names.get(mod, "?") not in readers
            if stray:
                bad.update(r for r in roots if r in ties)
        kept_whole = {ties[t] for t in bad}
        accepted = {t: r for t, r in ties.items() if r not in kept_whole}
        self._ties.setdefault(name, {}).update(accepted)
        return sorted((set(channels) - kept_whole) | set(accepted))

    def channel_ties(self, name: str) -> torch.Tensor | None:
        """Unit id of each input channel of ``name``: tied channels (module docstring) share the id of the
        channel they are tied to, every other channel is its own unit. None when nothing is tied."""
        if name not in self._ties:
            self.prunable_channels(name)
        ties = self._ties.get(name, {})
        if not ties:
            return None
        unit = torch.arange(self.model.get_submodule(name).weight.shape[1])
        for t, r in ties.items():
            unit[t] = r
        return unit

    def tie_size(self, name: str, channels: list[int]) -> int:
        """Channels per unit among ``channels`` of ``name`` (1: nothing tied, or units of unequal sizes)."""
        unit = self.channel_ties(name)
        if unit is None or not channels:
            return 1
        sizes = unit[torch.tensor(channels, dtype=torch.long)].unique(return_counts=True)[1]
        return int(sizes[0]) if bool((sizes == sizes[0]).all()) else 1

    def channel_sources(self, name: str, every: list | None = None) -> dict[int, tuple[str, int]]:
        """Input channel j of layer ``name`` -> (producer layer, its output filter) for every channel with a
        producing Conv2d/Linear (through concatenations, depthwise convs and elementwise ops); a tied channel
        has the producer of its unit. A squeeze-excite gated channel has two producers: the main conv counts,
        not the SE excite conv (fed by the SE squeeze, another consumer of the same channels). ``every``: a
        list to which every (channel, producer, filter) is appended, SE excite convs included (their outputs
        go too)."""
        layer = self.model.get_submodule(name)
        producers, consumers = [], set()
        for item in self._group(layer, list(range(layer.weight.shape[1]))):
            mod, handler = item.dep.target.module, item.dep.handler
            if mod is layer or not isinstance(mod, (nn.Conv2d, nn.Linear)) or is_depthwise(mod):
                continue
            if self.graph.is_in_channel_pruning_fn(handler):
                consumers.add(self.names[mod])
            elif self.graph.is_out_channel_pruning_fn(handler):
                producers.append(item)
        out: dict[int, tuple[str, int]] = {}
        fallback: dict[int, tuple[str, int]] = {}
        for item in producers:
            mod = item.dep.target.module
            # an SE excite conv is fed by the squeeze conv that reads these channels: the main conv counts
            gate = bool(consumers) and bool(set(self.coupled_layers(mod)[1]) & consumers)
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            for r, i in zip(roots, item.idxs, strict=True):
                (fallback if gate else out).setdefault(int(r), (self.names[mod], int(i)))
                if every is not None:
                    every.append((int(r), self.names[mod], int(i)))
        out = {**fallback, **out}
        if name not in self._ties:
            self.prunable_channels(name)
        for t, r in self._ties.get(name, {}).items():
            if r in out:
                out[t] = out[r]
                if every is not None:
                    every.append((t, *out[r]))
        return out

    def channel_groups(self, name: str, channels: list[int] | None = None) -> torch.Tensor | None:
        """Group id of each prunable input channel of ``name`` (in :meth:`prunable_channels` order) whose
        producer is a grouped conv, -1 for the others; None when no producer is grouped."""
        if name not in self._groups:
            self.prunable_channels(name)
        groups = self._groups.get(name, [])
        if not groups or all(g < 0 for g in groups):
            return None
        return torch.tensor(groups)

    def other_consumers(self, name: str, channels: list[int]) -> dict[str, list[int]]:
        """Layers other than ``name`` (Conv2d / Linear, not depthwise) whose input channels go with input
        ``channels`` of ``name``: {layer: its input channels that go}. The squeeze conv of a squeeze-excite
        block reads the pooled channels it gates (plan.se_gated_channels); nothing else shares a prunable one."""
        layer = self.model.get_submodule(name)
        out: dict[str, set[int]] = {}
        if not channels:
            return {}
        for item in self._group(layer, list(channels)):
            mod, handler = item.dep.target.module, item.dep.handler
            if mod is layer or not isinstance(mod, (nn.Conv2d, nn.Linear)) or is_depthwise(mod):
                continue
            if self.graph.is_in_channel_pruning_fn(handler) and mod in self.names:
                out.setdefault(self.names[mod], set()).update(int(i) for i in item.idxs)
        return {n: sorted(idxs) for n, idxs in out.items()}

    def independently_prunable(self, name: str) -> bool:
        """Every input channel of ``name`` is removable (see :meth:`prunable_channels`)."""
        layer = self.model.get_submodule(name)
        return len(self.prunable_channels(name)) == layer.weight.shape[1] > 0

    def remove_input_channels(self, name: str, keep: torch.Tensor) -> torch.Tensor:
        """Remove every input channel of layer ``name`` not in ``keep``, and the producer's outputs.

        No layer is left empty: where ``keep`` would remove every output channel
        of a coupled layer (a SqueezeNet fire module: the next squeeze's inputs
        are the concat of two expand convs, and one expand's slice may be dropped
        whole), the first channel of that slice is kept too. Its weight column in
        ``name`` is what the caller wrote (zero after a structured solve), so the
        function is that of the requested pruning. Returns the input channels kept."""
        layer = self.model.get_submodule(name)
        c_in = layer.weight.shape[1]
        keep_set = set(int(k) for k in keep.tolist())
        drop = sorted(set(range(c_in)) - keep_set)
        if not drop:
            return torch.tensor(sorted(keep_set), dtype=torch.long)
        group = self._group(layer, drop)
        if not self.graph.check_pruning_group(group):
            keep_set |= self._rescue(layer, drop)
            drop = sorted(set(range(c_in)) - keep_set)
            group = self._group(layer, drop)
            if not self.graph.check_pruning_group(group):
                raise UserError(f"removing {len(drop)} input channels of {name} would leave a layer empty; raise keep")
        group.prune()
        return torch.tensor(sorted(keep_set), dtype=torch.long)

    def _rescue(self, layer: nn.Module, drop: list[int]) -> set[int]:
        """Input channels of ``layer`` to keep back so that no coupled layer loses every output channel."""
        back: set[int] = set()
        for item in self._group(layer, drop):
            mod, handler = item.dep.target.module, item.dep.handler
            if not isinstance(mod, _PARAM_LAYERS) or not self.graph.is_out_channel_pruning_fn(handler):
                continue
            idxs = [int(i) for i in item.idxs]
            roots = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
            if len(set(idxs)) >= mod.weight.shape[0] and roots:  # every output of ``mod`` would go
                back.add(min(roots))
        return back


def apply_mask(layer: nn.Module, mask: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.mul_(mask.to(layer.weight.dtype))


def sparsity(model: nn.Module, names: list[str] | None = None) -> float:
    """Fraction of zero weights over the Conv2d/Linear layers named (all if None)."""
    zeros = total = 0
    for n, m in model.named_modules():
        if isinstance(m, _PARAM_LAYERS) and (names is None or n in names):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)
