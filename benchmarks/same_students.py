"""Did a speed change keep the results? Students of ResNet-56 K=5 (seed 0, keep 0.5) by several methods,
dumped under one code version and compared with another's dump.

    (cd /tmp/old-snapshot && PYTHONPATH=$PWD python /work/wt/benchmarks/same_students.py dump /tmp/old.pt)
    PYTHONPATH=$PWD python benchmarks/same_students.py dump /tmp/new.pt
    python benchmarks/same_students.py compare /tmp/old.pt /tmp/new.pt --out benchmarks/results/same_students.md

Compared: kept channels per layer, the largest relative difference of any weight tensor
(||a - b|| / ||a||), the output error against the teacher, and the per-layer objectives after the re-fit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

METHODS = {"ours": {"mu": 0.9}, "nc": {}, "ours-s": {}, "thinet": {}, "cp": {}}


def dump(path: Path) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from common import teacher_path

    from crossdistill.checkpoint import load_checkpoint
    from crossdistill.data import load_few_shot
    from crossdistill.methods import run_method

    teacher, _ = load_checkpoint(teacher_path("resnet56", "fashion-mnist"))
    images, _ = load_few_shot("fashion-mnist", 5, 0)
    out = {}
    for method, extra in METHODS.items():
        student, report = run_method(method, teacher.eval(), images, keep=0.5, **extra)
        out[method] = {
            "state": {k: v.clone() for k, v in student.state_dict().items()},
            "kept": [r.kept_channels for r in report.layers],
            "error": report.output_error,
            "loss_after": [r.loss_after for r in report.layers],
        }
    torch.save(out, path)


def compare(a_path: Path, b_path: Path, label: str) -> str:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    lines = [
        f"# Same students? {label}",
        "",
        "ResNet-56 Fashion-MNIST teacher, K=5 seed 0, keep 0.5 (benchmarks/same_students.py).",
        "",
        "| method | kept channels identical | max relative weight difference | output error (a / b) "
        "| max relative difference of a layer's objective |",
        "|---|---|---|---|---|",
    ]
    for m in a:
        sa, sb = a[m]["state"], b[m]["state"]
        rel = max(
            float((sa[k].double() - sb[k].double()).norm() / max(float(sa[k].double().norm()), 1e-30))
            for k in sa
            if sa[k].is_floating_point()
        )
        lrel = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a[m]["loss_after"], b[m]["loss_after"], strict=True))
        lines.append(
            f"| {m} | {a[m]['kept'] == b[m]['kept']} | {rel:.1e} | {a[m]['error']:.6f} / {b[m]['error']:.6f} "
            f"| {lrel:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["dump", "compare"])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.action == "dump":
        dump(args.paths[0])
        return
    text = compare(args.paths[0], args.paths[1], args.label)
    print(text)
    if args.out is not None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
