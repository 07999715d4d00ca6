"""Summary of the end-to-end and MiR cells: mean ± std over seeds per (model, K, method), with NC and Ours-S
from the main grid on the same draws for reference.

Reads ``results/accuracy_<dataset>_e2e.jsonl`` (bench_accuracy.py --out ...) and
``results/accuracy_<dataset>.jsonl``; writes ``results/accuracy_<dataset>_e2e.md`` and the README
section between ``<!-- BEGIN e2e_summary -->`` and ``<!-- END e2e_summary -->``.

    python benchmarks/e2e_table.py
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from common import RESULTS, read_jsonl
from tables import generated, header, mean_std, publish

REFERENCE = ("nc", "ours-s")  # layer-wise rows of the main grid shown beside the end-to-end ones


def _cell(values: list[float]) -> str:
    return mean_std(values, std_of_one=True) + f" (n={len(values)})"


def table(dataset: str) -> str:
    e2e = read_jsonl(RESULTS / f"accuracy_{dataset}_e2e.jsonl")
    main = read_jsonl(RESULTS / f"accuracy_{dataset}.jsonl")
    acc: dict[tuple, dict[int, float]] = defaultdict(dict)  # (model, pruning, k, method) -> seed -> accuracy
    for r in e2e:
        acc[r["model"], (r["prune"], r["keep"]), r["k"], r["method"]][r["seed"]] = r["accuracy"]
    lines = [
        f"Test split, top-1 % (mean ± std over the seeds run); `{dataset}` rows of `accuracy_*_e2e.jsonl`, "
        "NC / Ours-S from the main grid on the same seeds.",
        "",
        *header("model", "pruning", "K", "method", "accuracy"),
    ]
    for group in sorted({key[:3] for key in acc}):
        model, (prune, keep), k = group
        seeds = sorted({s for key, v in acc.items() if key[:3] == group for s in v})
        for method in REFERENCE:
            ref = [
                r["accuracy"]
                for r in main
                if (r["model"], r["k"], r["method"], r["prune"], r["keep"]) == (model, k, method, prune, keep)
                and r["seed"] in seeds
                and r.get("solver", "lstsq") == "lstsq"
            ]
            if ref:
                lines.append(f"| {model} | {prune} {keep} | {k} | {method} (main grid) | {_cell(ref)} |")
        for key, by_seed in sorted(acc.items()):
            if key[:3] == group:
                lines.append(f"| {model} | {prune} {keep} | {k} | {key[3]} | {_cell(list(by_seed.values()))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    args = parser.parse_args()
    name = f"accuracy_{args.dataset}_e2e"
    publish(
        RESULTS / f"{name}.md", table(args.dataset) + "\n", generated("e2e_table.py", f"{name}.jsonl"), "e2e_summary"
    )


if __name__ == "__main__":
    main()
