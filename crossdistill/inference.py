"""Make a (compressed) model faster on CPU without changing what it computes.

Pruning halves a ResNet block's inner width, but the block's BatchNorms and
the layout reorders oneDNN inserts around every NCHW convolution cost time in
proportion to the activations, not the FLOPs, so an eager student's measured
speed-up trails its FLOPs reduction (benchmarks/bench_speed.py measures both).
:func:`optimize_for_inference` removes most of that overhead, for teacher and
student alike:

- **Fold BatchNorm into the preceding conv/linear** (``torch.fx`` tracing and
  ``torch.fx.experimental.optimization.fuse``; exact in eval mode up to float
  rounding). A model that ``torch.fx`` cannot trace keeps its BatchNorms and
  a warning says so.
- **Channels-last memory format**, the layout oneDNN's convolutions use
  natively, for the weights and (via :class:`InferenceModel`) the input.

The result is a plain ``nn.Module`` for inference only (no training: BN
statistics are gone).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["InferenceModel", "optimize_for_inference", "count_batchnorms"]


class InferenceModel(nn.Module):
    """Wraps a module and hands it 4-D inputs in channels-last layout."""

    def __init__(self, module: nn.Module, channels_last: bool = True) -> None:
        super().__init__()
        self.module = module
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def optimize_for_inference(model: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> InferenceModel:
    """A copy of ``model`` in eval mode with BatchNorm folded and channels-last layout.

    ``model`` itself is left untouched. Outputs match the original's eval-mode
    outputs to float rounding (tests check it).
    """
    model = copy.deepcopy(model).eval()
    if fold_bn and count_batchnorms(model):
        from torch.fx.experimental.optimization import fuse

        try:
            model = fuse(model)
        except Exception as e:  # torch.fx cannot trace data-dependent control flow
            warnings.warn(
                f"BatchNorm not folded: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
                "the model runs with its BatchNorm layers",
                stacklevel=2,
            )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return InferenceModel(model, channels_last).eval()
