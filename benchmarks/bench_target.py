"""Compress to a FLOPs or latency target: uniform vs allocated vs Torch-Pruning's global pruning (resumable JSONL).

    OMP_NUM_THREADS=1 python benchmarks/bench_target.py --models resnet56 --targets 0.5 latency:0.5 --ks 1

A target is ``0.5`` (FLOPs, the default kind) or ``latency:0.5``. Per (model, target, K, seed), every
variant sees the same few-shot draw:

- ``uniform``: one keep ratio for every pruned layer, the one (on a 1/256 grid)
  whose FLOPs come nearest the target; latency target: the one whose TIMED ratio comes nearest (below);
- ``alloc-<signal>``: per-layer keeps from :func:`crossdistill.target.plan_target` with that
  sensitivity signal: ``alloc-recon-cv`` is the library default (cross-fitted, ``alloc_floor`` 0.4,
  chosen on validation images by ``select_signal.py``); ``alloc-recon`` / ``alloc-penultimate`` keep
  the floor of their first cells (0.1, the curves' lowest point) so old and new cells compare;
- ``blocks`` / ``mixed``: residual blocks dropped (alone / with channels),
  :mod:`crossdistill.blockdrop` (models with residual blocks only); ``mixed`` is the library's
  mixed mode (cross-fitted ranking, default signal); ``mixed-insample`` rows are the earlier mode
  (in-sample penultimate ranking, which never dropped a block);
- ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning's MetaPruner with
  ``global_pruning=True`` over the same coupled groups our plan narrows
  (every other layer in ``ignored_layers``), importance L2 magnitude or
  Taylor (gradients of the cross-entropy against the teacher's own
  predictions on the few images: label-free); its pruning ratio bisected to
  the FLOPs target (latency target: the ratio whose TIMED ratio comes nearest,
  below). Without re-fit (``refit=none``: channels removed, weights
  as they are) and with our re-fit of exactly its kept channels;
- ``tp-magnitude-counts``: Torch-Pruning's per-layer counts, our channel
  selection and re-fit (separates its allocation from its channel choice).

Each allocation is re-fitted with ``nc`` and ``ours-s``. Accuracy on the full
test split (or ``--test-limit``). Latency: student and teacher timed alternately at batch
``LATENCY_BATCH`` (one thread), once per architecture (blocks / mixed at a latency target: per re-fit,
each compress() calibrates on its own timings); latency targets record the median of 3
alternately timed ratios and half their spread (``latency_noise``; taken again, up to twice, while
above ``crossdistill.calibrate.MAX_NOISE``: a load spike), and the FLOPs reached. Every
variant of a latency target is compared at equal MEASURED latency: the library's allocations run on this
device's latency table with the table's target root-found on the student timed against the teacher
(:mod:`crossdistill.calibrate`, ``plan_target`` / ``plan_blocks``); uniform and TP go through the same
calibration: the table target they are bisected to (uniform's keep, TP's global ratio) is root-found
until the student, timed against the teacher, is within max(2 x noise, 0.02) of the target, else the
one timed nearest is kept (``timing`` in the row: timed and table ratios, students timed, ``bound``
where nothing they can reach is fast enough). The table alone under-predicts (ResNet-56: what channels
cannot shrink, ``probe_latency_bound.py``).
Then ``python benchmarks/bench_target.py --table`` writes the markdown table next to the JSONL.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path
from tables import header, mean_std, publish
from torch import nn

from crossdistill.allocate import prune_to_counts
from crossdistill.calibrate import calibrate, steady_timing
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig, compress
from crossdistill.data import dataset_info, load_dataset, load_few_shot
from crossdistill.errors import UserError
from crossdistill.evaluate import count_flops
from crossdistill.latency import latency_measure
from crossdistill.measure import measure_latency_pair
from crossdistill.plan import keep_count
from crossdistill.pruning import ChannelRemover
from crossdistill.target import plan_target, pruned_plan, timer_for
from crossdistill.train import accuracy

VARIANTS = [
    "uniform", "alloc-recon-cv", "alloc-recon", "alloc-penultimate", "blocks", "mixed", "tp-magnitude", "tp-taylor",
    "tp-magnitude-counts",
]  # fmt: skip


LATENCY_BATCH = 16  # student / teacher time, alternately timed once per allocation (loaded machine: noisy)


def flops_fraction(model: nn.Module, shape, base: float) -> float:
    return count_flops(model, shape) / base


def uniform_counts(teacher, plan, keep: float) -> dict[str, int]:
    return {p.name: keep_count(p.prunable(teacher), keep) for p in plan}


def uniform_keep(teacher, example, plan, fraction: float, measure) -> float:
    """The keep ratio on a 1/256 grid whose uniformly pruned model's ``measure`` comes nearest ``fraction``."""
    base = measure(teacher)
    best = (float("inf"), 1.0)
    lo, hi = 1, 256  # FLOPs grow with keep: bisection, then the nearer neighbour
    while lo < hi:
        mid = (lo + hi) // 2
        counts = uniform_counts(teacher, plan, mid / 256)
        r = measure(prune_to_counts(teacher, example, plan, counts)) / base
        best = min(best, (abs(r - fraction), mid / 256))
        if r < fraction:
            lo = mid + 1
        else:
            hi = mid
    return best[1]


def tp_channels(teacher, images, plan, importance: str, ratio: float) -> dict[str, list[int]]:
    """Input channels of each plan layer that Torch-Pruning's global pruning keeps at ``ratio``."""
    model = copy.deepcopy(teacher).eval()
    names = {m: n for n, m in model.named_modules()}
    plan_names = {p.name for p in plan}
    remover = ChannelRemover(model, images[:1])
    producers = {out for p in plan for out in remover.coupled_layers(model.get_submodule(p.name))[1]}
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in producers]
    if importance == "taylor":
        imp = tp.importance.TaylorImportance()
        logits = model(images)
        F.cross_entropy(logits, logits.argmax(1).detach()).backward()  # label-free: the teacher's own predictions
    else:
        imp = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(
        model, images[:1], imp, global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.95,
        ignored_layers=ignored,
    )  # fmt: skip
    dropped: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):  # not pruned: only the indices are read
        for item in group:
            name = names.get(item.dep.target.module)
            if name in plan_names and pruner.DG.is_in_channel_pruning_fn(item.dep.handler):
                dropped.setdefault(name, set()).update(int(i) for i in item.idxs)
    return {
        p.name: [j for j in range(teacher.get_submodule(p.name).weight.shape[1]) if j not in dropped.get(p.name, ())]
        for p in plan
    }


def tp_allocation(teacher, images, plan, importance: str, target: tuple) -> dict[str, list[int]]:
    """Bisection on Torch-Pruning's global ratio until ``measure`` comes within 1 % of ``fraction``;
    ``target`` = (fraction, measure)."""
    example = images[:1]
    fraction, measure = target
    base = measure(teacher)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(20):
        ratio = (lo + hi) / 2
        kept = tp_channels(teacher, images, plan, importance, ratio)
        counts = {p.name: _n_prunable_kept(teacher, p, kept[p.name]) for p in plan}
        r = measure(prune_to_counts(teacher, example, plan, counts)) / base
        if best is None or abs(r - fraction) < best[0]:
            best = (abs(r - fraction), kept)
        if abs(r - fraction) <= 0.01 * fraction:
            break
        lo, hi = (ratio, hi) if r > fraction else (lo, ratio)
    return best[1]


def timed_nearest(teacher, example, target: tuple, propose) -> tuple:
    """A baseline at a latency target ``target`` = (fraction, table measure): ``propose(asked)`` -> (its
    allocation, the pruned model) for a table target ``asked``, which the library's calibration
    root-finds on the student timed against the teacher (:func:`crossdistill.calibrate.calibrate`, the
    library's default rounds): (the allocation timed nearest ``fraction``, the calibration's record)."""
    fraction, measure = target
    time_student = timer_for(teacher, example.shape[1:], LATENCY_BATCH)
    base = measure(teacher)

    def proposal(asked: float):
        alloc, student = propose(asked)
        key = tuple(tuple(p.shape) for p in student.parameters())  # latency depends on shapes only
        table = measure(student) / base
        return (alloc, student), table, key, table > asked * 1.03  # at the limit: it cannot get as low as asked

    (alloc, _), info = calibrate(fraction, proposal, lambda c: time_student(c[1]), CompressConfig().latency_rounds)
    return alloc, info


def uniform_timed(teacher, example, plan, target: tuple) -> tuple[float, dict]:
    """Uniform's keep at a latency target: the one whose timed ratio comes nearest (:func:`timed_nearest`)."""

    def propose(asked: float):
        keep = uniform_keep(teacher, example, plan, asked, target[1])
        return keep, prune_to_counts(teacher, example, plan, uniform_counts(teacher, plan, keep))

    return timed_nearest(teacher, example, target, propose)


def tp_timed(teacher, images, plan, importance: str, target: tuple) -> tuple[dict[str, list[int]], dict]:
    """Torch-Pruning's channels at a latency target: the global ratio whose timed ratio comes nearest."""
    example = images[:1]

    def propose(asked: float):
        kept = tp_allocation(teacher, images, plan, importance, (asked, target[1]))
        counts = {p.name: _n_prunable_kept(teacher, p, kept[p.name]) for p in plan}
        return kept, prune_to_counts(teacher, example, plan, counts)

    return timed_nearest(teacher, example, target, propose)


def _n_prunable_kept(teacher, p, kept: list[int]) -> int:
    prunable = set(p.channels) if p.channels is not None else None
    return len(kept) if prunable is None else len([j for j in kept if j in prunable])


def remove_channels(teacher, example, kept: dict[str, list[int]]) -> nn.Module:
    student = copy.deepcopy(teacher).eval()
    remover = ChannelRemover(student, example)
    for name, ch in kept.items():
        remover.remove_input_channels(name, torch.tensor(ch))
    return student


def overrides_for(teacher, plan, kept: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for p in plan:
        n = p.prunable(teacher)
        k = _n_prunable_kept(teacher, p, kept[p.name])
        out[p.name] = 1.0 if k >= n else (k + 0.5) / n
    return out


def parse_target_arg(text: str) -> tuple[str, float]:
    """``0.5`` -> ("flops", 0.5); ``latency:0.5`` -> ("latency", 0.5)."""
    kind, _, value = text.rpartition(":")
    return kind or "flops", float(value)


def target_measure(kind: str, shape):
    """model -> the target's quantity: FLOPs, or this device's latency-table ms at ``LATENCY_BATCH``."""
    if kind == "flops":
        return lambda m: float(count_flops(m, shape))
    return latency_measure(shape, LATENCY_BATCH)


def time_student(teacher, student, shape, kind: str) -> dict:
    """Student / teacher latency timed alternately: once (FLOPs cells), or 3 rounds with the noise (latency)."""
    if kind == "latency":  # re-timed while noisier than MAX_NOISE (a load spike), as the calibration does
        ratio, noise = steady_timing(timer_for(teacher, shape, LATENCY_BATCH), student)
        return {"latency_ratio": ratio, "latency_noise": noise, "latency_batch": LATENCY_BATCH}
    t, s = measure_latency_pair(teacher, student, shape, LATENCY_BATCH, 2, 7)
    return {"latency_ratio": s / t, "latency_batch": LATENCY_BATCH}


def run_cells(args) -> None:
    out = Path(args.out)
    keys = ("model", "target_kind", "target", "k", "seed", "variant", "refit")
    done = {tuple(r.get(k, "flops") for k in keys) for r in read_jsonl(out)}  # rows before latency: flops
    info = dataset_info(args.dataset)
    test = load_dataset(info.name, "test")
    if args.test_limit:
        test.images, test.labels = test.images[: args.test_limit], test.labels[: args.test_limit]
    env = {**machine(), "tp": tp.__version__, "note": "shared 2-core machine, loaded by other jobs"}
    for model_name in args.models:
        teacher, meta = load_checkpoint(teacher_path(model_name, info.name))
        teacher.eval()
        for kind, fraction in map(parse_target_arg, args.targets):
            for k in args.ks:
                for seed in args.seeds:
                    images, _ = load_few_shot(info.name, k, seed)
                    example = images[:1]
                    shape = example.shape[1:]
                    base = count_flops(teacher, shape)
                    measure = target_measure(kind, shape)
                    for variant in args.variants:
                        tp_own = variant in ("tp-magnitude", "tp-taylor")  # its own channels: also without re-fit
                        refits = ["none", *args.refits] if tp_own else args.refits
                        todo = [r for r in refits if (model_name, kind, fraction, k, seed, variant, r) not in done]
                        if not todo:
                            continue
                        t0 = time.perf_counter()
                        base_cfg = CompressConfig(mu=official_mu(model_name))
                        plan = pruned_plan(teacher, example, base_cfg)
                        extra: dict = {}
                        kept_channels: dict[str, list[int]] = {}
                        dropped: list[str] = []
                        if variant == "uniform" and kind == "latency":  # the keep whose timed ratio is nearest
                            keep, extra["timing"] = uniform_timed(teacher, example, plan, (fraction, measure))
                            overrides = {p.name: keep for p in plan}
                            extra["keep"] = keep
                        elif variant == "uniform":
                            keep = uniform_keep(teacher, example, plan, fraction, measure)
                            overrides = {p.name: keep for p in plan}
                            extra["keep"] = keep
                        elif variant.startswith("alloc-"):
                            cfg = copy.deepcopy(base_cfg)
                            cfg.target, cfg.latency_batch = {kind: fraction}, LATENCY_BATCH
                            cfg.signal = variant.removeprefix("alloc-")
                            if cfg.signal in ("recon", "penultimate"):
                                cfg.alloc_floor = 0.1
                            alloc = plan_target(teacher, images, cfg)
                            overrides = alloc.keep_overrides
                            extra["kept_fraction"] = alloc.kept_fraction
                            extra["timing"] = alloc.timing
                        elif variant in ("blocks", "mixed"):  # compress() drops the blocks itself
                            try:
                                from crossdistill.blockdrop import residual_blocks

                                residual_blocks(teacher)
                            except UserError as e:
                                print(f"{model_name} {variant}: {e}", flush=True)
                                continue
                            overrides = {}
                        else:  # tp-*: Torch-Pruning's channels; tp-*-counts: its per-layer counts, our channels
                            importance = variant.removeprefix("tp-").removesuffix("-counts")
                            if kind == "latency":  # the global ratio whose timed ratio is nearest
                                kept_channels, extra["timing"] = tp_timed(teacher, images, plan, importance,
                                                                          (fraction, measure))  # fmt: skip
                            else:
                                kept_channels = tp_allocation(teacher, images, plan, importance, (fraction, measure))
                            overrides = overrides_for(teacher, plan, kept_channels)
                            extra["kept_fraction"] = {
                                p.name: _n_prunable_kept(teacher, p, kept_channels[p.name]) / p.prunable(teacher)
                                for p in plan
                            }
                        alloc_seconds = time.perf_counter() - t0
                        latency: dict = {}  # the same architecture for every re-fit: timed once
                        for refit in todo:
                            t1 = time.perf_counter()
                            if refit == "none":
                                student = remove_channels(teacher, example, kept_channels)
                            else:
                                cfg = copy.deepcopy(base_cfg)
                                cfg.method = refit
                                if variant in ("blocks", "mixed"):
                                    cfg.target, cfg.depth = {kind: fraction}, variant
                                    cfg.latency_batch = LATENCY_BATCH
                                else:
                                    cfg.keep_overrides = overrides
                                    if tp_own:
                                        cfg.kept_channels = {n: c for n, c in kept_channels.items() if overrides[n] < 1}
                                student, report = compress(teacher, images, cfg)
                                if report.allocation is not None:
                                    dropped = report.allocation["dropped_blocks"]
                                    extra["kept_fraction"] = report.allocation["kept_fraction"]
                                    if report.allocation.get("timing"):
                                        extra["timing"] = report.allocation["timing"]
                            seconds = time.perf_counter() - t1 + alloc_seconds
                            acc = accuracy(student, test.images, test.labels, info)
                            # blocks / mixed at a latency target: each re-fit's compress() calibrates on its
                            # own timing, so the architecture may differ per re-fit: timed each
                            retime = kind == "latency" and variant in ("blocks", "mixed")
                            if (not latency or retime) and (refit != "none" or kind == "latency"):
                                latency = time_student(teacher, student, shape, kind)
                            row = {
                                "model": model_name, "dataset": info.name, "target_kind": kind, "target": fraction,
                                "k": k, "seed": seed, "variant": variant, "refit": refit, "accuracy": acc,
                                "flops_fraction": flops_fraction(student, shape, base),
                                "params": sum(p.numel() for p in student.parameters()),
                                "teacher_accuracy": meta["test_accuracy"], "dropped_blocks": dropped,
                                "test_images": len(test.labels), "seconds": seconds, "machine": env, **extra,
                                **latency,
                            }  # fmt: skip
                            append_jsonl(out, row)
                            msg = f"acc {acc:.4f} flops {row['flops_fraction']:.3f} ({seconds:.0f} s)"
                            if kind == "latency":
                                msg += f" latency {row['latency_ratio']:.3f} ± {row['latency_noise']:.3f}"
                            cell = f"{model_name} {kind} {fraction} K={k} seed={seed} {variant} {refit}"
                            print(f"{cell} {msg}", flush=True)


def _paired(g: list[dict], other: list[dict]) -> str:
    """Mean paired difference (points) of ``g`` to ``other`` on the seeds both have, and how many."""
    by_seed = {r["seed"]: r["accuracy"] * 100 for r in other}
    diffs = [r["accuracy"] * 100 - by_seed[r["seed"]] for r in g if r["seed"] in by_seed]
    return f"{statistics.mean(diffs):+.2f} ({len(diffs)})" if diffs else "-"


def table(out: Path) -> str:
    rows = read_jsonl(out)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], r.get("target_kind", "flops"), r["target"], r["k"], r["variant"], r["refit"])
        groups.setdefault(key, []).append(r)
    lines = header(
        "model", "target", "K", "variant", "re-fit", "accuracy (mean ± std)", "seeds", "Δ vs uniform (paired)",
        "Δ vs tp-magnitude (paired)", "FLOPs achieved", "latency achieved (timed, ± noise)",
    )  # fmt: skip
    for key in sorted(groups):
        g = groups[key]
        model, kind, target, k, variant, refit = key
        accs = [r["accuracy"] * 100 for r in g]
        fl = statistics.mean(r["flops_fraction"] for r in g)
        # same seeds, same re-fit
        uni = _paired(g, groups.get((*key[:4], "uniform", refit), [])) if variant != "uniform" else "-"
        tpm = _paired(g, groups.get((*key[:4], "tp-magnitude", refit), [])) if variant != "tp-magnitude" else "-"
        timed = [r["latency_ratio"] for r in g if "latency_ratio" in r]
        noise = [r["latency_noise"] for r in g if "latency_noise" in r]
        lat = f"{statistics.mean(timed):.3f}" if timed else "-"
        lat += f" ± {statistics.mean(noise):.3f}" if noise else ""
        acc = mean_std(accs, scale=1.0, std_of_one=True)
        cells = [model, f"{kind} {target}", k, variant, refit, acc, len(g), uni, tpm, f"{fl:.3f}", lat]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet56"])
    ap.add_argument("--targets", nargs="+", default=["0.5"], help="0.5 (FLOPs) or latency:0.5")
    ap.add_argument("--ks", nargs="+", type=int, default=[1])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--refits", nargs="+", default=["nc", "ours-s"])
    ap.add_argument("--test-limit", type=int, default=0, help="first N test images only (0: all)")
    ap.add_argument("--out", default=str(RESULTS / "target_fashion-mnist.jsonl"))
    ap.add_argument("--table", action="store_true", help="only write the markdown table of --out")
    args = ap.parse_args()
    if args.table:
        first = "# Compress to a FLOPs or latency target (bench_target.py)\n\n"
        publish(Path(args.out).with_suffix(".md"), table(Path(args.out)), first, section="target_table")
        return
    run_cells(args)


if __name__ == "__main__":
    main()
