"""How far channels alone can cut end-to-end latency, and how the latency table's ratio maps to the timed one.

    OMP_NUM_THREADS=1 python benchmarks/probe_latency_bound.py --models resnet56 vgg16

For the teacher narrowed uniformly (every layer ``compress`` would narrow, channels removed, no re-fit:
latency depends on shapes only) at keep 1.0 ... 0.1 and at one channel per layer (the channel-only bound),
records the latency table's ratio (student / teacher, :mod:`crossdistill.latency`) and the timed ratio
(teacher and student alternately, 3 rounds, median and half the spread: ``crossdistill.target.timed_ratio``,
on one thread the thread's CPU clock; the first rows, without ``clock``, were wall-clock) at batch
``--batch``. ResNets also get students with the first n residual blocks (forward order) dropped, so the
two levers compare. One thread (``OMP_NUM_THREADS``); the machine is shared and loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, teacher_path

from crossdistill.allocate import prune_to_counts
from crossdistill.blockdrop import drop_blocks, residual_blocks
from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import load_few_shot
from crossdistill.latency import latency_measure
from crossdistill.plan import keep_count
from crossdistill.target import pruned_plan, timed_ratio

KEEPS = [1.0, 0.75, 0.5, 0.4, 0.25, 0.1, 0.0]  # 0.0: one channel per layer (the bound)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "latency_bound_fashion-mnist.jsonl"))
    args = ap.parse_args()
    env = {**machine(), "note": "shared 2-core machine, loaded by other jobs"}
    # timed_ratio's clock: the thread's CPU clock on one thread (since session 7; rows without "clock": wall)
    clock = "thread-cpu" if torch.get_num_threads() == 1 else "wall"
    for name in args.models:
        teacher, _ = load_checkpoint(teacher_path(name, args.dataset))
        teacher.eval()
        images, _ = load_few_shot(args.dataset, 1, 0)
        example = images[:1]
        shape = tuple(example.shape[1:])
        plan = pruned_plan(teacher, example, CompressConfig())
        table = latency_measure(shape, args.batch)
        base = table(teacher)
        students = []
        for keep in KEEPS:
            counts = {}
            for p in plan:
                counts[p.name] = max(1, keep_count(p.prunable(teacher), keep)) if keep > 0 else 1
            students.append(({"lever": "channels", "keep": keep}, prune_to_counts(teacher, example, plan, counts)))
        try:
            blocks = residual_blocks(teacher)
        except Exception:  # noqa: BLE001 - no residual blocks (VGG): channels only
            blocks = []
        for n in range(0, len(blocks) + 1, max(1, len(blocks) // 6)):
            dropped = drop_blocks(teacher, blocks[:n], images) if n else teacher
            students.append(({"lever": "blocks", "dropped": n, "of": len(blocks)}, dropped))
        for desc, student in students:
            timed, noise = timed_ratio(teacher, student, shape, args.batch)
            row = {"model": name, **desc, "table_ratio": table(student) / base, "timed_ratio": timed,
                   "noise": noise, "batch": args.batch, "clock": clock, "machine": env}  # fmt: skip
            append_jsonl(Path(args.out), row)
            print(row, flush=True)


if __name__ == "__main__":
    main()
