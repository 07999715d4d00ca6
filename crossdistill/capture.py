"""Capture the inputs of chosen layers with forward hooks.

Hooks are context managers, always removed (``finally``). ``forward_until``
stops the forward pass right after the layer of interest, so capturing the
input of layer l costs only the layers before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "record_inputs",
    "capture_inputs",
    "capture_input",
    "capture_outputs",
    "layer_outputs",
    "forward_order",
]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early; never escapes this module."""


@contextmanager
def record_inputs(model: nn.Module, names: list[str], stop_after: str | None = None) -> Iterator[dict[str, list]]:
    """While active, every forward appends each named module's input (detached) to ``store[name]``."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def make_hook(name: str):
        def hook(_module, inputs):
            store[name].append(inputs[0].detach())
            if name == stop_after:
                raise _Stop

        return hook

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(make_hook(n)))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_inputs(
    model: nn.Module, names: list[str], images: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Inputs of every module in ``names`` on ``images`` (one pass, batched). Shapes (N, C, H, W) or (N, F)."""
    with record_inputs(model, names) as store:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def capture_input(model: nn.Module, name: str, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Input of one module on ``images``; the forward stops at that module."""
    with record_inputs(model, [name], stop_after=name) as store:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i : i + batch_size])
            except _Stop:
                pass
    if len(store[name]) != -(-len(images) // batch_size):
        raise RuntimeError(f"layer {name} was not called exactly once per forward; it cannot be captured")
    return torch.cat(store[name])


@torch.no_grad()
def capture_outputs(
    model: nn.Module, names: list[str], images: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Outputs of every module in ``names`` on ``images``, batched, in eval mode (mode restored after).

    Cloned inside the hook, before any in-place op (an in-place ReLU) can change them.
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def make_hook(name: str):
        def hook(_m, _inp, out):
            store[name].append(out.clone())

        return hook

    handles = []
    was_training = model.training
    model.eval()
    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(make_hook(n)))
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in store.items()}


def layer_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named modules on ``x``, cloned (safe from later in-place ops) with their autograd
    graph; the forward stops once every named module has run. Modules never called are absent."""
    store: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_m, _inp, out):
            store[name] = out.clone()
            if len(store) == len(names):
                raise _Stop

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return store


def forward_order(model: nn.Module, example: torch.Tensor, types=(nn.Conv2d, nn.Linear)) -> list[str]:
    """Names of the modules of ``types`` in the order the forward pass calls them (each once)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, types)}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[mod])) for m in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]
