"""Choose the allocation signal of a FLOPs target on VALIDATION images (never test), resumable JSONL.

    OMP_NUM_THREADS=1 python benchmarks/select_signal.py --models vgg16 resnet56 --seeds 0 1 2

Per (model, FLOPs target, K, seed), every variant sees the same few-shot draw and is scored by top-1
accuracy on ``--val-per-class`` images per class of the TRAIN split, disjoint from that draw
(:func:`crossdistill.data.load_validation`); the test split is never loaded. Variants:

- ``uniform``: one keep ratio (bench_target.uniform_keep);
- ``alloc-<signal>[@<floor>]``: :func:`crossdistill.target.plan_target` with a signal of
  :data:`crossdistill.config.SIGNALS` (and ``alloc_floor``: smallest kept fraction of a layer);
- ``tp-magnitude`` / ``tp-magnitude-counts``: Torch-Pruning's global magnitude pruning at the same FLOPs
  with our re-fit of its channels / of its per-layer counts (bench_target).

A ``+<criterion>`` suffix (``+norm``) re-fits with that ``channel_criterion`` (which channels the
solver removes) instead of the default ``energy``.

Each re-fitted with ``--refits`` (default nc and ours-s). ``--summary`` prints mean accuracy and the
paired difference to uniform per (model, variant, re-fit), and writes it next to the JSONL (.md).
Variants named ``@<floor>`` (all cells but ResNet-56 seed 2) sampled the curves from the floor up; now a clamp
on curves sampled from 0.1 (crossdistill.allocate), which moves the hull's segments slightly.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from bench_target import overrides_for, tp_allocation, uniform_keep
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path, validation_draws
from tables import header, publish

from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig, compress
from crossdistill.config import SIGNALS
from crossdistill.data import dataset_info
from crossdistill.evaluate import accuracy, count_flops
from crossdistill.target import plan_target, pruned_plan

VARIANTS = ["uniform", *(f"alloc-{s}" for s in SIGNALS), "tp-magnitude", "tp-magnitude-counts"]
KEYS = ("model", "target", "k", "seed", "variant", "refit")


def allocation(variant: str, teacher, images, plan, base_cfg, fraction: float) -> tuple[dict, dict]:
    """(keep_overrides, kept_channels) of one variant at FLOPs ``fraction``."""
    example = images[:1]
    if variant == "uniform":
        keep = uniform_keep(teacher, example, plan, fraction)
        return {p.name: keep for p in plan}, {}
    if variant.startswith("alloc-"):
        cfg = copy.deepcopy(base_cfg)
        signal, _, floor = variant.removeprefix("alloc-").partition("@")
        cfg.target, cfg.signal, cfg.alloc_floor = {"flops": fraction}, signal, float(floor or cfg.alloc_floor)
        return plan_target(teacher, images, cfg).keep_overrides, {}
    kept = tp_allocation(teacher, images, plan, "magnitude", fraction)
    overrides = overrides_for(teacher, plan, kept)
    own = {n: c for n, c in kept.items() if overrides[n] < 1} if variant == "tp-magnitude" else {}
    return overrides, own


def run_cells(args) -> None:
    out = Path(args.out)
    done = {tuple(r[k] for k in KEYS) for r in read_jsonl(out)}
    info = dataset_info(args.dataset)
    env = {**machine(), "note": "shared 2-core machine, loaded by other jobs"}
    for seed, k, images, _, vx, vy in validation_draws(info, args.seeds, args.ks, args.val_per_class):
        for model_name in args.models:
            teacher, _ = load_checkpoint(teacher_path(model_name, info.name))
            teacher.eval()
            base_cfg = CompressConfig(mu=official_mu(model_name))
            plan = pruned_plan(teacher, images[:1], base_cfg)
            shape = images.shape[1:]
            base = count_flops(teacher, shape)
            for fraction in args.targets:
                for variant in args.variants:
                    todo = [r for r in args.refits if (model_name, fraction, k, seed, variant, r) not in done]
                    if not todo:
                        continue
                    t0 = time.perf_counter()
                    alloc_variant, _, criterion = variant.partition("+")
                    overrides, own = allocation(alloc_variant, teacher, images, plan, base_cfg, fraction)
                    alloc_s = time.perf_counter() - t0
                    for refit in todo:
                        cfg = copy.deepcopy(base_cfg)
                        cfg.method, cfg.keep_overrides, cfg.kept_channels = refit, overrides, own
                        cfg.channel_criterion = criterion or cfg.channel_criterion
                        t1 = time.perf_counter()
                        student, _ = compress(teacher, images, cfg)
                        row = {
                            "model": model_name, "dataset": info.name, "target": fraction, "k": k, "seed": seed,
                            "variant": variant, "refit": refit, "val_accuracy": accuracy(student, vx, vy),
                            "val_images": len(vy), "flops_fraction": count_flops(student, shape) / base,
                            "alloc_seconds": alloc_s, "refit_seconds": time.perf_counter() - t1,
                            "keep_overrides": overrides,
                            "machine": env,
                        }  # fmt: skip
                        append_jsonl(out, row)
                        print(f"{model_name} {fraction} K={k} seed={seed} {variant} {refit} "
                              f"val {row['val_accuracy']:.4f} flops {row['flops_fraction']:.3f} "
                              f"({alloc_s:.0f}+{row['refit_seconds']:.0f} s)", flush=True)  # fmt: skip


def summary(out: Path) -> str:
    rows = read_jsonl(out)
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["target"], r["k"], r["variant"], r["refit"]), {})[r["seed"]] = (
            r["val_accuracy"] * 100
        )
    lines = [
        *header("model", "FLOPs", "K", "variant", "re-fit", "val accuracy", "seeds", "Δ vs uniform (paired)"),
    ]
    for key in sorted(groups, key=lambda g: (g[0], g[1], g[2], g[4], -statistics.mean(groups[g].values()))):
        accs = groups[key]
        uni = groups.get((*key[:3], "uniform", key[4]), {})
        diffs = [a - uni[s] for s, a in accs.items() if s in uni]
        delta = f"{statistics.mean(diffs):+.2f}" if diffs and key[3] != "uniform" else "-"
        lines.append(f"| {' | '.join(map(str, key))} | {statistics.mean(accs.values()):.2f} | {len(accs)} | {delta} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5])
    ap.add_argument("--ks", nargs="+", type=int, default=[1])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--refits", nargs="+", default=["nc", "ours-s"])
    ap.add_argument("--val-per-class", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "target_signal_validation_fashion-mnist.jsonl"))
    ap.add_argument("--summary", action="store_true", help="only print the summary table of --out")
    args = ap.parse_args()
    if args.summary:  # printed and written next to the JSONL
        first = "# Allocation signal on validation images (select_signal.py)\n\n"
        publish(Path(args.out).with_suffix(".md"), summary(Path(args.out)), first)
        return
    run_cells(args)


if __name__ == "__main__":
    main()
