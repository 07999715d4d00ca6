"""Tables and plots of the #12 grid (``results/accuracy_<dataset>_grid.jsonl``, bench_accuracy.py via
run_grid.sh): mean ± std over seeds per method x K per model, the cells still missing, accuracy-vs-K
plots, and per (model, K) whether our best (a layer-wise solve + MiR refinement) beats MiR, FitNet and NC.

    python benchmarks/grid_table.py          # writes results/accuracy_<dataset>_grid.md, the plots, README

"Our best" is the refined layer-wise method with the highest mean in that cell among nc+mir, ours+mir
and ours-s+mir (picked on test, so optimistic by the choice among three); the margin is the mean
paired difference on the seeds both have run (same draws), ``wins`` the seeds on which it is ahead.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from common import RESULTS, read_jsonl
from tables import generated, header, mean_std, plot_vs_k, publish

METHODS = ["l1", "l1+bp", "fitnet", "mir", "nc", "ours", "ours-s", "nc+mir", "ours+mir", "ours-s+mir"]
OURS_REFINED = ("nc+mir", "ours+mir", "ours-s+mir")
RIVALS = ("mir", "fitnet", "nc")
KS, SEEDS = (1, 2, 5, 10), (0, 1, 2)
MODELS = {"resnet56": ("ResNet-56", METHODS), "vgg16": ("VGG-16", METHODS)}


def _ms(xs: list[float]) -> str:
    return mean_std(xs, digits=1) + ("" if len(xs) == 3 else f" (n={len(xs)})") if xs else "–"


def load(dataset: str) -> dict[tuple, dict[int, float]]:
    """(model, K, method) -> seed -> accuracy (the last row of a cell wins)."""
    acc: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in read_jsonl(RESULTS / f"accuracy_{dataset}_grid.jsonl"):
        if r["prune"] == "structured" and r["keep"] == 0.5:
            acc[(r["model"], r["k"], r["method"])][r["seed"]] = r["accuracy"]
    return acc


def verdicts(acc: dict, model: str, k: int) -> list[str]:
    """Our best refined method against each rival in one (model, K) cell."""
    means = {m: statistics.mean(acc[(model, k, m)].values()) for m in OURS_REFINED if acc.get((model, k, m))}
    if not means:
        return ["no refined layer-wise cell yet"]
    best = max(means, key=means.get)
    out = [f"best refined: **{best}** {100 * means[best]:.1f}"]
    for rival in RIVALS:
        theirs = acc.get((model, k, rival))
        if not theirs:
            out.append(f"{rival}: missing")
            continue
        ours = acc[(model, k, best)]
        seeds = sorted(set(ours) & set(theirs))  # compared on the same draws only
        margin = 100 * statistics.mean(ours[s] - theirs[s] for s in seeds) if seeds else float("nan")
        wins = sum(ours[s] > theirs[s] for s in seeds)
        verdict = "beats" if margin > 0 else "does NOT beat"
        out.append(
            f"vs {rival} {margin:+.2f} on seeds {','.join(map(str, seeds))} ({verdict}; wins {wins}/{len(seeds)})"
        )
    return out


def build(dataset: str) -> tuple[str, list[str]]:
    acc = load(dataset)
    lines, missing = [], []
    for model, (name, methods) in MODELS.items():
        lines += [f"**{name}**, structured keep 0.5, test top-1 % (mean ± std over seeds 0-2; n = seeds done)", ""]
        lines += header("method", *(f"K={k}" for k in KS))
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_ms(list(acc.get((model, k, m), {}).values())) for k in KS) + " |")
            for k in KS:
                gone = [s for s in SEEDS if s not in acc.get((model, k, m), {})]
                if gone:
                    missing.append(f"{name} K={k} {m}: seeds {', '.join(map(str, gone))}")
        lines += ["", *header("K", "our best vs MiR, FitNet, NC")]
        lines += [f"| {k} | " + "; ".join(verdicts(acc, model, k)) + " |" for k in KS]
        lines.append("")
        if any(key[0] == model for key in acc):
            series = {m: {k: list(acc.get((model, k, m), {}).values()) for k in KS} for m in methods}
            plot = RESULTS / f"grid_accuracy_vs_k_{dataset}_{model}.png"
            plot_vs_k(series, plot, f"{name}, {dataset}, structured keep 0.5 (#12 grid)", style=_line_style)
    return "\n".join(lines), missing


def _line_style(method: str) -> dict:
    """Refined methods solid, layer-wise dashed, the rest dotted."""
    return {"linestyle": "-" if method.endswith("+mir") else "--" if method in ("nc", "ours", "ours-s") else ":"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    body, missing = build(args.dataset)
    gone = "Missing cells (not run yet): " + ("; ".join(missing) if missing else "none") + "."
    text = body + "\n" + gone + "\n"
    name = f"accuracy_{args.dataset}_grid"
    publish(RESULTS / f"{name}.md", text, generated("grid_table.py", f"{name}.jsonl"), section="grid_table")


if __name__ == "__main__":
    main()
