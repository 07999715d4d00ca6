"""The safety net's cost in teacher forward passes, in one process (#13).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/profile_safety.py --repeats 5 --views 16 8

ResNet-56 on its Fashion-MNIST teacher, K=5 draw (50 images), structured keep 0.5, Ours and NC with
``safety="off"`` and the net with each ``--views`` count alternated (after one warm-up run of each), CPU
seconds of this one-thread process; one teacher forward pass over the same 50 images timed between them
(median). Where the net does not fire (trained teacher) the difference is the check itself: the teacher, the
student and the masked start on the views. Rows go to ``results/safety_cost.jsonl`` (appended), one per run;
the summary prints medians. On a loaded machine the paired difference of two whole compressions (~7-15 passes
each) scatters more than the check costs (session 7: -0.5 to +1.5 passes); ``--forwards`` times the check's
three forwards on the views directly instead, each against a teacher pass (rows with ``"kind"``).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/profile_safety.py --forwards --views 8 16 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from common import RESULTS, append_jsonl, machine, teacher_path

from crossdistill.checkpoint import load_checkpoint
from crossdistill.config import CompressConfig
from crossdistill.data import load_few_shot
from crossdistill.methods import run_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--views", type=int, nargs="+", default=[16], help="safety_views settings to time")
    ap.add_argument("--net", default="s7", help="the safety net's version, recorded in the rows (s6: no field)")
    ap.add_argument(
        "--forwards",
        action="store_true",
        help="only time the check's three forwards on the views (teacher, student, masked start), in passes",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher, _ = load_checkpoint(teacher_path("resnet56", "fashion-mnist"))
    teacher.eval()
    images, _ = load_few_shot("fashion-mnist", 5, 0)

    def forward() -> float:
        c0 = time.process_time()
        with torch.no_grad():
            teacher(images)
        return time.process_time() - c0

    out = RESULTS / "safety_cost.jsonl"
    if args.forwards:
        return forwards_on_views(teacher, images, args, forward, out)
    cost: dict[tuple[str, str], list[float]] = {}
    passes: list[float] = []
    for rep in range(args.repeats + 1):  # repeat 0 warms up (first FLOP counter, allocator)
        for method in ("ours", "nc"):
            for safety in ("off", *[f"views{v}" for v in args.views]):
                passes.append(forward())
                c0 = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kw = {"safety": "off"} if safety == "off" else {"safety_views": int(safety.removeprefix("views"))}
                    _, report = run_method(method, teacher, images, keep=0.5, mu=0.9, **kw)
                cpu = time.process_time() - c0
                if rep == 0:
                    continue
                cost.setdefault((method, safety), []).append(cpu)
                row = {"model": "resnet56", "n": len(images), "method": method, "safety": safety, "repeat": rep,
                       "cpu_s": round(cpu, 4), "fired": (report.safety or {}).get("fired"),
                       "teacher_forward_cpu_s": round(passes[-1], 4), "net": args.net, "machine": machine(),
                       "note": "shared 2-core machine, loaded by other jobs"}  # fmt: skip
                append_jsonl(out, row)
    one = sorted(passes)[len(passes) // 2]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    for method in ("ours", "nc"):
        off = cost[(method, "off")]
        for v in args.views:
            on = cost[(method, f"views{v}")]
            paired = [b - a for a, b in zip(off, on, strict=True)]  # each repeat's on - off, run back to back
            summary = {"method": method, "views": v, "passes_off": round(med(off) / one, 2),
                       "passes_on": round(med(on) / one, 2), "check_passes_paired": round(med(paired) / one, 2),
                       "forward_cpu_s": round(one, 4)}  # fmt: skip
            print(json.dumps(summary))


def forwards_on_views(teacher, images, args, forward, out) -> None:
    """``--forwards``: what the net costs where it does not fire, timed piece by piece (each forward alternated
    with a teacher pass over the 50 images, medians; robust to a load that moves whole compressions by +-15 %):
    the teacher, the student (Ours) and the masked start over ``safety_views`` views."""
    from crossdistill.run import start
    from crossdistill.safety import make_views, masked_start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, report = run_method("ours", teacher, images, keep=0.5, mu=0.9, safety="off")
    run = start("ours", teacher, images, None, CompressConfig(keep=0.5))
    run.start_masks = {
        r.name: torch.zeros(teacher.get_submodule(r.name).weight.shape[1], dtype=torch.bool).index_fill_(
            0, torch.tensor(r.kept_channels), True
        )
        for r in report.layers
        if r.kept_channels is not None
    }
    masked = masked_start(run).eval()
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    for v in args.views:
        views = make_views(images, v, 0.0625)
        times: dict[str, list[float]] = {"pass": [], "teacher": [], "student": [], "start": []}
        for rep in range(args.repeats + 1):
            for name, model in (("teacher", teacher), ("student", student.eval()), ("start", masked)):
                times["pass"].append(forward())
                c0 = time.process_time()
                with torch.no_grad():
                    model(views)
                if rep:
                    times[name].append(time.process_time() - c0)
        one = med(times["pass"])
        row = {"model": "resnet56", "n": len(images), "kind": "forwards on views", "views": v,
               **{k: round(med(times[k]) / one, 3) for k in ("teacher", "student", "start")},
               "check_passes": round(sum(med(times[k]) for k in ("teacher", "student", "start")) / one, 3),
               "repeats": args.repeats, "forward_cpu_s": round(one, 4), "net": args.net, "machine": machine(),
               "note": "shared 2-core machine, loaded by other jobs"}  # fmt: skip
        append_jsonl(out, row)
        print(json.dumps({k: row[k] for k in ("views", "teacher", "student", "start", "check_passes")}))


if __name__ == "__main__":
    main()
