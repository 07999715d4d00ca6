"""Compress to a budget: ``target={"flops": 0.5}`` (or ``"params"``, ``"latency"``), fractions of the teacher's.

:func:`parse_target` validates the target; :func:`plan_target` turns it into
per-layer keep ratios (``keep_overrides``, exact layer names) that
:func:`crossdistill.compress.compress` then runs as usual:

1. sensitivity curves of every pruned layer on the few images and the cost
   one channel saves (:mod:`crossdistill.allocate`);
2. the allocator, given a saving in the cost model, returns kept counts;
3. the real model pruned to those counts is counted (FLOPs, parameters, or
   the latency table of :mod:`crossdistill.latency`), and the saving asked
   of the allocator is bisected until the count lies within ``tolerance``
   of the target (costs are not additive, so the cost model alone misses).

A FLOPs or params target is thus met on the real student within
``tolerance`` (1 %, relative). A latency target is planned on the latency
table and the table's target root-found until the student, timed against
the teacher end to end, lies within max(2 x noise, 0.02) of the target
(:mod:`crossdistill.calibrate`); where narrowing channels cannot get there
(every layer at the lowest floor is still slower), a warning names the
timed bound and ``Allocation.timing["bound"]`` records it.

Default: ``signal="recon-cv"`` with ``alloc_floor=0.4`` (no layer below 0.4 of
its channels; lowered x0.8 per try, with a warning, when the target cannot be
met otherwise), the greedy hull allocator. Chosen on VALIDATION images
(train split, disjoint from the draw; ``benchmarks/select_signal.py``,
``results/target_signal_validation_fashion-mnist.jsonl``), FLOPs 0.5, K=1,
NC re-fit, paired with uniform by seed: VGG-16 +5.3 pt (3 seeds), ResNet-56
-0.2 (2 seeds). The alternatives there: ``recon`` (old default) -12.0 on
VGG-16 (same-image fit and score: late layers look free and are stripped)
and -0.35 on ResNet-56; ``penultimate-cv`` +4.0 / -1.3 at three times the
cost; floor 0.1 or 0.3 -2.3..-2.7 on ResNet-56 (all our signals call stages
1-2 cheap and strip them; the accuracy disagrees); ``greedy`` (NetAdapt-style,
:mod:`crossdistill.greedy`) +1.8 / -2.7, ``magnitude`` -7.7 / -4.8 (one seed
each). Torch-Pruning's own global magnitude pruning with our re-fit stays
level on VGG-16 (+5.4) and ahead on ResNet-56 (+0.75).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .allocate import (
    CurveGrid,
    LayerCurve,
    allocate,
    channel_costs,
    flops_measure,
    max_saving,
    prune_to_counts,
    sensitivity_curves,
)
from .calibrate import calibrate, steady_timing
from .capture import eval_mode, removing
from .config import DEPTHS, TARGET_KINDS, parse_target
from .errors import UserError
from .greedy import follow, greedy_order, layer_grids, steps_saving
from .measure import count_params
from .plan import LayerPlan, make_plan

__all__ = ["TARGET_KINDS", "DEPTHS", "parse_target", "Allocation", "plan_target", "pruned_plan"]


@dataclass
class Allocation:
    kind: str  # flops | params | latency
    asked: float  # fraction of the teacher's
    achieved: float  # fraction counted on the pruned model (latency: in the latency model)
    signal: str
    depth: str
    keep_overrides: dict[str, float]  # exact layer name -> keep ratio, for compress()
    kept_fraction: dict[str, float]  # layer -> kept fraction of its prunable input channels
    flops_share: dict[str, float]  # layer -> share of the teacher's FLOPs (the layer itself)
    dropped_blocks: list[str] = field(default_factory=list)
    searches: int = 0  # real counts taken by the bisection
    # latency: timed_ratio, noise, table_ratio, rounds (students timed), met, and bound (where the target is out
    # of reach: the timed ratio of the fastest student the mode can make) (crossdistill.calibrate)
    timing: dict[str, Any] = field(default_factory=dict)
    floor: float = 0.0  # smallest kept fraction allowed per layer (cfg.alloc_floor, lowered if unreachable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pruned_plan(model: nn.Module, example: torch.Tensor, cfg: Any) -> list[LayerPlan]:
    """The layers ``compress`` would narrow at keep < 1 (with their prunable channels), under ``cfg``'s
    include/exclude. (One call into make_plan, so a change of its signature is changed here only.)"""
    probe = replace(cfg, prune="structured", keep=0.5, keep_overrides={}, refit_unpruned=False)
    plan = make_plan(model, example, probe)
    return [p for p in plan if p.keep is not None]


def layer_flops_share(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Share of the model's Conv/Linear FLOPs (2 per MAC) spent in each named layer."""
    flops: dict[str, float] = {}
    mods = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def hook(m, args, out):
        w = m.weight
        flops[mods[m]] = 2.0 * out.numel() * (w.shape[1] * (w[0, 0].numel() if w.dim() == 4 else 1))

    with removing([m.register_forward_hook(hook) for m in mods]), torch.no_grad(), eval_mode(model):
        model(example)
    total = sum(flops.values()) or 1.0
    return {n: flops.get(n, 0.0) / total for n in names}


@dataclass
class _Budget:
    """What a target is allocated over: the model, its narrowable layers with their curves, and the measure."""

    model: nn.Module
    example: torch.Tensor  # (1, C, H, W)
    plan: list[LayerPlan]
    curves: list[LayerCurve]  # one per planned layer, with channel costs
    measure: Callable[[nn.Module], float]  # model -> the target's quantity (FLOPs, params, table ms)
    steps: list[tuple[str, int]] | None = None  # signal "greedy": its order of steps (crossdistill.greedy)

    def allocate(self, saving: float) -> dict[str, int]:
        return allocate(self.curves, saving) if self.steps is None else follow(self.steps, self.curves, saving)

    def max_saving(self) -> float:
        return max_saving(self.curves) if self.steps is None else steps_saving(self.steps, self.curves)


def _search(
    budget: _Budget, fraction: float, tolerance: float, iterations: int = 30, strict: bool = True
) -> tuple[dict[str, int], float, int]:
    """Bisection on the saving asked of the allocator until measure(pruned) / measure(model) is within
    ``tolerance`` (relative) of ``fraction``; returns (counts, achieved fraction, real counts taken).
    ``strict=False`` (a noisy measure: the latency table) returns the nearest instead of raising."""
    model, example, plan, curves, measure = budget.model, budget.example, budget.plan, budget.curves, budget.measure
    base = measure(model)

    tried: list[tuple[dict[str, int], float]] = []

    def ratio(saving: float) -> tuple[dict[str, int], float]:
        counts = budget.allocate(saving)
        tried.append((counts, measure(prune_to_counts(model, example, plan, counts)) / base))
        return tried[-1]

    hi = budget.max_saving()
    counts_hi, r_hi = ratio(hi)
    if r_hi > fraction * (1 + tolerance):
        if not strict:
            return counts_hi, r_hi, 1
        raise UserError(
            f"the smallest student reachable by narrowing channels (down to alloc_floor) keeps {r_hi:.3f} of "
            f"the teacher (target {fraction}); raise the target, lower alloc_floor, or drop blocks (depth='mixed')"
        )
    lo = 0.0
    best = (counts_hi, r_hi)
    saving = min((1 - fraction) * base, hi)  # the cost model's own answer: exact if costs were additive
    for it in range(1, iterations + 1):
        counts, r = ratio(saving)
        if abs(r - fraction) < abs(best[1] - fraction):
            best = (counts, r)
        if abs(r - fraction) <= tolerance * fraction:
            return counts, r, it + 1
        if r > fraction:
            lo = saving
        else:
            hi = saving
        saving = (lo + hi) / 2
    # coarse layers (a few wide channels) can jump over the window: from the nearest allocation above the
    # target, remove single channels, least error per cost first, while the count stays inside the window
    above = [(r, c) for c, r in tried if r > fraction * (1 + tolerance)]
    if strict and above and abs(best[1] - fraction) > tolerance * fraction:
        r, counts = min(above, key=lambda rc: rc[0])
        counts = dict(counts)
        for _ in range(200):
            options = sorted(
                (_marginal(c, counts[c.name]) / c.cost, c.name)
                for c in curves
                if c.cost > 0 and counts[c.name] > max(1, c.floor)
            )
            for _, name in options:
                trial = {**counts, name: counts[name] - 1}
                r_trial = measure(prune_to_counts(model, example, plan, trial)) / base
                if r_trial >= fraction * (1 - tolerance):
                    counts, r = trial, r_trial
                    break
            else:
                break
            if abs(r - fraction) < abs(best[1] - fraction):
                best = (counts, r)
            if r <= fraction * (1 + tolerance):
                break
    if strict and abs(best[1] - fraction) > tolerance * fraction:
        raise UserError(
            f"could not meet target {fraction} within {tolerance:.0%} (nearest {best[1]:.4f}); "
            "the layers are too coarse: try a nearby target"
        )
    return best[0], best[1], iterations + 1


def _marginal(curve: LayerCurve, count: int) -> float:
    """Error added by removing one more channel at ``count`` (the curve interpolated linearly)."""

    def err(k: int) -> float:
        pts = list(zip(curve.counts, curve.errors, strict=True))  # descending counts
        for (k0, e0), (k1, e1) in zip(pts, pts[1:], strict=False):
            if k1 <= k <= k0:
                return e0 + (e1 - e0) * (k0 - k) / max(k0 - k1, 1)
        return pts[-1][1] + (pts[-1][0] - k)  # below the curve's range: heavily penalised

    return max(err(count - 1) - err(count), 0.0)


def _set_floor(curves: list[LayerCurve], floor: float) -> None:
    for c in curves:
        c.floor = max(1, math.ceil(floor * c.prunable))


def timed_ratio(teacher: nn.Module, student: nn.Module, input_shape: Any, batch: int) -> tuple[float, float]:
    """Student / teacher latency timed alternately (3 rounds): (median ratio, half the spread = noise).

    On one CPU thread the passes are timed on the thread's CPU clock (:func:`crossdistill.measure.cpu_time_pair`:
    what other processes take of the core is not counted, so a loaded machine does not swing the ratio),
    else wall-clock."""
    from .measure import cpu_time_pair, measure_latency_pair

    on_cpu = next(teacher.parameters()).device.type == "cpu"
    pair = cpu_time_pair if on_cpu and torch.get_num_threads() == 1 else measure_latency_pair
    ratios = []
    for _ in range(3):
        t, s = pair(teacher, student, input_shape, batch, warmup=3, repeats=10)
        ratios.append(s / t)
    return sorted(ratios)[1], (max(ratios) - min(ratios)) / 2


def timer_for(teacher: nn.Module, input_shape: Any, batch: int) -> Callable[[nn.Module], tuple[float, float]]:
    """student -> (timed ratio to ``teacher``, noise) on inputs of ``input_shape`` (one image's) at ``batch``;
    :func:`timed_ratio` looked up per call (tests stand a deterministic one in for it)."""
    return lambda student: timed_ratio(teacher, student, tuple(input_shape), batch)


def _calibrate_latency(
    budget: _Budget, fraction: float, cfg: Any, lower_floor: Callable[[], bool]
) -> tuple[dict[str, int], float, dict[str, Any]]:
    """The table's target root-found on the timed ratio (:mod:`crossdistill.calibrate`), up to
    ``cfg.latency_rounds`` timed students. Where a table target is out of reach at the current floor,
    ``lower_floor()`` lowers it (False: at the lowest: the proposal is at its limit)."""
    teacher, example, tol = budget.model, budget.example, cfg.target_tolerance
    base = budget.measure(teacher)

    def propose(asked: float) -> tuple[dict[str, int], float, tuple, bool]:
        counts, table_ratio, searches = _search(budget, asked, tol, strict=False)
        while table_ratio > asked * (1 + tol) and lower_floor():  # table searches: no timing
            counts, table_ratio, searches = _search(budget, asked, tol, strict=False)
        # at the limit: the floor at its lowest and the search returned its largest saving (one count taken)
        at_limit = table_ratio > asked * (1 + tol) and searches == 1
        if at_limit:  # the allocator's largest saving can stop short (a segment the noisy table prices at <= 0)
            floor_counts = {c.name: c.floor for c in budget.curves}
            floor_ratio = budget.measure(prune_to_counts(teacher, example, budget.plan, floor_counts)) / base
            if floor_ratio < table_ratio:
                counts, table_ratio = floor_counts, floor_ratio
        return counts, table_ratio, tuple(sorted(counts.items())), at_limit

    time_student = timer_for(teacher, example.shape[1:], cfg.latency_batch)
    counts, info = calibrate(
        fraction, propose, lambda c: time_student(prune_to_counts(teacher, example, budget.plan, c)), cfg.latency_rounds
    )
    if "bound" in info:
        warnings.warn(
            f"latency target {fraction}: channels alone reach at most {info['bound']:.3f} of the teacher's latency "
            f"on this device (timed at batch {cfg.latency_batch}, noise ±{info['noise']:.3f}, every layer down to "
            "its lowest floor); use depth='mixed' to drop residual blocks too, or raise the target",
            stacklevel=3,
        )
    elif not info["met"]:
        warnings.warn(
            f"latency target {fraction}: the nearest student timed at {info['timed_ratio']:.3f} of the teacher "
            f"(noise ±{info['noise']:.3f}) after {info['rounds']} timed students; raise latency_rounds or "
            "re-run on a quieter machine",
            stacklevel=3,
        )
    return counts, info["timed_ratio"], info


def plan_target(
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: Any,
    measure: Callable[[nn.Module], float] | None = None,
) -> Allocation:
    """Per-layer keep ratios for ``cfg.target`` from the few ``images`` (module docstring).

    ``cfg``: a :class:`~crossdistill.compress.CompressConfig` (target, signal, include/exclude, ...).
    ``measure``: model -> the target's quantity; defaults to FLOPs / parameters, and to the latency
    table of this device for ``latency``.
    """
    kind, fraction = parse_target(cfg.target)
    example = images[:1]
    teacher = teacher.eval()
    custom = measure is not None
    if measure is None:
        if kind == "flops":
            measure = flops_measure(example.shape[1:])
        elif kind == "params":
            measure = lambda m: float(count_params(m))  # noqa: E731
        else:
            from .latency import latency_measure

            measure = latency_measure(example.shape[1:], cfg.latency_batch)
    plan = pruned_plan(teacher, example, cfg)
    if not plan:
        raise UserError("no layer can be narrowed for a target; check --include/--exclude patterns")
    if cfg.signal == "greedy":
        curves = layer_grids(teacher, plan, CurveGrid(min_keep=cfg.alloc_floor, points=8))
    else:
        curves = sensitivity_curves(teacher, images, plan, cfg.signal, batch_size=cfg.batch_size)
    channel_costs(teacher, example, curves, plan, measure)
    budget = _Budget(teacher, example, plan, curves, measure)
    if cfg.signal == "greedy":
        # narrow until the real count is past the target (latency: the table, whose target is rescaled
        # by the calibration, hence the margin), checked on the counts the greedy has reached
        base, stop = measure(teacher), fraction * (0.7 if kind == "latency" else 1 - 3 * cfg.target_tolerance)
        budget.steps = greedy_order(
            teacher, images, plan, curves,
            lambda counts: measure(prune_to_counts(teacher, example, plan, counts)) / base <= stop,
            batch_size=cfg.batch_size,
        )  # fmt: skip
    timing: dict[str, Any] = {}
    # the floor is lowered (x0.8 per try, down to the curves' lowest point) while the target cannot be met
    floor, lowest = cfg.alloc_floor, CurveGrid().min_keep if cfg.signal != "greedy" else cfg.alloc_floor

    def lower_floor() -> bool:
        nonlocal floor
        if floor <= lowest:
            return False
        floor = max(floor * 0.8, lowest)
        _set_floor(curves, floor)
        return True

    while True:
        _set_floor(curves, floor)
        try:
            if kind == "latency" and not custom:
                counts, achieved, timing = _calibrate_latency(budget, fraction, cfg, lower_floor)
                searches = 0
            else:
                counts, achieved, searches = _search(budget, fraction, cfg.target_tolerance)
            break
        except UserError:
            if floor <= lowest:
                raise
            floor = max(floor * 0.8, lowest)
    if floor < cfg.alloc_floor:
        warnings.warn(f"alloc_floor {cfg.alloc_floor} cannot meet the target: lowered to {floor:.3f}", stacklevel=2)
    overrides, kept = {}, {}
    for c in curves:
        k = counts[c.name]
        kept[c.name] = k / c.prunable
        overrides[c.name] = 1.0 if k >= c.prunable else (k + 0.5) / c.prunable  # floor(ratio * n) == k
    share = layer_flops_share(teacher, example, [c.name for c in curves])
    return Allocation(
        kind, fraction, achieved, cfg.signal, cfg.depth, overrides, kept, share, [], searches, timing, floor
    )


def check_achieved(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], cfg: Any) -> dict:
    """The target measured on the real student. FLOPs/params: counted. Latency: teacher and student timed
    alternately at ``cfg.latency_batch`` (3 rounds); ``noise`` is half the spread of the 3 ratios (taken
    again while above ``crossdistill.calibrate.MAX_NOISE``)."""
    from .measure import count_flops

    kind, fraction = parse_target(cfg.target)
    out: dict[str, Any] = {"kind": kind, "asked": fraction}
    if kind == "flops":
        out["achieved"] = count_flops(student, input_shape) / count_flops(teacher, input_shape)
    elif kind == "params":
        out["achieved"] = count_params(student) / count_params(teacher)
    else:
        teacher, student = teacher.cpu().eval(), student.cpu().eval()
        timer = timer_for(teacher, input_shape, cfg.latency_batch)
        out["achieved"], out["noise"] = steady_timing(timer, student)  # re-timed while a load spike shows
        out["batch"] = cfg.latency_batch
    return out


def plot_allocation(allocation: dict[str, Any], path: Any) -> None:
    """allocation.png: kept fraction per pruned layer (bars), each layer's share of the teacher's FLOPs (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    names = list(allocation["kept_fraction"])
    kept = [allocation["kept_fraction"][n] for n in names]
    share = [allocation["flops_share"].get(n, 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 4))
    ax.bar(range(len(names)), kept, color="tab:blue", label="kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction of prunable channels")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), share, "o-", color="tab:red", label="share of teacher FLOPs")
    ax2.set_ylabel("layer's share of the teacher's FLOPs", color="tab:red")
    ax2.set_ylim(0, max(share + [1e-9]) * 1.15)
    asked, achieved = allocation["asked"], allocation["achieved"]
    blocks = allocation.get("dropped_blocks") or []
    title = f"target {allocation['kind']} {asked} (achieved {achieved:.3f}), signal {allocation['signal']}"
    ax.set_title(title + (f", {len(blocks)} blocks dropped" if blocks else ""), fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
