"""Does the safety net (``CompressConfig.safety="views"``, the new default) fire on trained teachers? (#13)

    OMP_NUM_THREADS=1 python benchmarks/probe_safety_trained.py --models vgg16 resnet56 --ks 1 5 --seeds 0 1 --views 8
    python benchmarks/probe_safety_trained.py --summary     # rebuild the markdown summary only

For each (model, K, seed, method) on the shipped Fashion-MNIST teachers: the run with ``safety="off"``
(main's behaviour, the students the #11 / #12 grids use) and with the net on ``--views`` views, in one process. Each row
records whether the net fired, what it returned, the output errors of the student and of the no-re-fit start
on the check views, whether the two students are bit-identical (every state-dict tensor equal), and the
validation accuracy of each (``--val-per-class`` images per class from the TRAIN split, disjoint from the
draw; never test images). Rows go to ``results/safety_trained_<dataset>.jsonl`` (resumable), the summary to
its ``.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path, validation_draws
from sweep_hparams import val_accuracy

from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import dataset_info
from crossdistill.methods import run_method

KEYS = ("model", "k", "seed", "method", "views", "net")
# rows written before a key existed: 16 views, session 6's net (no L1 reference, guarded re-run on the same views)
DEFAULTS = {"views": 16, "net": "s6"}


def _key(r: dict) -> tuple:
    return tuple(r.get(k, DEFAULTS.get(k)) for k in KEYS)


def _identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def run(args: argparse.Namespace, out: Path) -> None:
    done = {_key(r) for r in read_jsonl(out)}
    info = dataset_info(args.dataset)
    env = {**machine(), "note": "shared 2-core machine, loaded by other jobs"}
    for seed, k, images, labels, vx, vy in validation_draws(info, args.seeds, args.ks, args.val_per_class):
        for model_name in args.models:
            teacher, meta = load_checkpoint(teacher_path(model_name, info.name))
            for method in args.methods:
                cell = {"model": model_name, "k": k, "seed": seed, "method": method, "views": args.views}
                cell["net"] = args.net
                if _key(cell) in done:
                    continue
                cfg = CompressConfig(keep=args.keep, mu=official_mu(model_name))
                t0 = time.perf_counter()
                off, _ = run_method(method, teacher, images, labels, cfg, safety="off")
                t1 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    on, report = run_method(method, teacher, images, labels, cfg, safety_views=args.views)
                t2 = time.perf_counter()
                same = _identical(off, on)
                acc_off = val_accuracy(off, vx, vy)
                row = {**cell, "keep": args.keep, "dataset": info.name, "val_images": len(vy),
                       "safety": report.safety, "identical": same, "val_accuracy_off": acc_off,
                       "val_accuracy_on": acc_off if same else val_accuracy(on, vx, vy),
                       "safety_warnings": sum("safety net" in str(w.message) for w in caught),
                       "seconds_off": round(t1 - t0, 2), "seconds_on": round(t2 - t1, 2),
                       "teacher_sha256": meta["sha256"], "machine": env}  # fmt: skip
                append_jsonl(out, row)
                s = report.safety or {}
                nan = float("nan")
                print(f"{model_name} K={k} seed={seed} {method}: fired={s.get('fired')} identical={same} "
                      f"student {s.get('student_error', nan):.4g} start {s.get('start_error', nan):.4g} "
                      f"val {row['val_accuracy_off']:.4f} -> {row['val_accuracy_on']:.4f}", flush=True)  # fmt: skip


def summarize(out: Path, md: Path) -> None:
    rows = read_jsonl(out)
    lines = [
        "# Safety net on trained teachers (validation images of the train split; never test)",
        "",
        f"`benchmarks/probe_safety_trained.py`, raw rows in `{out.name}`. Structured keep 0.5, lstsq, "
        '`safety="off"` (main) vs `safety="views"` with `views` check views (flip + shift 1/16) in one process. '
        "Errors: ||F^S - F^T|| / ||F^T|| on the check views. Shared, loaded 2-core machine.",
        "",
        "`net`: s6, the first check and a guarded re-run judged on the same views; s7, the guarded re-run judged "
        "on a second set and the L1 start as a second reference (run when the ratio is >= `safety_l1_ratio`, "
        "0.45; `L1 run`).",
        "",
        "| model | K | seed | method | views | net | fired | returned | student err (views) | start err (views) | "
        "ratio | L1 run | identical | val off | val on | time on / off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fired = 0
    for r in sorted(rows, key=_key):
        s = r["safety"] or {}
        fired += bool(s.get("fired"))
        se, st = s.get("student_error"), s.get("start_error")
        ratio = f"{se / st:.3f}" if se is not None and st else ""
        lines.append(
            f"| {r['model']} | {r['k']} | {r['seed']} | {r['method']} | {r.get('views', 16)} | "
            f"{r.get('net', 's6')} | {s.get('fired')} | {s.get('returned')} | "
            f"{se:.4g} | {st:.4g} | {ratio} | {'l1_start_error' in s} | {r['identical']} | "
            f"{100 * r['val_accuracy_off']:.2f} | "
            f"{100 * r['val_accuracy_on']:.2f} | {r['seconds_on'] / max(r['seconds_off'], 1e-9):.2f} |"
        )
    lines += ["", f"Fired in {fired} of {len(rows)} cells."]
    md.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["nc", "ours", "ours-s"])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--views", type=int, default=8, help="safety_views of the run with the net on")
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--net", default="s7", help="the safety net's version, recorded in the rows (s6: session 6's)")
    ap.add_argument("--summary", action="store_true", help="only rebuild the markdown summary")
    args = ap.parse_args()
    out = RESULTS / f"safety_trained_{args.dataset}.jsonl"
    if not args.summary:
        torch.set_num_threads(1)
        run(args, out)
    summarize(out, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
