"""Ridge rule by validation (#13): old default vs ``ridge_per_unknown``, ``ridge_cv``, ``ridge_guard``, a flat ridge.

    OMP_NUM_THREADS=1 python benchmarks/sweep_ridge.py --models resnet56 vgg16 --ks 1 5 --seeds 0 1
    python benchmarks/sweep_ridge.py --summary     # rebuild the markdown summary only

Validation, never test: each (model, K, seed, method, setting) is scored by top-1
accuracy on ``--val-per-class`` images per class drawn from the TRAIN split,
disjoint from that (K, seed)'s few-shot draw (as benchmarks/sweep_hparams.py).
One JSONL row per cell in ``results/sweep_ridge_<dataset>.jsonl``, skipped when present.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path, validation_draws
from sweep_hparams import val_accuracy

from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import dataset_info
from crossdistill.methods import run_method

SETTINGS = {  # name -> CompressConfig fields
    "old": {"ridge": 1e-3, "ridge_per_unknown": 0.0},
    "pu0.3": {"ridge": 1e-3, "ridge_per_unknown": 0.3},
    "pu1": {"ridge": 1e-3, "ridge_per_unknown": 1.0},
    "cv": {"ridge": 1e-3, "ridge_cv": True},
    "guard": {"ridge": 1e-3, "ridge_guard": True},
    "flat0.1": {"ridge": 0.1, "ridge_per_unknown": 0.0},
}
KEYS = ("model", "k", "seed", "method", "setting")


def run(args: argparse.Namespace, out: Path) -> None:
    done = {tuple(r[k] for k in KEYS) for r in read_jsonl(out)}
    info = dataset_info(args.dataset)
    env = {**machine(), "note": "shared 2-core machine, loaded by other jobs"}
    for seed, k, images, labels, vx, vy in validation_draws(info, args.seeds, args.ks, args.val_per_class):
        for model_name in args.models:
            teacher, meta = load_checkpoint(teacher_path(model_name, info.name))
            for method in args.methods:
                for name in args.settings:
                    cell = {"model": model_name, "k": k, "seed": seed, "method": method, "setting": name}
                    if tuple(cell[key] for key in KEYS) in done:
                        continue
                    t0 = time.perf_counter()
                    cfg = CompressConfig(keep=args.keep, mu=official_mu(model_name), **SETTINGS[name])
                    student, _ = run_method(method, teacher, images, labels, cfg)
                    row = {**cell, **SETTINGS[name], "keep": args.keep, "dataset": info.name,
                           "val_images": len(vy), "val_accuracy": val_accuracy(student, vx, vy),
                           "seconds": time.perf_counter() - t0, "teacher_sha256": meta["sha256"],
                           "machine": env}  # fmt: skip
                    append_jsonl(out, row)
                    print(f"{model_name} K={k} seed={seed} {method} {name} val {row['val_accuracy']:.4f} "
                          f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip


def summarize(out: Path, md: Path) -> None:
    """Mean validation accuracy (%) over the seeds present, per (model, K, method) x setting."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in read_jsonl(out):
        acc[(r["model"], r["k"], r["method"])][r["setting"]].append(100 * r["val_accuracy"])
    names = list(SETTINGS)
    lines = [
        "# Ridge rule on validation images (train split, disjoint from the draw; never test)",
        "",
        f"`benchmarks/sweep_ridge.py`, raw rows in `{out.name}`. Structured keep 0.5, lstsq. Settings: "
        + "; ".join(f"`{n}` = {json.dumps(s)}" for n, s in SETTINGS.items())
        + ". Mean validation accuracy (%) over seeds (n = seeds). Shared, loaded 2-core machine.",
        "",
        "| model | K | method | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for (model, k, method), by in sorted(acc.items()):
        cells = [f"{sum(v) / len(v):.2f} (n={len(v)})" if (v := by.get(n)) else "" for n in names]
        lines.append(f"| {model} | {k} | {method} | " + " | ".join(cells) + " |")
    md.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["nc", "ours"])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--summary", action="store_true", help="only rebuild the markdown summary")
    args = ap.parse_args()
    out = RESULTS / f"sweep_ridge_{args.dataset}.jsonl"
    if not args.summary:
        torch.set_num_threads(1)
        run(args, out)
    summarize(out, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
