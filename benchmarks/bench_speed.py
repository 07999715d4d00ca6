"""Compression speed, peak memory and the student's real speed-up (one JSONL line per run).

    python benchmarks/bench_speed.py --model resnet56 --k 5 --repeats 3
    python benchmarks/bench_speed.py --model resnet20 --solvers lstsq adam --adam-iterations 3000

Each run compresses in a fresh subprocess so that its peak RSS is its own
(the figure includes the process's Python/torch baseline and the train split).
Latency is the median of 30 runs after warm-up, teacher and student timed
alternately in the same process (evaluate.measure_latency_pair), at batch 1
and 64, both as compress() returns them (eager) and after
crossdistill.inference.optimize_for_inference (BN folded into the convs,
channels-last), applied to teacher and student alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import RESULTS, append_jsonl, machine, official_mu, teacher_path


def one_run(model: str, dataset: str, k: int, seed: int, solver: str, iterations: int, method: str) -> dict:
    """Runs inside the child process."""
    import torch

    from crossdistill.checkpoint import load_checkpoint
    from crossdistill.compress import CompressConfig, compress
    from crossdistill.data import dataset_info, load_dataset, load_few_shot
    from crossdistill.evaluate import accuracy
    from crossdistill.inference import optimize_for_inference
    from crossdistill.measure import count_flops, measure_latency_pair

    info = dataset_info(dataset)
    teacher, meta = load_checkpoint(teacher_path(model, info.name))
    images, _ = load_few_shot(info.name, k, seed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = CompressConfig(method=method, mu=official_mu(model), solver=solver, iterations=iterations)
    t0 = time.perf_counter()
    student, report = compress(teacher, images, cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    test = load_dataset(info.name, "test")
    shape = (info.in_channels, info.size, info.size)
    lat = {}
    # "eager": the models as compress() returns them; "opt": optimize_for_inference (BN folded, channels-last)
    for variant, prep in (("", lambda m: m), ("opt_", optimize_for_inference)):
        t, s = prep(teacher), prep(student)
        for b in (1, 64):
            tt, ts = measure_latency_pair(t, s, shape, batch_size=b, warmup=5, repeats=30)
            lat[f"teacher_{variant}b{b}_ms"], lat[f"student_{variant}b{b}_ms"] = 1e3 * tt, 1e3 * ts
    flops_t, flops_s = count_flops(teacher, shape), count_flops(student, shape)
    final = [r for r in report.layers if not r.skipped]
    return {
        "model": model, "dataset": info.name, "k": k, "seed": seed, "method": method, "solver": solver,
        "iterations": iterations if solver == "adam" else None, "compress_seconds": seconds,
        "peak_rss_mb": peak, "rss_before_compress_mb": rss_before,
        "accuracy": accuracy(student, test.images, test.labels, info), "teacher_accuracy": meta["test_accuracy"],
        "mean_final_layer_loss": sum(r.loss_after for r in final) / max(len(final), 1),
        "flops": [flops_t, flops_s], "params": [report.params_before, report.params_after],
        "flops_reduction": flops_t / flops_s, "speedup_b1": lat["teacher_b1_ms"] / lat["student_b1_ms"],
        "speedup_b64": lat["teacher_b64_ms"] / lat["student_b64_ms"],
        "speedup_opt_b1": lat["teacher_opt_b1_ms"] / lat["student_opt_b1_ms"],
        "speedup_opt_b64": lat["teacher_opt_b64_ms"] / lat["student_opt_b64_ms"], **lat,
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--method", default="ours")
    ap.add_argument("--solvers", nargs="+", default=["lstsq"])
    ap.add_argument("--adam-iterations", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="speed.jsonl", help="results file name under results/")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(**json.loads(args.child))))
        return
    out = RESULTS / args.out
    env = machine()
    for solver in args.solvers:
        for rep in range(args.repeats if solver == "lstsq" else 1):
            spec = {"model": args.model, "dataset": args.dataset, "k": args.k, "seed": 0, "solver": solver,
                    "iterations": args.adam_iterations, "method": args.method}  # fmt: skip
            res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            row = {**json.loads(res.stdout.strip().splitlines()[-1]), "repeat": rep, "machine": env,
                   "loadavg_1min_after": os.getloadavg()[0]}  # fmt: skip
            append_jsonl(out, row)
            print(f"{args.model} {solver}: {row['compress_seconds']:.1f} s, peak {row['peak_rss_mb']:.0f} MB, "
                  f"acc {row['accuracy']:.4f}, FLOPs /{row['flops_reduction']:.2f}, "
                  f"speed-up b1 {row['speedup_b1']:.2f} b64 {row['speedup_b64']:.2f} "
                  f"(optimized b1 {row['speedup_opt_b1']:.2f} b64 {row['speedup_opt_b64']:.2f})",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
