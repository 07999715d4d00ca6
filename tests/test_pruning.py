"""ChannelRemover's walked-group cache: the same groups as torch-pruning's own walk, dropped when the model
changes shape (channels removed here or by anyone), and the same students with the cache as without."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.pruning import ChannelRemover, _reshape_guard

sys.path.insert(0, str(Path(__file__).parent))
from zoo import (  # noqa: E402
    CACHE_NETS,
    TinyGoogLeNet,
    TinyResNeXt,
    TinyShuffleNet,
    cache_net,
    convnext,
    efficientnet,
    inverted_residual,
    mobilenet_v3,
    noise_batch,
    squeezenet,
)


def _describe(remover: ChannelRemover, group: tp.Group) -> list[tuple]:
    """A group as plain data: (module name, handler, indices, root indices) per item."""
    names = {m: n for n, m in remover.model.named_modules()}
    out = []
    for item in group:
        mod = item.dep.target.module
        roots = item.root_idxs if item.root_idxs is not None else item.idxs
        handler = f"{type(item.dep.handler.__self__).__name__}.{item.dep.handler.__name__}"
        out.append((names.get(mod, type(mod).__name__), handler, list(item.idxs), list(roots)))
    return sorted(out)


def _walk(remover: ChannelRemover, layer: nn.Module, fn, idxs: list[int]) -> list[tuple]:
    """torch-pruning's own walk, index maps re-derived, nothing kept."""
    with _reshape_guard():
        return _describe(remover, remover.graph.get_pruning_group(layer, fn, idxs=idxs))


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch", sorted(CACHE_NETS))
def test_cached_groups_are_torch_prunings_own_walks(arch: str) -> None:
    model = cache_net(arch)
    remover = ChannelRemover(model, noise_batch())
    for _, conv in _convs(model):
        sides = ((tp.prune_conv_in_channels, conv.in_channels), (tp.prune_conv_out_channels, conv.out_channels))
        for fn, width in sides:
            idxs = list(range(0, width, 2))
            first = remover.pruning_group(conv, fn, idxs)
            assert remover.pruning_group(conv, fn, idxs) is first  # walked once
            assert _describe(remover, first) == _walk(remover, conv, fn, idxs)


@pytest.mark.parametrize("arch", ["resnet20", "densenet", "mobilenet"])
def test_removing_channels_drops_the_walked_groups(arch: str) -> None:
    model = cache_net(arch)
    remover = ChannelRemover(model, noise_batch())
    names = [n for n, m in _convs(model) if remover.independently_prunable(n)]
    assert names
    before = {n: remover.pruning_group(model.get_submodule(n), tp.prune_conv_in_channels, [0]) for n in names}
    target = model.get_submodule(names[0])
    remover.remove_input_channels(names[0], torch.arange(0, target.in_channels, 2))
    fresh = ChannelRemover(copy.deepcopy(model), noise_batch())  # a graph traced on the pruned model
    for n in names:
        layer = model.get_submodule(n)
        after = remover.pruning_group(layer, tp.prune_conv_in_channels, list(range(layer.in_channels)))
        other = fresh.model.get_submodule(n)
        expected = fresh.pruning_group(other, tp.prune_conv_in_channels, list(range(other.in_channels)))
        assert _describe(remover, after) == _describe(fresh, expected)
    assert remover.pruning_group(target, tp.prune_conv_in_channels, [0]) is not before[names[0]]


def test_a_shape_changed_outside_the_remover_drops_the_walked_groups() -> None:
    model = cache_net("resnet20")
    remover = ChannelRemover(model, noise_batch())
    name = next(n for n, _ in _convs(model) if remover.independently_prunable(n))
    layer = model.get_submodule(name)
    old = remover.pruning_group(layer, tp.prune_conv_in_channels, [0, 1])
    old.prune()  # torch-pruning directly: the remover is not told
    group = remover.pruning_group(layer, tp.prune_conv_in_channels, [0, 1])
    assert group is not old
    assert _describe(remover, group) == _walk(remover, layer, tp.prune_conv_in_channels, [0, 1])


def test_a_weight_written_in_place_keeps_the_walked_groups() -> None:
    model = cache_net("resnet20")
    remover = ChannelRemover(model, noise_batch())
    layer = _convs(model)[3][1]
    group = remover.pruning_group(layer, tp.prune_conv_in_channels, [0])
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a re-fit: same shapes, same graph
    assert remover.pruning_group(layer, tp.prune_conv_in_channels, [0]) is group


@pytest.mark.parametrize("arch", ["resnet20", "ghost"])
@pytest.mark.parametrize("method", ["ours", "nc"])
def test_students_are_the_same_without_the_cache(arch: str, method: str, monkeypatch) -> None:
    model, x = cache_net(arch), noise_batch(8)
    cached, report = compress(model, x, method=method, keep=0.5)

    def uncached(self, layer, fn, idxs):  # every call walks again, index maps re-derived
        with _reshape_guard():
            return self.graph.get_pruning_group(layer, fn, idxs=list(idxs))

    monkeypatch.setattr(ChannelRemover, "pruning_group", uncached)
    plain, plain_report = compress(model, x, method=method, keep=0.5)
    assert [r.kept_channels for r in report.layers] == [r.kept_channels for r in plain_report.layers]
    a, b = cached.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report.flops_after == plain_report.flops_after


ZOO_ALL = {
    **CACHE_NETS,
    "efficientnet": efficientnet,
    "mobilenet_v3": mobilenet_v3,
    "convnext": convnext,
    "squeezenet": squeezenet,
    "inverted_residual": inverted_residual,
    "resnext": TinyResNeXt,
    "shufflenet": TinyShuffleNet,
    "googlenet": TinyGoogLeNet,
}


@pytest.mark.parametrize("arch", sorted(ZOO_ALL))
def test_one_channel_walk_finds_what_the_walk_over_every_channel_finds(arch: str, monkeypatch) -> None:
    """A layer whose channel 0 is shared (a residual stream) is settled from channel 0's group alone."""
    torch.manual_seed(0)
    model = ZOO_ALL[arch]().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def answers(remover: ChannelRemover) -> tuple:
        try:
            chosen = [remover.prunable_channels(n) for n in names]
        except UserError:  # a model torch-pruning cannot trace: the same error either way
            return ("untraceable",)
        groups = [remover.channel_groups(n) for n in names]
        ties = [remover.channel_ties(n) for n in names]
        as_lists = lambda ts: [None if t is None else t.tolist() for t in ts]  # noqa: E731
        return chosen, as_lists(groups), as_lists(ties), remover._shared

    fast = answers(_remover(model))
    monkeypatch.setattr(ChannelRemover, "_every_channel_shared", lambda self, layer, c_in: False)
    assert fast == answers(_remover(model))


def _remover(model: nn.Module) -> ChannelRemover:
    try:
        return ChannelRemover(model, noise_batch())
    except UserError:
        pytest.skip("torch-pruning cannot trace this model")


def test_a_residual_stream_is_settled_from_one_channel() -> None:
    model = cache_net("resnet20")
    remover = ChannelRemover(model, noise_batch())
    reader = model.layer1[0].conv1  # reads the stream that every block of the stage adds to
    assert remover._every_channel_shared(reader, reader.in_channels)
    inner = model.layer1[0].conv2  # its only producer is conv1: prunable
    assert not remover._every_channel_shared(inner, inner.in_channels)
    assert remover.prunable_channels("layer1.0.conv2") == list(range(inner.in_channels))
