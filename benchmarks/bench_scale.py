"""Compression at real sizes: time, peak memory and the ratio to one teacher forward pass.

    OMP_NUM_THREADS=1 /work/tvenv/bin/python benchmarks/bench_scale.py     # the default grid, resumable
    python benchmarks/bench_scale.py --models resnet18 --n 100 --methods ours nc --device cuda

Models: resnet18, resnet50, mobilenet_v2, efficientnet_b0 (benchmarks/tv_models.py: torchvision's
own definitions when torchvision is importable, else faithful re-definitions; ``definitions`` in each
row says which; random init, BN statistics re-estimated on the images so activations are realistic)
at 224x224 on N random normalised images, structured keep 0.5; all N=100 rows before the N=1000 rows;
and resnet56 on its Fashion-MNIST teacher with the K=5 few-shot draw (50 images), also with the old
per-layer capture (``capture=per-layer``) for comparison. Each run is a fresh subprocess (its peak RSS is
its own, including the Python/torch baseline) and appends one JSONL line to
benchmarks/results/scale.jsonl; rows already there are skipped. ``teacher_forward_s`` is one
forward pass of the teacher over the same images (batch 128, eval, no grad), timed in the same
process before and after the compression (median of 3 each, one each for passes over 1 s; then their
mean); ``ratio`` = compression
seconds / teacher_forward_s. ``*_cpu*``: the same in CPU seconds of the process (time.process_time),
which a shared, loaded machine disturbs far less than wall time (one thread: OMP_NUM_THREADS=1).
The one-time import of torch._dynamo by the first FlopCounterMode (``first_use_cpu_s``) happens before
the timer (rows from before commit 804a4f3 include it in the compression time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, append_jsonl, machine, read_jsonl, teacher_path
from tables import fill_readme, write_md

OUT = RESULTS / "scale.jsonl"


def one_run(model: str, n: int, method: str, capture: str, opts: argparse.Namespace) -> dict:
    """Runs inside the child process (``opts``: device, size, spill_mb)."""
    import torch

    from crossdistill.methods import run_method
    from crossdistill.run import recalibrate_bn

    device = opts.device
    dev = torch.device(device)
    if model == "resnet56":
        from crossdistill.checkpoint import load_checkpoint
        from crossdistill.data import load_few_shot

        teacher, _meta = load_checkpoint(teacher_path("resnet56", "fashion-mnist"))
        images, _ = load_few_shot("fashion-mnist", 5, 0)
        mu = 0.9
        definitions = "crossdistill.models"
    else:
        sys.path.insert(0, os.path.dirname(__file__))
        from tv_models import MODELS, SOURCE

        definitions = SOURCE
        torch.manual_seed(0)
        teacher = MODELS[model]()
        images = torch.randn(n, 3, opts.size, opts.size, generator=torch.Generator().manual_seed(1))
        recalibrate_bn(teacher, images)
        mu = 0.6
    teacher = teacher.to(dev).eval()
    images = images.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward_pass(repeats: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one teacher forward pass over the images, median of ``repeats``."""
        walls, cpus = [], []
        with torch.no_grad():
            for _ in range(repeats):
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                for i in range(0, len(images), 128):
                    teacher(images[i : i + 128])
                sync()
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
        return sorted(walls)[repeats // 2], sorted(cpus)[repeats // 2]

    with torch.no_grad():
        teacher(images[:2])  # warm-up
    # a one-time cost of the process, not of a compression: the first FlopCounterMode (count_flops) imports
    # torch._dynamo, ~1.5 s CPU, as much as 8 teacher passes of ResNet-56 K=5; paid here and recorded
    from crossdistill.measure import count_flops

    c0 = time.process_time()
    count_flops(teacher, images.shape[1:])
    first_use_cpu = time.process_time() - c0
    before = forward_pass(1)
    repeats = 3 if before[1] < 1 else 1  # a pass of seconds or more (224x224 images) is timed once each side
    if repeats > 1:
        before = forward_pass(repeats)
    w0, c0 = time.perf_counter(), time.process_time()
    extra = {"mu": mu, "capture": capture} if method != "l1" else {}  # l1 has no objective and no capture
    if os.environ.get("BENCH_SAFETY") and method != "l1":  # an arm of --safety-off: the safety net's setting
        extra["safety"] = os.environ["BENCH_SAFETY"]
    if opts.spill_mb is not None:
        extra["spill_mb"] = opts.spill_mb
    student, report = run_method(method, teacher, images, keep=0.5, device=device, **extra)
    sync()
    seconds, cpu_seconds = time.perf_counter() - w0, time.process_time() - c0
    after = forward_pass(repeats)
    # wall times on a loaded machine follow the load; CPU time of this one-thread process much less so
    forward_s, forward_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    return {
        "model": model,
        "definitions": definitions,
        "n": len(images),
        "size": images.shape[-1],
        "method": method,
        "capture": report.capture if method != "l1" else "none",
        "device": device,
        "seconds": round(seconds, 2),
        "teacher_forward_s": round(forward_s, 3),
        "ratio": round(seconds / forward_s, 1),
        "cpu_seconds": round(cpu_seconds, 2),
        "teacher_forward_cpu_s": round(forward_cpu, 3),
        "ratio_cpu": round(cpu_seconds / forward_cpu, 1),
        "first_use_cpu_s": round(first_use_cpu, 2),  # outside cpu_seconds (see above)
        "peak_memory_mb": round(report.peak_memory_mb or 0.0, 0),
        # activations over this size (a stream's kept values, one layer's input over all images) went to disk
        "spill_mb": report.config.get("spill_mb"),
        "params_ratio": round(report.params_after / report.params_before, 3),
        "flops_ratio": round(report.flops_after / report.flops_before, 3),
        "output_error_fit": round(report.output_error, 4),
        "layers": len(report.layers),
        "fell_back": sum(r.fell_back for r in report.layers),
        # a fired safety net re-runs the compression (guarded, from the L1 channels): up to 3 of them
        "safety": _safety(report) if method != "l1" else None,
        "commit": os.environ.get("BENCH_COMMIT")
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": machine(),
        "note": "shared 2-core machine, other jobs running" if device == "cpu" else "",
    }


def _safety(report) -> dict:
    """The safety net's mode (the run's config), whether it fired and what it returned (report.safety is None
    with it off)."""
    info = report.safety or {}
    return {"mode": report.config.get("safety"), "fired": info.get("fired"), "returned": info.get("returned")}


def _net(r: dict) -> str:
    """The safety-net column: off, fired (what it returned), not fired; blank where the row did not record it."""
    s = r.get("safety") or {}
    if s.get("mode") == "off":
        return "off"
    if s.get("fired") is None:
        return ""
    return f"fired ({s['returned']})" if s["fired"] else "not fired"


def readme_table(out: Path = OUT) -> None:
    """Write the rows of ``out`` into README.md between the scale_table markers: per cell, among the runs of
    the newest commit that ran it, the run with the median CPU-time ratio (wall-time ratio for rows without
    one) and how many runs there were."""
    head = (
        "| model | definitions | N | method | capture | runs | compress s | teacher forward s | ratio (wall) "
        "| ratio (CPU) | safety net | peak RSS MB | params | FLOPs | output error | commit |"
    )
    lines = [head, "|" + "---|" * 16]
    cells: dict[tuple, list[dict]] = {}
    for r in read_jsonl(out):
        cells.setdefault((*_key(r), (r.get("safety") or {}).get("mode") == "off"), []).append(r)
    order = lambda rs: (rs[0]["n"] > 100, _ORDER.get(rs[0]["model"], 9), rs[0]["method"], rs[0]["capture"])  # noqa: E731
    for runs in sorted(cells.values(), key=order):
        latest = runs[-1].get("commit")  # the newest code that ran this cell; older rows stay in the file
        runs = [r for r in runs if r.get("commit") == latest]
        r = sorted(runs, key=lambda r: r.get("ratio_cpu", r["ratio"]))[len(runs) // 2]
        lines.append(
            f"| {r['model']} | {r.get('definitions', 're-definition')} | {r['n']} | {r['method']} | {r['capture']} "
            f"| {len(runs)} | {r['seconds']} | {r['teacher_forward_s']} | {r['ratio']} | {r.get('ratio_cpu', '')} "
            f"| {_net(r)} | {int(r['peak_memory_mb'])} | x{r['params_ratio']} | x{r['flops_ratio']} "
            f"| {r['output_error_fit']} | {r.get('commit', '')} |"
        )
    fill_readme({"scale_table": "\n".join(lines)})


def write_summary(out: Path, md: Path) -> None:
    """Median CPU-time ratio per (model, N, method, capture, commit) of the rows of ``out``, as a table."""
    cells: dict[tuple, list[float]] = {}
    for r in read_jsonl(out):
        cells.setdefault((*_key(r)[:5], r.get("commit", "")), []).append(r.get("ratio_cpu", r["ratio"]))
    lines = [
        f"# Compression cost in teacher forward passes ({out.name})",
        "",
        "CPU-time ratio of one compression to one teacher forward pass over the same images, one thread, "
        "each run a fresh process, the commits interleaved (benchmarks/bench_scale.py --base). "
        "Shared, loaded 2-core machine.",
        "",
        "| model | N | method | capture | commit | runs | ratio (CPU), median | all runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, _defs, n, method, capture, commit), ratios in cells.items():
        med = sorted(ratios)[len(ratios) // 2]
        lines.append(f"| {model} | {n} | {method} | {capture} | {commit} | {len(ratios)} | {med} | {ratios} |")
    write_md(md, "\n".join(lines) + "\n")
    print("\n".join(lines))


_ORDER = {"resnet56": 0, "resnet18": 1, "resnet50": 2, "mobilenet_v2": 3, "efficientnet_b0": 4}


def _key(r: dict) -> tuple:
    return (r["model"], r.get("definitions", "re-definition"), r["n"], r["method"], r["capture"], r["device"])


def _cells(models: list[str], ns: list[int], methods: list[str]) -> list[tuple[str, int, str, str]]:
    """(model, n, method, capture) in run order: every N=100 row before the larger N (resnet56: its K=5 draw)."""
    cells = []
    for n in sorted(ns):
        for model in models:
            if model == "resnet56" and n != min(ns):
                continue
            for method in methods:
                if method == "l1":
                    cells.append((model, 50 if model == "resnet56" else n, method, "none"))
                    continue
                for capture in ["one-pass", "per-layer"] if model == "resnet56" else ["one-pass"]:
                    cells.append((model, 50 if model == "resnet56" else n, method, capture))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["resnet56", "resnet18", "mobilenet_v2", "efficientnet_b0", "resnet50"]
    )
    ap.add_argument("--n", nargs="+", type=int, default=[100, 1000])
    ap.add_argument("--methods", nargs="+", default=["ours", "nc", "l1"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=224, help="image side of the torchvision models' rows")
    ap.add_argument("--spill-mb", type=float, default=None, help="CompressConfig.spill_mb (default: the config's)")
    ap.add_argument("--out", type=Path, default=OUT, help="results file (JSONL, appended)")
    ap.add_argument("--max-seconds", type=float, default=None, help="leave out a row that runs longer (said so)")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "N", "METHOD", "CAPTURE"), help=argparse.SUPPRESS)
    ap.add_argument("--readme", action="store_true", help="only write the results table into README.md")
    ap.add_argument("--again", action="store_true", help="run rows already in the results file once more")
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="before/after: a snapshot of another commit (git archive C | tar -x -C DIR); every cell runs with "
        "its crossdistill, then with this one (same child code, interleaved)",
    )
    ap.add_argument("--captures", nargs="+", default=["one-pass", "per-layer", "none"], help="cells of these captures")
    ap.add_argument("--base-commit", default="base", help="the commit of --base, recorded in its rows")
    ap.add_argument("--head-commit", default=None, help="with --base: the label of this code's rows")
    ap.add_argument("--safety-off", action="store_true", help="with --base: a third arm, this code with safety='off'")
    ap.add_argument("--summary", type=Path, default=None, help="only write the median ratios of --out to this .md")
    args = ap.parse_args()
    if args.readme:
        readme_table(args.out)
        return
    if args.summary:
        write_summary(args.out, args.summary)
        return
    if args.child:
        model, n, method, capture = args.child
        print(json.dumps(one_run(model, int(n), method, capture, args)))
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from tv_models import SOURCE

    done = {_key(r) for r in read_jsonl(args.out)}
    for model, n, method, capture in _cells(args.models, args.n, args.methods):
        if capture not in args.captures:
            continue
        definitions = "crossdistill.models" if model == "resnet56" else SOURCE
        if (model, definitions, n, method, capture, args.device) in done and not args.again:
            continue
        cmd = [sys.executable, __file__, "--device", args.device, "--size", str(args.size), "--child", model, str(n)]
        cmd += [method, capture] + ([] if args.spill_mb is None else ["--spill-mb", str(args.spill_mb)])
        arms = [(None, None)] if args.base is None else [(args.base, args.base_commit), (None, args.head_commit)]
        if args.safety_off and method != "l1":
            arms.append(("off", f"{args.head_commit} safety=off"))
        for code, label in arms:
            env = None if code is None and label is None else {**os.environ, "BENCH_COMMIT": label or ""}
            if code == "off":
                env["BENCH_SAFETY"] = "off"
            elif code is not None:
                env["PYTHONPATH"] = str(code)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds, env=env)
            except subprocess.TimeoutExpired:
                print(f"{model} {n} {method} {capture}: left out, longer than {args.max_seconds:.0f} s", flush=True)
                continue
            if proc.returncode != 0:
                print(f"{model} {n} {method} {capture}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            append_jsonl(args.out, row)
            keys = ("model", "n", "method", "capture", "seconds", "ratio", "ratio_cpu", "commit")
            print(json.dumps({k: row[k] for k in keys}), flush=True)


if __name__ == "__main__":
    main()
