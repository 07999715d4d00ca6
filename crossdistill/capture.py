"""Capture the inputs of chosen layers with forward hooks.

Hooks are context managers, always removed (``finally``). ``forward_until``
stops the forward pass right after the layer of interest, so capturing the
input of layer l costs only the layers before it.
"""

from __future__ import annotations

import bisect
import operator
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .spill import Batches, Meta, load_raw, nbytes, save_raw

__all__ = [
    "record_inputs",
    "capture_inputs",
    "capture_input",
    "capture_outputs",
    "layer_outputs",
    "forward_order",
    "eval_mode",
    "removing",
    "buffers_kept",
    "GraphStream",
    "GraphUnsupported",
]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BN must not update its statistics while measured or
    captured), its own mode restored after, however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def removing(handles: list) -> Iterator[list]:
    """Remove the hook ``handles`` when the block ends, however it ends (a hook left behind would fire in
    every later forward). Handles appended to the list inside the block are removed too."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers on exit: a forward pass in train mode moves BN running statistics, and a
    teacher captured that way (bn_mode='train') must still be the teacher as given afterwards."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


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

    with removing(handles):
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(make_hook(n)))
        yield store


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

    handles: list = []
    with eval_mode(model), removing(handles):
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(make_hook(n)))
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
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

    with removing([model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]):
        try:
            model(x)
        except _Stop:
            pass
    return store


def forward_order(model: nn.Module, example: torch.Tensor, types=(nn.Conv2d, nn.Linear)) -> list[str]:
    """Names of the modules of ``types`` in the order the forward pass calls them (each once)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, types)}
    order: list[str] = []
    with removing([m.register_forward_pre_hook(lambda mod, _inp: order.append(names[mod])) for m in names]):
        with torch.no_grad():
            model(example)
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


# --------------------------------------------------------------------------- one pass over a traced graph

_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}


class GraphUnsupported(Exception):
    """The model cannot be run as a graph here (fx cannot trace it, a layer is called twice, ...)."""


class GraphStream:
    """The student's layer inputs in forward order, each computed from already computed activations.

    The model is traced once with ``torch.fx`` (in its current train/eval
    mode) and run node by node on the live modules, batch by batch; the
    values of the graph's nodes are kept while a later step may need them.
    Step ``i`` returns the input of planned layer ``names[i]``, recomputing
    only the nodes from ``restarts[i-1]`` on: the first node whose module
    step ``i-1`` changed (the layer itself, or the producer whose output
    channels went with its pruned inputs, and the BN / depthwise layers in
    between). A compression then costs about one forward pass of the
    student, plus the few nodes between each producer and its consumer,
    instead of one forward pass per layer.

    In-place operations (``out += identity``, ``ReLU(inplace=True)``) on a
    kept value would change it for a later step: such a value is copied
    before the operation; a graph that reads a value again after an in-place
    op changed it is not supported (``GraphUnsupported``; use per-layer capture).

    Memory (``spill_mb``, None: no limit): once the kept values of all batches
    exceed it, each batch's kept tensors live in a file of a temporary
    directory between steps (read before the batch runs, written after); a
    layer input over all images larger than it comes back as a
    :class:`crossdistill.spill.Batches` on disk instead of one tensor. Peak
    memory is then a few batches' values, whatever the number of images;
    float32 as computed, so the results are the same.

    :meth:`with_output` (before the first step): after the last step, :meth:`output` gives the model's
    output from the kept values, recomputing only from the first node the last step changed
    (``changed[-1]``), so that a report's output error costs the network's tail, not another forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        changed: list[list[str]],
        images: torch.Tensor,
        batch_size: int = 256,
        spill_mb: float | None = None,
    ):
        import torch.fx as fx

        try:
            graph = fx.Tracer().trace(model)
        except Exception as e:  # fx raises many types on data-dependent control flow
            raise GraphUnsupported(f"torch.fx cannot trace the model ({type(e).__name__}: {e})") from e
        self.model = model
        self.nodes = list(graph.nodes)
        self.index = index = {n: i for i, n in enumerate(self.nodes)}
        calls: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(i)
        where = []
        for name in names:
            if len(calls.get(name, [])) != 1:
                raise GraphUnsupported(f"layer {name} is not called exactly once in the traced graph")
            where.append(calls[name][0])
        if where != sorted(where):
            raise GraphUnsupported("the planned layers are not in the traced graph's order")
        self.where = where
        # step i recomputes from restart[i]: the earliest node whose module step i-1 changed
        self.calls, self.changed = calls, changed
        self.restart = [0] + [self._restart_after(i) for i in range(len(names) - 1)]
        self.last_use = [max((index[u] for u in n.users), default=-1) for n in self.nodes]
        self.inplace = [self._is_inplace(n) for n in self.nodes]
        for i, n in enumerate(self.nodes):  # a value read again after an in-place op changed it
            if self.inplace[i] and n.args and isinstance(n.args[0], fx.Node):
                if any(index[u] > i for u in n.args[0].users):
                    raise GraphUnsupported(f"node {n.name} changes a value in place that is read again later")
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.env: list[dict] = [{} for _ in self.batches]
        self.step = 0
        self.spill_bytes = None if spill_mb is None else spill_mb * 2**20
        self.disk: tempfile.TemporaryDirectory | None = None  # kept tensors, one file per batch and node, once spilled
        self.on_disk: list[dict[int, Meta]] = [{} for _ in self.batches]  # per batch: node index -> its file's meta

    def _restart_after(self, i: int) -> int:
        """The node the step after step ``i`` recomputes from: the earliest one whose module step ``i`` changed."""
        calls = self.calls
        if any(len(calls.get(m, [])) > 1 for m in self.changed[i]):
            raise GraphUnsupported("a changed module is called more than once")
        return min([self.where[i], *[calls[m][0] for m in self.changed[i] if len(calls.get(m, [])) == 1]])

    def with_output(self) -> None:
        """Keep what :meth:`output` needs after the last step (call before the first step)."""
        if self.step != 0 or len(self.restart) > len(self.where):
            raise RuntimeError("with_output() comes once, before the first step")
        self.restart.append(self._restart_after(len(self.where) - 1))

    def _is_inplace(self, n) -> bool:
        if n.op == "call_function":
            return n.target in _INPLACE_FUNCTIONS or getattr(n.target, "__name__", "").endswith("_")
        if n.op == "call_method":
            return str(n.target).endswith("_") and not str(n.target).startswith("__")
        if n.op == "call_module":
            return bool(getattr(self.model.get_submodule(str(n.target)), "inplace", False))
        return False

    def _run(self, i: int, env: dict, x: torch.Tensor, low: int):
        import torch.fx as fx

        n = self.nodes[i]
        if n.op == "placeholder":
            if n is self.placeholders[0]:
                return x
            if n.args:
                return n.args[0]  # a default value
            raise GraphUnsupported(f"forward takes a second input ({n.name}) without a default")
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if self.inplace[i] and n.args and isinstance(n.args[0], fx.Node) and self.index[n.args[0]] < low:
            args = (args[0].clone(), *args[1:])  # a value kept from an earlier step: keep it as it was
        if n.op == "call_module":
            return self.model.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        if n.op == "get_attr":
            obj = self.model
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        return None  # output

    def _path(self, b: int, k: int) -> Path:
        return Path(self.disk.name) / f"{b}-{k}.bin"

    def _load(self, b: int, low: int, stop: int) -> dict:
        """Batch ``b``'s values that nodes ``low..stop`` read: kept values from disk are read back only when one
        of these nodes reads them (a block's input, kept for its residual sum, is not read by the convs
        in between)."""
        env, disk = self.env[b], self.on_disk[b]
        if not disk:
            return env
        for j in range(low, stop + 1):
            for a in self.nodes[j].all_input_nodes:
                k = self.index[a]
                if k < low and a not in env and k in disk:
                    env[a] = load_raw(self._path(b, k), disk[k], self.batches[b].device)
        return env

    def _store(self, b: int, env: dict, fresh: range, future: list[int]) -> None:
        """Once spilled: batch ``b``'s kept tensors to their files (only those computed in this step, nodes
        ``fresh``, or not on disk yet: a value read back is unchanged), the files of values no later step
        reads removed; other values (sizes, parameters) stay in memory."""
        if self.disk is None:
            return
        disk = self.on_disk[b]
        for n, v in list(env.items()):
            if type(v) is not torch.Tensor:
                continue
            k = self.index[n]
            if k not in disk or k in fresh:
                disk[k] = save_raw(v, self._path(b, k))
            del env[n]
        for k in [k for k in disk if not self._read_later(k, future)]:
            self._path(b, k).unlink()
            del disk[k]

    def _read_later(self, k: int, restarts: list[int]) -> bool:
        """Whether a step restarting at one of ``restarts`` (sorted) reads node ``k`` without computing it."""
        j = bisect.bisect_right(restarts, k)  # the first restart after node k
        return j < len(restarts) and restarts[j] <= self.last_use[k]

    def kept_bytes(self) -> int:
        """Bytes of the kept tensors in memory (all batches)."""
        return sum(nbytes(v) for env in self.env for v in env.values() if type(v) is torch.Tensor)

    @torch.no_grad()
    def output(self) -> torch.Tensor | None:
        """The model's output on all images (N, ...) after the last step of a stream set up with
        :meth:`with_output`, or None when the graph returns something other than one tensor."""
        if self.step != len(self.where) or len(self.restart) != len(self.where) + 1:
            raise RuntimeError("output() comes after the last step of a stream set up with with_output()")
        end = next(k for k, n in enumerate(self.nodes) if n.op == "output")
        value = self.nodes[end].args[0]
        if not isinstance(value, torch.fx.Node):
            return None
        outs = []
        for b, x in enumerate(self.batches):
            env = self._load(b, self.restart[-1], end)
            for j in range(self.restart[-1], end):
                env[self.nodes[j]] = self._run(j, env, x, self.restart[-1])
            outs.append(env[value])
            self.env[b] = {}
        self.step += 1
        return torch.cat(outs) if all(type(o) is torch.Tensor for o in outs) else None

    @torch.no_grad()
    def next_input(self, collect: bool = True) -> torch.Tensor | Batches | None:
        """The input of the next planned layer on all images (N, ...), computed from the kept values
        (``collect=False``: only advance, for a layer left as it is); a :class:`Batches` on disk when it is
        larger than ``spill_mb``."""
        i = self.step
        low, stop = self.restart[i], self.where[i]
        # values a later step may still read: a step restarting at r reads the values computed before r (the
        # rest it computes anew), so a value is kept while some restart to come lies after it and at or
        # before its last use
        future = sorted(set(self.restart[i + 1 :]))
        n_images = sum(len(x) for x in self.batches)
        out = None
        for b, x in enumerate(self.batches):
            env = self._load(b, low, stop)
            for j in range(low, stop):
                env[self.nodes[j]] = self._run(j, env, x, low)
            value = self.nodes[stop].args[0]
            if collect:
                v = env[value] if isinstance(value, torch.fx.Node) else value
                if out is None:
                    big = self.spill_bytes is not None and nbytes(v) * n_images / len(x) > self.spill_bytes
                    out = Batches(on_disk=big)
                out.append(v)
            for node in [n for n in env if not self._read_later(self.index[n], future)]:
                del env[node]
            self._store(b, env, range(low, stop), future)
        self.step += 1
        if self.disk is None and self.spill_bytes is not None and self.kept_bytes() > self.spill_bytes:
            self.disk = tempfile.TemporaryDirectory(prefix="crossdistill-")
            for b, env in enumerate(self.env):
                self._store(b, env, range(0), future)
        if out is None:
            return None
        return out if out.folder is not None else out.cat()
