"""How well the per-layer latency table predicts end-to-end latency (resumable JSONL).

    OMP_NUM_THREADS=1 python benchmarks/bench_latency_model.py --models resnet56 vgg16 --batch 64

For the teacher and uniformly narrowed copies (keep 0.75 / 0.5 / 0.25 of every
prunable layer, channels removed, no re-fit: latency depends on shapes only),
records the table's sum (:mod:`crossdistill.latency`) and the median end-to-end
latency, and the speed-up each predicts (student / teacher), since a latency
target is a ratio. Run on this machine's CPU with the thread count of
``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, read_jsonl, teacher_path

from crossdistill.allocate import prune_to_counts
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.evaluate import measure_latency_pair
from crossdistill.latency import LatencyTable
from crossdistill.plan import keep_count
from crossdistill.target import pruned_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "latency_model.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    done = {(r["model"], r["keep"], r["batch"]) for r in read_jsonl(out)}
    table = LatencyTable()
    for name in args.models:
        teacher, meta = load_checkpoint(teacher_path(name, "fashion-mnist"))
        teacher.eval()
        shape = (meta["in_channels"], 28, 28)
        example = torch.zeros(1, *shape)
        plan = pruned_plan(teacher, example, CompressConfig())
        t_table = table.model_ms(teacher, shape, args.batch)
        for keep in args.keeps:
            if (name, keep, args.batch) in done:
                continue
            counts = {p.name: keep_count(p.prunable(teacher), keep) for p in plan}
            student = prune_to_counts(teacher, example, plan, counts)
            s_table = table.model_ms(student, shape, args.batch)
            ratios, times = [], []
            for _ in range(3):
                t, s = measure_latency_pair(teacher, student, shape, args.batch, warmup=3, repeats=10)
                ratios.append(s / t)
                times.append((t * 1e3, s * 1e3))
            t_ms, s_ms = sorted(times)[1]
            timed = sorted(ratios)[1]
            noise = (max(ratios) - min(ratios)) / 2
            env = {**machine(), "note": "shared 2-core machine, loaded"}
            row = {
                "model": name, "keep": keep, "batch": args.batch, "teacher_table_ms": t_table,
                "teacher_timed_ms": t_ms, "student_table_ms": s_table, "student_timed_ms": s_ms,
                "table_ratio": s_table / t_table, "timed_ratio": timed, "timed_ratio_noise": noise,
                "teacher_relative_error": t_table / t_ms - 1, "student_relative_error": s_table / s_ms - 1,
                "ratio_error": s_table / t_table - timed, "machine": env,
            }  # fmt: skip
            append_jsonl(out, row)
            print(f"{name} keep {keep}: table ratio {row['table_ratio']:.3f}, timed {timed:.3f} "
                  f"(±{row['timed_ratio_noise']:.3f}); table error teacher {row['teacher_relative_error']:+.1%}, "
                  f"student {row['student_relative_error']:+.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
