"""Where one compression of ResNet-56 K=5 spends its CPU time, in teacher forward passes.

    PYTHONPATH=$PWD python benchmarks/profile_sections.py ours nc >> benchmarks/results/profile_resnet56.txt

Wraps the main steps (Gram matrices, solves, captures, torch-pruning's dependency walks, counts) with
CPU-time counters (time.process_time, one thread), after the one-time torch._dynamo import that the
first FlopCounterMode does, then runs one compression per method in this process (the first: as
bench_scale.py times it; ``--warm`` runs one before). Nested steps are counted in their callers too
(``LayerStep.stats`` contains ``add_batch`` contains ``gram``; ``_group`` contains ``pruning_group``,
torch-pruning's walks, which ``prunable_channels`` and ``remove_input_channels`` call too). Steps a commit
does not have are left out. Run it with another commit's code on PYTHONPATH for a before/after;
interleave the two, the machine's load moves these numbers by ±15 %.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def _wrap(owner, name: str, acc: collections.Counter, calls: collections.Counter) -> None:
    f = getattr(owner, name)
    label = f"{getattr(owner, '__name__', '')}.{name}"

    @functools.wraps(f)
    def timed(*a, **k):
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.process_time() - t
            calls[label] += 1

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--warm", action="store_true", help="one compression before the timed one")
    args = ap.parse_args()
    from common import teacher_path

    import crossdistill
    import crossdistill.capture as capture
    import crossdistill.measure as measure
    import crossdistill.pruning as pruning
    import crossdistill.run as run
    import crossdistill.solvers as solvers
    from crossdistill.checkpoint import load_checkpoint
    from crossdistill.data import load_few_shot
    from crossdistill.measure import count_flops
    from crossdistill.methods import run_method

    acc: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    steps = [
        (run, ["_teacher_inputs", "_student_stream", "_refit_gate_inputs", "count_flops", "output_error"]),
        (solvers, ["ridge_solve", "weight_product", "gram", "channel_scores", "never_worse"]),
        (solvers.GramSystem, ["loss"]),
        (solvers.LayerStats, ["add_batch", "system"]),
        (capture.GraphStream, ["next_input", "output"]),
        (pruning.ChannelRemover, ["remove_input_channels", "_group", "pruning_group", "prunable_channels"]),
        (getattr(measure, "FlopCount", None), ["__init__", "recount"]),  # the FLOP counts from session 6 on
        (run.LayerStep, ["stats"]),
    ]
    for owner, names in steps:
        for name in names:
            if owner is not None and hasattr(owner, name):
                _wrap(owner, name, acc, calls)
    teacher, _ = load_checkpoint(teacher_path("resnet56", "fashion-mnist"))
    images, _ = load_few_shot("fashion-mnist", 5, 0)
    teacher.eval()

    def forward() -> float:
        c = time.process_time()
        with torch.no_grad():
            teacher(images)
        return time.process_time() - c

    def forward_wall() -> float:
        c = time.perf_counter()
        with torch.no_grad():
            teacher(images)
        return time.perf_counter() - c

    forward()
    one = sorted(forward() for _ in range(5))[2]
    one_wall = sorted(forward_wall() for _ in range(5))[2]
    count_flops(teacher, images.shape[1:])  # the one-time import, outside the timing
    print(f"# code: {os.path.dirname(crossdistill.__file__)}")
    for method in args.methods:
        extra = {"mu": 0.9} if method == "ours" else {}
        if args.warm:
            run_method(method, teacher, images, keep=0.5, **extra)
        acc.clear()
        calls.clear()
        c = time.process_time()
        _, report = run_method(method, teacher, images, keep=0.5, **extra)
        total = time.process_time() - c
        print(f"== {method}: teacher forward {one:.3f} s, compression {total:.3f} s = {total / one:.2f} passes")
        for label, sec in sorted(acc.items(), key=lambda kv: -kv[1]):
            print(f"  {label:45s} {sec:7.3f} s {sec / one:6.2f} passes  ({calls[label]} calls)")
        # the per-layer steps by kind (LayerRecord.seconds: wall time, capture + solve + removal of that layer)
        kinds = {"pruned": [], "re-fitted, not pruned": [], "left as they are": []}
        for r in report.layers:
            kind = "left as they are" if r.skipped else "pruned" if r.kept < r.total else "re-fitted, not pruned"
            kinds[kind].append(r.seconds)
        steps = ", ".join(f"{k} {len(v)}: {sum(v) / one_wall:.2f}" for k, v in kinds.items() if v)
        print(f"  layer steps in wall-time passes (teacher forward {one_wall:.3f} s wall): {steps}")


if __name__ == "__main__":
    main()
