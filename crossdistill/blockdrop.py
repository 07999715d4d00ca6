"""Depth: drop whole residual blocks, chosen by recoverability per cost saved (PRACTISE, cheap version).

A dropped block is replaced by a :class:`DroppedBlock` holding its shortcut:
the identity where the block keeps the shape, else a 1x1 ``adaptor`` conv
(with bias; stride of the block) fitted by ridge least squares on the few
images to map the teacher's block input to the teacher's block output.

Score of a block (``depth="blocks"`` / ``"mixed"``): drop it alone from the
teacher (adaptor fitted), measure the relative error at the penultimate
features on the few images (how much the rest of the network does *not*
recover), divide by the cost it saves (FLOPs, parameters or table ms);
PRACTISE's recoverability divided by latency saved, without its adaptation
training. Blocks are dropped lowest score first.

- ``blocks``: drop blocks until the cost is at or below the target; the
  target is met to the granularity of one block (reported as achieved).
- ``mixed``: blocks and channels under one budget (:func:`rank_mixed`):
  block drops and the channel curves are ranked together by error per cost
  saved, both at the penultimate features so they share one scale. The
  channel curves are cross-fitted (``penultimate-cv``: solved on one half of
  the draw, scored on the other) and stop at ``alloc_floor``: solved and
  scored on the same images (the old ``penultimate``), late layers re-fit
  their few images at any width, every channel segment looks nearly free,
  the channels fill the whole budget and no block is ever chosen (ResNet-56,
  K=1, FLOPs 0.5: the cheapest block at 0.30 error per unit of FLOPs, the
  in-sample channels still at 0.12 when half the FLOPs are gone; cross-fitted
  they pass 0.30 at 0.37 saved). A block's own error needs no cross-fit: its
  adaptor has at most C_in + 1 unknowns per output against hundreds of rows.
  The blocks chosen are dropped, then channels are allocated on the
  shallower model with ``cfg.signal`` (default ``recon-cv``) and the floor,
  to meet the target exactly (:func:`crossdistill.target.plan_target`).

A latency target plans the same way on the latency table, at a table target
root-found on the student timed against the teacher
(:mod:`crossdistill.calibrate`): narrowed channels time slower than the
table says (what they cannot shrink: activations, residual sums; ResNet-56,
one thread: every layer at 0.1 of its channels still times at 0.53), while a
dropped block saves what the table says, so a lower table target drops more
blocks until the timed student is within max(2 x noise, 0.02) of the target.

Supported: the registry ResNets (:class:`crossdistill.models.BasicBlock`,
option-A shortcuts) and torchvision-style ``BasicBlock`` / ``Bottleneck``
modules (``conv1`` ... and a ``downsample`` that is None or conv + BN).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .allocate import flops_measure
from .capture import capture_input, forward_order, removing
from .errors import UserError
from .measure import count_params
from .structure import DroppedBlock

__all__ = ["DroppedBlock", "residual_blocks", "drop_blocks", "block_scores", "rank_mixed", "plan_blocks"]


def _is_block(m: nn.Module) -> bool:
    from .models import BasicBlock

    if isinstance(m, BasicBlock):
        return True
    return type(m).__name__ in ("BasicBlock", "Bottleneck") and hasattr(m, "conv1") and hasattr(m, "downsample")


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the droppable residual blocks, in forward order; a clear error if there are none."""
    blocks = [n for n, m in model.named_modules() if _is_block(m)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no residual block crossdistill can drop (ResNet BasicBlock / Bottleneck "
            "with a shortcut or .downsample); use depth='channels' for this model"
        )
    return blocks


def _block_io(model: nn.Module, name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    block = model.get_submodule(name)
    store: dict[str, torch.Tensor] = {}
    hook = block.register_forward_hook(lambda m, args, out: store.update(x=args[0].detach(), y=out.detach()))
    with removing([hook]), torch.no_grad():
        model(images)
    return store["x"], store["y"]


@torch.no_grad()
def fit_adaptor(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> nn.Module:
    """Identity where shapes agree; else a 1x1 conv (+bias, stride H_in/H_out) fitted by ridge least squares
    so that adaptor(x) ~ y on the few images."""
    if x.shape[1:] == y.shape[1:]:
        return nn.Identity()
    stride = x.shape[-1] // y.shape[-1]
    xs = x[:, :, ::stride, ::stride][:, :, : y.shape[-2], : y.shape[-1]]
    U = xs.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()  # (M, C_in)
    U = torch.cat([U, torch.ones(len(U), 1, dtype=U.dtype, device=U.device)], 1)  # bias column
    Y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()  # (M, C_out)
    G = U.T @ U
    lam = ridge * float(G.diagonal().mean())
    W = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype, device=G.device), U.T @ Y)  # (C_in+1, C_out)
    conv = nn.Conv2d(x.shape[1], y.shape[1], 1, stride, bias=True).to(x.device)
    conv.weight.copy_(W[:-1].T.reshape(conv.weight.shape).float())
    conv.bias.copy_(W[-1].float())
    return conv


def drop_blocks(model: nn.Module, names: list[str], images: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the named blocks replaced by :class:`DroppedBlock` (adaptors fitted on the
    teacher's own block input and output, so each adaptor is fitted as if it were the only drop)."""
    out = copy.deepcopy(model).eval()
    for name in names:
        x, y = _block_io(model.eval(), name, images)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, DroppedBlock(fit_adaptor(x, y)))
    return out


def _penultimate(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    order = forward_order(model, images[:1])
    linears = [n for n in order if isinstance(model.get_submodule(n), nn.Linear)]
    if linears:
        return capture_input(model, linears[-1], images)
    with torch.no_grad():
        return model(images)


def block_scores(model: nn.Module, images: torch.Tensor, measure: Callable[[nn.Module], float]) -> list[dict[str, Any]]:
    """Per block: relative error at the penultimate features when it alone is dropped, cost saved, score."""
    model = model.eval()
    ref = _penultimate(model, images).double()
    energy = float(ref.pow(2).sum()) or 1.0
    base = measure(model)
    out = []
    for name in residual_blocks(model):
        dropped = drop_blocks(model, [name], images)
        err = float((_penultimate(dropped, images).double() - ref).pow(2).sum()) / energy
        saved = base - measure(dropped)
        out.append({"block": name, "error": err, "saved": saved, "score": err / saved if saved > 0 else float("inf")})
    return out


def _measure_for(kind: str, example: torch.Tensor, cfg: Any) -> Callable[[nn.Module], float]:
    if kind == "flops":
        return flops_measure(example.shape[1:])
    if kind == "params":
        return lambda m: float(count_params(m))
    from .latency import latency_measure

    return latency_measure(example.shape[1:], cfg.latency_batch)


def rank_mixed(scores: list[dict[str, Any]], curves: list[Any], need: float) -> list[str]:
    """Blocks to drop when blocks and channel segments share one budget of ``need`` (cost units).

    Items are taken by error per cost saved, flattest first: hull segments of the channel ``curves``
    (cut at each curve's ``floor``) and whole blocks (``scores`` of :func:`block_scores`). A block is
    taken only while its saving fits what is left (channels fill the rest exactly afterwards); the
    saving already counted for channels of layers inside a block taken is given back (they go with it),
    and later segments of those layers are skipped."""
    from .allocate import hull_segments

    items: list[tuple[float, int, Any]] = [(s["score"], 0, s) for s in scores if s["saved"] > 0]
    items += [(slope, 1, (c, k_from, k_to)) for slope, c, k_from, k_to in hull_segments(curves)]
    counted: dict[str, float] = {}  # layer -> channel saving counted so far
    chosen: list[str] = []
    left = need

    def within(block: str) -> list[str]:
        return [n for n in counted if n.startswith(block + ".")]

    for _score, is_segment, item in sorted(items, key=lambda t: (t[0], t[1])):
        if left <= 0:
            break
        if is_segment:
            c, k_from, k_to = item
            k_to = max(k_to, c.floor)
            if k_from <= k_to or any(c.name.startswith(b + ".") for b in chosen):
                continue
            counted[c.name] = counted.get(c.name, 0.0) + (k_from - k_to) * c.cost
            left -= (k_from - k_to) * c.cost
        elif item["saved"] <= left + sum(counted[n] for n in within(item["block"])):
            left += sum(counted.pop(n) for n in within(item["block"]))  # its channels go with it
            chosen.append(item["block"])
            left -= item["saved"]
    return chosen


def plan_blocks(teacher: nn.Module, images: torch.Tensor, cfg: Any) -> tuple[nn.Module, Any]:
    """depth 'blocks' or 'mixed' (module docstring): the block-dropped student and its allocation."""
    from .target import Allocation, layer_flops_share, parse_target, plan_target, pruned_plan

    kind, fraction = parse_target(cfg.target)
    example = images[:1]
    teacher = teacher.eval()
    measure = _measure_for(kind, example, cfg)
    base = measure(teacher)
    scores = block_scores(teacher, images, measure)
    if kind == "latency":
        return _plan_latency(teacher, images, cfg, scores, measure)
    need = (1 - fraction) * base
    chosen: list[str] = []
    if cfg.depth == "blocks":
        for s in sorted(scores, key=lambda s: s["score"]):
            if measure(drop_blocks(teacher, chosen, images)) <= base * fraction * (1 + cfg.target_tolerance):
                break
            if s["saved"] > 0:
                chosen.append(s["block"])
        student = drop_blocks(teacher, chosen, images)
        achieved = measure(student) / base
        if achieved > fraction * (1 + cfg.target_tolerance):
            raise UserError(
                f"dropping every block keeps {achieved:.3f} of the teacher (target {fraction}); "
                "use depth='mixed' to narrow channels too"
            )
        names = [p.name for p in pruned_plan(teacher, example, cfg)]
        share = layer_flops_share(teacher, example, names)
        alloc = Allocation(kind, fraction, achieved, "penultimate", "blocks", {}, {}, share, chosen)
        return student, alloc
    # mixed: blocks and channel segments ranked together by error per cost saved (module docstring)
    plan = pruned_plan(teacher, example, cfg)
    chosen = rank_mixed(scores, _mixed_curves(teacher, images, plan, measure, cfg), need)
    student = drop_blocks(teacher, chosen, images)
    rest = base * fraction / measure(student)
    sub = _shallower_config(cfg, chosen)
    if rest >= 1.0:  # the blocks alone reached the target
        alloc = Allocation(kind, fraction, measure(student) / base, "penultimate-cv", "mixed", {}, {}, {}, chosen)
    else:
        sub.target = {kind: rest}
        alloc = plan_target(student, images, sub, measure)
        alloc.asked, alloc.achieved = fraction, alloc.achieved * measure(student) / base
        alloc.depth, alloc.dropped_blocks = "mixed", chosen
    alloc.flops_share = layer_flops_share(teacher, example, list(alloc.kept_fraction) or [p.name for p in plan])
    return student, alloc


def _mixed_curves(teacher: nn.Module, images: torch.Tensor, plan: list, measure: Callable, cfg: Any) -> list:
    """mixed: the channel segments ranked against whole blocks, scored at the penultimate features like the
    blocks, cross-fitted, priced in ``measure`` and floored as the channel allocation will be."""
    from .allocate import channel_costs, sensitivity_curves

    curves = sensitivity_curves(teacher, images, plan, "penultimate-cv", batch_size=cfg.batch_size)
    channel_costs(teacher, images[:1], curves, plan, measure)
    for c in curves:
        c.floor = max(1, math.ceil(cfg.alloc_floor * c.prunable))
    return curves


def _shallower_config(cfg: Any, chosen: list[str]) -> Any:
    """``cfg`` for narrowing the channels of the model with blocks ``chosen`` dropped: their adaptors left whole."""
    sub = copy.copy(cfg)
    sub.exclude = [*(cfg.exclude or []), *[f"{b}.adaptor" for b in chosen]]
    return sub


def _plan_latency(
    teacher: nn.Module, images: torch.Tensor, cfg: Any, scores: list[dict[str, Any]], measure: Callable
) -> tuple[nn.Module, Any]:
    """depth 'blocks' / 'mixed' for a latency target: the plan of the FLOPs path at a table target ``asked``
    (blocks: dropped in score order until the table is at ``asked``; mixed: :func:`rank_mixed` over
    ``(1 - asked)`` of the table, then channels on the shallower model to the table's ``asked``), with
    ``asked`` root-found on the student timed against the teacher (:func:`crossdistill.calibrate.calibrate`):
    where narrowed channels time slower than the table says, a lower ``asked`` drops more blocks."""
    from .allocate import prune_to_counts
    from .calibrate import calibrate
    from .target import Allocation, layer_flops_share, parse_target, plan_target, pruned_plan, timer_for

    _, fraction = parse_target(cfg.target)
    example = images[:1]
    base, tol = measure(teacher), cfg.target_tolerance
    plan = pruned_plan(teacher, example, cfg)
    ranked = [s["block"] for s in sorted(scores, key=lambda s: s["score"]) if s["saved"] > 0]
    curves = _mixed_curves(teacher, images, plan, measure, cfg) if cfg.depth == "mixed" else []
    dropped: dict[tuple[str, ...], nn.Module] = {}

    def shallower(chosen: list[str]) -> nn.Module:
        if tuple(chosen) not in dropped:
            dropped[tuple(chosen)] = drop_blocks(teacher, chosen, images)
        return dropped[tuple(chosen)]

    def propose(asked: float) -> tuple[tuple[list[str], Any, nn.Module], float, tuple, bool]:
        if cfg.depth == "blocks":
            chosen: list[str] = []
            for name in ranked:
                if measure(shallower(chosen)) <= base * asked * (1 + tol):
                    break
                chosen.append(name)
            student = shallower(chosen)
            table = measure(student) / base
            return (chosen, None, student), table, tuple(chosen), len(chosen) == len(ranked)
        need = (1 - asked) * base
        while True:
            chosen = rank_mixed(scores, curves, need)
            student, alloc = shallower(chosen), None
            rest = base * asked / measure(student)
            if rest >= 1.0:
                break
            sub = _shallower_config(cfg, chosen)
            sub.target = {"latency": rest}
            try:  # the table alone (its own measure: no timing inside)
                alloc = plan_target(student, images, sub, measure)
                break
            except UserError:  # channels cannot make up the rest even at the lowest floor: rank more blocks in
                if len(chosen) == len(ranked) or need >= base:
                    return (chosen, None, student), measure(student) / base, (tuple(chosen), ()), True
                need += 0.05 * base
        if alloc is not None:
            sub_plan = pruned_plan(student, example, sub)
            counts = {p.name: round(alloc.kept_fraction[p.name] * p.prunable(student)) for p in sub_plan}
            student = prune_to_counts(student, example, sub_plan, counts)
        table = measure(student) / base
        key = (tuple(chosen), tuple(sorted((alloc.keep_overrides if alloc else {}).items())))
        return (chosen, alloc, student), table, key, table > asked * (1 + tol) and len(chosen) == len(ranked)

    time_student = timer_for(teacher, example.shape[1:], cfg.latency_batch)
    (chosen, alloc, _), info = calibrate(fraction, propose, lambda c: time_student(c[2]), cfg.latency_rounds)
    if "bound" in info and cfg.depth == "blocks":
        raise UserError(
            f"dropping every block keeps {info['bound']:.3f} of the teacher's latency, timed (target {fraction}); "
            "use depth='mixed' to narrow channels too"
        )
    if not info["met"]:
        warnings.warn(
            f"latency target {fraction}: the nearest student with blocks dropped timed at {info['timed_ratio']:.3f} "
            f"of the teacher (noise ±{info['noise']:.3f}) after {info['rounds']} timed students"
            + (" (one block is the step: try depth='mixed')" if cfg.depth == "blocks" else ""),
            stacklevel=3,
        )
    student = shallower(chosen)
    signal = "penultimate" if cfg.depth == "blocks" else "penultimate-cv"
    if alloc is None:
        alloc = Allocation("latency", fraction, info["timed_ratio"], signal, cfg.depth, {}, {}, {}, chosen)
    alloc.asked, alloc.achieved, alloc.timing = fraction, info["timed_ratio"], info
    alloc.depth, alloc.dropped_blocks = cfg.depth, chosen
    alloc.flops_share = layer_flops_share(teacher, example, list(alloc.kept_fraction) or [p.name for p in plan])
    return student, alloc
