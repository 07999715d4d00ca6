"""Accuracy grid: teacher / NC / Ours / Ours-S on Fashion-MNIST (resumable, one JSONL line per cell).

    python benchmarks/bench_accuracy.py --models resnet56 --ks 1 5 --seeds 0 1 2

Cells already in the results file are skipped. Every method sees the same
few-shot draw for a (K, seed). Accuracy is on the full test split.
``<method>+mir`` (or ``--refine mir`` for every method) runs MiR refinement
(crossdistill.mir) after the method; ``mir`` is MiR itself (L1 start).
Then run ``python benchmarks/report.py`` to rebuild the tables and plots.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path

from crossdistill.baselines import BASELINES
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import dataset_info, load_dataset, load_few_shot
from crossdistill.evaluate import accuracy
from crossdistill.methods import run_method
from crossdistill.mir import MirConfig


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
    ap.add_argument("--mir-steps", type=int, default=None, help="MiR steps (default: MirConfig's)")
    ap.add_argument("--mir-lr", type=float, default=None, help="MiR Adam lr (default: MirConfig's)")
    ap.add_argument("--out", default=None, help="results file (default results/accuracy_<dataset>.jsonl)")
    args = ap.parse_args()

    out = RESULTS / f"accuracy_{args.dataset}.jsonl" if args.out is None else Path(args.out)
    keys = ("model", "prune", "keep", "k", "seed", "method", "solver", "mu")
    done = {tuple(r[key] for key in keys) for r in read_jsonl(out)}
    info = dataset_info(args.dataset)
    test = load_dataset(info.name, "test")
    env = machine()
    # MiR settings: MirConfig's (refinement) / method_defaults() (method mir) unless given here
    mir_cfg = None
    if args.mir_steps is not None or args.mir_lr is not None:
        mir_cfg = MirConfig()
        mir_cfg.steps = args.mir_steps if args.mir_steps is not None else mir_cfg.steps
        mir_cfg.lr = args.mir_lr if args.mir_lr is not None else mir_cfg.lr
    methods = [m if args.refine is None or m == "mir" else f"{m}+mir" for m in args.methods]
    for model_name in args.models:
        path = teacher_path(model_name, info.name)
        if not path.exists():
            print(f"skip {model_name}: no teacher at {path}")
            continue
        teacher, meta = load_checkpoint(path)
        mu = official_mu(model_name) if args.mu is None else args.mu
        for spec in args.prunes:
            prune, keep = spec.split(":")
            keep = float(keep)
            for k in args.ks:
                for seed in args.seeds:
                    images, labels = load_few_shot(info.name, k, seed)
                    for method in methods:
                        key = (model_name, prune, keep, k, seed, method, args.solver, mu)
                        # "<method>+refit": unpruned layers re-fitted with L^r (unpruned_objective="nc")
                        # "<method>+mir": MiR refinement after the method
                        base, refine = method.removesuffix("+mir"), method.endswith("+mir")
                        base, refit = base.removesuffix("+refit"), base.endswith("+refit")
                        skip = base in BASELINES and prune == "unstructured" and not BASELINES[base].unstructured
                        if key in done or skip:
                            continue
                        cfg = CompressConfig(
                            method=base, mu=mu, prune=prune, keep=keep, solver=args.solver,
                            unpruned_objective="nc" if refit else "same", refine="mir" if refine else None,
                            mir=mir_cfg,
                        )  # fmt: skip
                        t0 = time.perf_counter()
                        student, report = run_method(base, teacher, images, labels, cfg)
                        seconds = time.perf_counter() - t0
                        acc = accuracy(student, test.images, test.labels, info)
                        row = {
                            "model": model_name, "dataset": info.name, "prune": prune, "keep": keep, "k": k,
                            "seed": seed, "method": method, "solver": args.solver, "mu": cfg.mu,
                            "alpha": cfg.alpha, "beta": cfg.beta, "accuracy": acc,
                            "teacher_accuracy": meta["test_accuracy"], "teacher_sha256": meta["sha256"],
                            "params": [report.params_before, report.params_after],
                            "flops": [report.flops_before, report.flops_after], "sparsity": report.sparsity,
                            "compress_seconds": seconds, "machine": env,
                        }  # fmt: skip
                        if "baseline" in report.config:  # the baseline's own hyperparameters (BN mode, lr ...)
                            row["baseline_params"] = report.config["baseline"]
                        if report.refine is not None:
                            row["mir"] = {k: report.refine[k] for k in ("config", "steps_run", "loss_before",
                                                                        "loss_after", "seconds")}  # fmt: skip
                        append_jsonl(out, row)
                        print(f"{model_name} {prune}:{keep} K={k} seed={seed} {method:7s} acc {acc:.4f} "
                              f"({seconds:.1f} s)", flush=True)  # fmt: skip
                        del student
                        torch.manual_seed(0)


if __name__ == "__main__":
    main()
