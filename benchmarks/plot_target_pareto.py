"""Pareto plot of the target benchmark: test accuracy vs FLOPs and vs measured latency (bench_target.py cells).

    OMP_NUM_THREADS=1 python benchmarks/plot_target_pareto.py            # time missing students, then plot

Latency: each student's architecture is rebuilt from its row (uniform keep, kept fraction per layer,
dropped blocks) on the seed-0 draw and timed alternately with the teacher (student / teacher, batch
``--batch``), once per (model, target, K, variant): every re-fit of an allocation has the same shape.
The timings go to ``target_latency_fashion-mnist.jsonl`` (resumable); the machine is shared and loaded,
so the ratios carry a few percent of noise. Rows of bench_target.py that carry their own timed ratio
(``latency_ratio``: every newer row, each latency-target row) use it (mean over seeds) instead.
Points: mean accuracy over seeds at K=1, per re-fit; hollow markers: latency-target cells.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import RESULTS, append_jsonl, machine, read_jsonl, teacher_path

from crossdistill.allocate import prune_to_counts
from crossdistill.blockdrop import drop_blocks
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import load_few_shot
from crossdistill.files import atomic_write
from crossdistill.measure import measure_latency_pair
from crossdistill.plan import keep_count
from crossdistill.target import pruned_plan

KEYS = ("model", "target", "k", "variant")
FAMILY = {"uniform": "uniform", "blocks": "block drop", "mixed": "mixed", "mixed-insample": "mixed (old, in-sample)"}


def family(variant: str) -> str:
    return FAMILY.get(variant, "Torch-Pruning" if variant.startswith("tp-") else f"allocated ({variant[6:]})")


def architecture(teacher, images, row: dict):
    """The student's shape (random re-fit-free weights do not matter for timing)."""
    model = drop_blocks(teacher, row["dropped_blocks"], images) if row.get("dropped_blocks") else teacher
    plan = pruned_plan(model, images[:1], CompressConfig())
    counts = {}
    for p in plan:
        n = p.prunable(model)
        if "keep" in row:
            counts[p.name] = keep_count(n, row["keep"])
        elif p.name in row.get("kept_fraction", {}):
            counts[p.name] = max(1, round(row["kept_fraction"][p.name] * n))
    return prune_to_counts(model, images[:1], plan, counts)


def time_students(rows: list[dict], out: Path, batch: int) -> None:
    done = {tuple(r[k] for k in KEYS) for r in read_jsonl(out)}
    teachers: dict = {}
    for row in rows:
        key = tuple(row[k] for k in KEYS)
        if key in done or row["seed"] != 0 or row["refit"] == "none" or "latency_ratio" in row:
            continue
        if row["model"] not in teachers:
            teachers[row["model"]] = load_checkpoint(teacher_path(row["model"], row["dataset"]))[0].eval()
        teacher = teachers[row["model"]]
        images, _ = load_few_shot(row["dataset"], row["k"], 0)
        student = architecture(teacher, images, row)
        t, s = measure_latency_pair(teacher, student, images.shape[1:], batch, 2, 7)
        env = {**machine(), "note": "shared 2-core machine, loaded by other jobs"}
        append_jsonl(out, {**dict(zip(KEYS, key, strict=True)), "latency_ratio": s / t, "batch": batch, "machine": env})
        done.add(key)
        print(*key, f"latency {s / t:.3f}", flush=True)


def plot(rows: list[dict], latency: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = {tuple(r[k] for k in KEYS): r["latency_ratio"] for r in latency}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["refit"] != "none" and r["k"] == 1:
            kind = r.get("target_kind", "flops")
            groups.setdefault((r["model"], kind, r["target"], r["k"], r["variant"], r["refit"]), []).append(r)
    models = sorted({g[0] for g in groups})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    colours: dict[str, str] = {}
    for i, model in enumerate(models):
        for (m, kind, target, k, variant, refit), g in sorted(groups.items()):
            if m != model:
                continue
            fam = family(variant)
            colour = colours.setdefault(fam, f"C{len(colours)}")
            acc = statistics.mean(r["accuracy"] * 100 for r in g)
            flops = statistics.mean(r["flops_fraction"] for r in g)
            style = {"color": colour, "marker": "o" if refit == "nc" else "^", "alpha": 0.85}
            if kind == "latency":
                style = {**style, "facecolors": "none", "edgecolors": colour}
                del style["color"]
            axes[i][0].scatter(flops, acc, **style)
            timed = [r["latency_ratio"] for r in g if "latency_ratio" in r]
            if timed:
                axes[i][1].scatter(statistics.mean(timed), acc, **style)
            elif (m, target, k, variant) in lat:
                axes[i][1].scatter(lat[(m, target, k, variant)], acc, **style)
        for j, xlabel in enumerate(("FLOPs / teacher's", "measured latency / teacher's (CPU, 1 thread)")):
            axes[i][j].set_xlabel(xlabel)
            axes[i][j].set_ylabel("test accuracy (%), K=1, mean of seeds")
            axes[i][j].set_title(model, fontsize=10)
            axes[i][j].grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="s", ls="", label=f) for f, c in colours.items()]
    handles += [
        plt.Line2D([], [], color="k", marker=mk, ls="", label=lab) for mk, lab in (("o", "NC"), ("^", "Ours-S"))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS / "target_fashion-mnist.jsonl"))
    ap.add_argument("--latency", default=str(RESULTS / "target_latency_fashion-mnist.jsonl"))
    ap.add_argument("--out", default=str(RESULTS / "target_pareto.png"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-timing", action="store_true", help="plot only, from the latency file as it is")
    args = ap.parse_args()
    rows = read_jsonl(Path(args.results))
    if not args.no_timing:
        time_students(rows, Path(args.latency), args.batch)
    plot(rows, read_jsonl(Path(args.latency)), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
