"""Accuracy grid: every method on Fashion-MNIST (resumable, one JSONL line per cell).

    python benchmarks/bench_accuracy.py --models resnet56 --ks 1 5 --seeds 0 1 2

Every method sees the same few-shot draw for a (K, seed); accuracy is on the
full test split. Cells run seed by seed (every K of seed 0 first), so a grid
cut short still has one complete seed. ``<method>+mir`` (or ``--refine mir``
for every method) runs MiR refinement (crossdistill.mir) after the method;
``mir`` is MiR itself (L1 start). Then run ``python benchmarks/report.py``
to rebuild the tables and plots.

Resuming: each row records every setting that changes its result
(``settings``: the CompressConfig fields, the baseline's hyperparameters,
the MiR settings, all as resolved for that teacher, per-family defaults
included). A cell is skipped only when a row for it with the same settings
and teacher exists, so changed defaults re-run cells instead of silently
reusing them. A setting missing from a stored row counts as its current
default (a field added since, off by default). Rows written before settings
were recorded carry only mu/alpha/beta/solver, plus the baseline's
(``baseline_params``) and MiR's (``mir.config``) where recorded; nc / ours /
ours-s / l1 rows need nothing else (their code paths have not changed since,
benchmarks/results/refactor_check.md). ``--reuse FILE ...``: rows of other
results files that match are copied into ``--out`` (``reused_from``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, ROOT, append_jsonl, machine, official_mu, read_jsonl, teacher_path

from crossdistill.baselines import BASELINES, default_params
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import dataset_info, load_dataset, load_few_shot
from crossdistill.evaluate import accuracy
from crossdistill.methods import run_method
from crossdistill.mir import MirConfig, method_defaults, refine_defaults

CELL = ("model", "prune", "keep", "k", "seed", "method")
LEGACY_METHODS = ("nc", "ours", "ours-s", "l1")  # rows without settings that are still valid (see above)
RECORDED = ("method", "mu", "alpha", "beta", "solver", "prune", "keep")  # CompressConfig fields every row has


# CompressConfig fields read only when a target is given (crossdistill.target), marked in config.py
BUDGET_ONLY = tuple(f.name for f in fields(CompressConfig) if f.metadata.get("budget_only"))


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def settings_of(cfg: CompressConfig, baseline: Any, mir: MirConfig | None) -> dict:
    """Every setting that changes a cell's result, JSON-normalised."""
    compress = {k: v for k, v in asdict(cfg).items() if k not in ("mir", "device")}
    if cfg.target is None:  # how a budget is allocated changes nothing when there is no budget
        compress = {k: v for k, v in compress.items() if k not in BUDGET_ONLY}
    return _json({"compress": compress, "baseline": baseline and asdict(baseline), "mir": mir and asdict(mir)})


def stored_settings(row: dict) -> dict:
    """A row's settings; for rows written before they were recorded, what the row says (see the docstring)."""
    if "settings" in row:
        return row["settings"]
    base = row["method"].removesuffix("+mir").removesuffix("+refit")
    compress = {k: row[k] for k in RECORDED if k in row} | {"method": base}
    if "baseline_params" in row:
        baseline = row["baseline_params"]
    else:
        baseline = {} if base in BASELINES and base in LEGACY_METHODS else None
    mir = row["mir"]["config"] if "mir" in row else None
    return {"compress": compress, "baseline": baseline, "mir": mir}


def _same(stored: dict | None, current: dict | None, default: dict) -> bool:
    if stored is None or current is None:
        return stored is current
    for key in set(stored) | set(current):
        if key not in stored:  # added since, or not recorded: must be at its default
            if current[key] != default.get(key):
                return False
        elif key in current and stored[key] != current[key]:
            return False
    return True


def matches(row: dict, current: dict, defaults: dict) -> bool:
    """Same settings (missing ones counting as defaults) as ``current``."""
    stored = stored_settings(row)
    if stored["compress"].get("refine") is None and "+mir" in row["method"]:  # old rows: the name says it
        stored["compress"]["refine"] = "mir"
    if "+refit" in row["method"] and "unpruned_objective" not in stored["compress"]:
        stored["compress"]["unpruned_objective"] = "nc"
    return all(_same(stored[s], current[s], defaults[s] or {}) for s in ("compress", "baseline", "mir"))


def code_version() -> str:
    """git commit of the code that ran (+ "-dirty" with uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "crossdistill"], cwd=ROOT, capture_output=True, text=True
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["nc", "ours", "ours-s"])
    ap.add_argument("--prunes", nargs="+", default=["structured:0.5", "unstructured:0.1"], help="kind:keep")
    ap.add_argument("--solver", default="lstsq")
    ap.add_argument(
        "--mu", type=float, default=None, help="mu of ours (default: official per family); sweep with ours only"
    )
    ap.add_argument("--refine", default=None, choices=["mir"], help="refine every method (rows named <method>+mir)")
    ap.add_argument("--mir-steps", type=int, default=None, help="MiR steps (default: the family's)")
    ap.add_argument("--mir-lr", type=float, default=None, help="MiR Adam lr (default: the family's)")
    ap.add_argument("--out", default=None, help="results file (default results/accuracy_<dataset>.jsonl)")
    ap.add_argument("--reuse", nargs="*", default=[], help="other results files whose matching rows are reused")
    ap.add_argument("--dry-run", action="store_true", help="only list the cells: done / reused / to run")
    ap.add_argument("--reuse-only", action="store_true", help="only copy the matching --reuse rows, run nothing")
    args = ap.parse_args()

    out = RESULTS / f"accuracy_{args.dataset}.jsonl" if args.out is None else Path(args.out)
    sources = [(out, r) for r in read_jsonl(out)] + [(Path(f), r) for f in args.reuse for r in read_jsonl(Path(f))]
    rows: dict[tuple, list[tuple[Path, dict]]] = {}
    for src, r in sources:
        rows.setdefault(tuple(r[key] for key in CELL), []).append((src, r))
    info = dataset_info(args.dataset)
    test = load_dataset(info.name, "test")
    env = machine()
    code = code_version()
    methods = [m if args.refine is None or m == "mir" else f"{m}+mir" for m in args.methods]
    for model_name in args.models:
        path = teacher_path(model_name, info.name)
        if not path.exists():
            print(f"skip {model_name}: no teacher at {path}")
            continue
        teacher, meta = load_checkpoint(path)
        mu = official_mu(model_name) if args.mu is None else args.mu
        for seed in args.seeds:
            for k in args.ks:
                images, labels = None, None
                for spec in args.prunes:
                    prune, keep = spec.split(":")
                    keep = float(keep)
                    for method in methods:
                        # "<method>+refit": unpruned layers re-fitted with L^r (unpruned_objective="nc")
                        # "<method>+mir": MiR refinement after the method
                        base, refine = method.removesuffix("+mir"), method.endswith("+mir")
                        base, refit = base.removesuffix("+refit"), base.endswith("+refit")
                        if base in BASELINES and prune == "unstructured" and not BASELINES[base].unstructured:
                            continue
                        # the settings this cell runs with: the family's defaults unless given here
                        mir_cfg = method_defaults(teacher) if base == "mir" else refine_defaults(teacher)
                        mir_cfg.steps = mir_cfg.steps if args.mir_steps is None else args.mir_steps
                        mir_cfg.lr = mir_cfg.lr if args.mir_lr is None else args.mir_lr
                        mir_cfg = mir_cfg if refine or base == "mir" else None
                        hp = default_params(base, teacher) if base in BASELINES and base != "mir" else None
                        cfg = CompressConfig(
                            method=base, mu=mu, prune=prune, keep=keep, solver=args.solver,
                            unpruned_objective="nc" if refit else "same", refine="mir" if refine else None,
                            mir=mir_cfg,
                        )  # fmt: skip
                        settings = settings_of(cfg, hp, mir_cfg)
                        defaults = settings_of(CompressConfig(), hp and type(hp)(), mir_cfg and MirConfig())
                        cell = (model_name, prune, keep, k, seed, method)
                        found = [
                            (src, r)
                            for src, r in rows.get(cell, [])
                            if r.get("teacher_sha256") == meta["sha256"] and matches(r, settings, defaults)
                        ]
                        if args.dry_run:
                            what = "to run" if not found else "done" if found[0][0] == out else "reuse"
                            print(f"{model_name} {prune}:{keep} K={k} seed={seed} {method:11s} {what}")
                            continue
                        if found:
                            src, r = found[0]
                            if src != out:  # reused from another file: copied, with its settings made explicit
                                row = {**r, "settings": settings, "reused_from": src.name}
                                append_jsonl(out, row)
                                rows.setdefault(cell, []).append((out, row))
                            continue
                        if args.reuse_only:
                            continue
                        if images is None:
                            images, labels = load_few_shot(info.name, k, seed)
                        t0 = time.perf_counter()
                        student, report = run_method(base, teacher, images, labels, cfg, **(asdict(hp) if hp else {}))
                        seconds = time.perf_counter() - t0
                        acc = accuracy(student, test.images, test.labels, info)
                        row = {
                            "model": model_name, "dataset": info.name, "prune": prune, "keep": keep, "k": k,
                            "seed": seed, "method": method, "solver": args.solver, "mu": cfg.mu,
                            "alpha": cfg.alpha, "beta": cfg.beta, "accuracy": acc,
                            "teacher_accuracy": meta["test_accuracy"], "teacher_sha256": meta["sha256"],
                            "params": [report.params_before, report.params_after],
                            "flops": [report.flops_before, report.flops_after], "sparsity": report.sparsity,
                            "compress_seconds": seconds, "machine": env, "code": code, "settings": settings,
                        }  # fmt: skip
                        if "baseline" in report.config:  # the baseline's own hyperparameters (BN mode, lr ...)
                            row["baseline_params"] = report.config["baseline"]
                        if report.refine is not None:
                            row["mir"] = {k: report.refine[k] for k in ("config", "steps_run", "loss_before",
                                                                        "loss_after", "seconds")}  # fmt: skip
                        append_jsonl(out, row)
                        rows.setdefault(cell, []).append((out, row))
                        print(f"{model_name} {prune}:{keep} K={k} seed={seed} {method:7s} acc {acc:.4f} "
                              f"({seconds:.1f} s)", flush=True)  # fmt: skip
                        del student
                        torch.manual_seed(0)


if __name__ == "__main__":
    main()
