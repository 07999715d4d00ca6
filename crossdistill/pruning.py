"""Physical channel removal (torch-pruning's dependency graph) and weight masks.

Removing input channel j of a layer removes output channel j of the layer
that produces it, with its BatchNorm entry; torch-pruning's
``DependencyGraph`` finds that coupled group. A layer is *independently
prunable* when its group touches the input channels of that layer alone and
the output channels of exactly one producer (VGG convs 2-13, the inner conv
of a residual block); layers whose inputs are shared through a residual sum
or a concatenation are re-fitted but not narrowed by default.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .errors import UserError

__all__ = ["ChannelRemover", "apply_mask", "sparsity"]

_PARAM_LAYERS = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


class ChannelRemover:
    """Dependency graph of ``model`` for removing input channels of chosen layers."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        try:
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as e:  # torch-pruning raises many types while tracing unknown models
            raise UserError(f"could not trace the model to find coupled channels ({e}); check the model runs") from e
        self.names = {m: n for n, m in model.named_modules()}

    def _group(self, layer: nn.Module, idxs: list[int]):
        fn = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
        return self.graph.get_pruning_group(layer, fn, idxs=idxs)

    def coupled_layers(self, layer: nn.Module) -> tuple[list[str], list[str]]:
        """(layers whose input channels change, layers whose output channels change) if ``layer``'s inputs shrink."""
        ins, outs = [], []
        for item in self._group(layer, [0]):
            mod, handler = item.dep.target.module, item.dep.handler
            if not isinstance(mod, _PARAM_LAYERS):
                continue
            if self.graph.is_out_channel_pruning_fn(handler):
                outs.append(self.names.get(mod, "?"))
            elif self.graph.is_in_channel_pruning_fn(handler):
                ins.append(self.names.get(mod, "?"))
        return sorted(set(ins)), sorted(set(outs))

    def independently_prunable(self, name: str) -> bool:
        layer = self.model.get_submodule(name)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return False
        ins, outs = self.coupled_layers(layer)
        if ins != [name] or len(outs) != 1:
            return False
        producer = self.model.get_submodule(outs[0])
        return not (isinstance(producer, nn.Conv2d) and producer.groups != 1)

    def remove_input_channels(self, name: str, keep: torch.Tensor) -> None:
        """Remove every input channel of layer ``name`` not in ``keep``, and the producer's outputs."""
        layer = self.model.get_submodule(name)
        c_in = layer.weight.shape[1]
        drop = sorted(set(range(c_in)) - set(keep.tolist()))
        if not drop:
            return
        group = self._group(layer, drop)
        if not self.graph.check_pruning_group(group):
            raise UserError(f"removing {len(drop)} input channels of {name} would leave a layer empty; raise keep")
        group.prune()


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
