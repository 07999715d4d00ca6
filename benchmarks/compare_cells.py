"""Compare two bench_accuracy.py result files cell by cell (a restructuring must not move accuracy).

    python benchmarks/compare_cells.py BEFORE.jsonl AFTER.jsonl --title "..." > results/refactor_check.md

Cells are matched on (model, prune, keep, k, seed, method, solver, mu); the table shows both
accuracies, their difference, and the parameter / FLOP counts of both students.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import read_jsonl

KEY = ("model", "prune", "keep", "k", "seed", "method", "solver", "mu")


def _both(before: dict, after: dict, field: str) -> str:
    return "same" if before[field] == after[field] else f"{before[field]} / {after[field]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--title", default="Before / after")
    args = ap.parse_args()
    before = {tuple(r[k] for k in KEY): r for r in read_jsonl(args.before)}
    after = {tuple(r[k] for k in KEY): r for r in read_jsonl(args.after)}
    print(f"# {args.title}\n")
    print("| model | prune:keep | K | seed | method | acc before | acc after | diff | params b/a | FLOPs b/a |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for key in sorted(before.keys() & after.keys(), key=lambda k: tuple(map(str, k))):
        b, a = before[key], after[key]
        diff = a["accuracy"] - b["accuracy"]
        worst = max(worst, abs(diff))
        print(
            f"| {b['model']} | {b['prune']}:{b['keep']} | {b['k']} | {b['seed']} | {b['method']} "
            f"| {b['accuracy']:.4f} | {a['accuracy']:.4f} | {diff:+.4f} "
            f"| {_both(b, a, 'params')} | {_both(b, a, 'flops')} |"
        )
    missing = sorted(map(str, before.keys() ^ after.keys()))
    print(f"\nCells compared: {len(before.keys() & after.keys())}; largest |accuracy difference|: {worst:.4f}.")
    if missing:
        print(f"Cells in only one file: {', '.join(missing)}")


if __name__ == "__main__":
    main()
