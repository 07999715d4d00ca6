"""Build markdown tables and plots from the committed benchmark results.

    python benchmarks/report.py

Reads results/accuracy_<dataset>.jsonl, results/speed.jsonl and results/solvers.jsonl; writes
results/*.md, results/accuracy_vs_k_<dataset>_<model>_<prune>.png, and the tables in README.md
(between its BEGIN/END markers).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from common import RESULTS, ROOT, read_jsonl
from tables import fill_readme, generated, header, mean_std, plot_vs_k, publish

ORDER = ["teacher", "l1", "l1+bp", "fitnet", "fskd", "thinet", "cp", "nc", "ours", "ours-s"]


def label(r: dict) -> str:
    """Method name with the hyperparameters that distinguish its variants."""
    m = r["method"]
    if m.startswith("ours-s"):
        return f"{m} (α={r['alpha']}, β={r['beta']})"
    if m.startswith("ours"):
        return f"{m} (μ={r['mu']})"
    return m


def order(m: str) -> int:
    base = m.split(" ")[0].removesuffix("+refit")
    return ORDER.index(base) if base in ORDER else 99


def accuracy_tables(path: Path) -> str:
    rows = read_jsonl(path)
    groups: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    teacher: dict[tuple, float] = {}
    seconds: dict[tuple, list[float]] = defaultdict(list)
    shrink: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for r in rows:
        g = (r["model"], r["prune"], r["keep"], r["solver"])
        groups[g][(label(r), r["k"])].append(r["accuracy"])
        teacher[g] = r["teacher_accuracy"]
        seconds[(*g, label(r))].append(r["compress_seconds"])
        shrink[g].append((r["flops"][0] / r["flops"][1], r["params"][0] / r["params"][1], r["sparsity"]))
    out = []
    for g in sorted(groups):
        model, prune, keep, solver = g
        cells = groups[g]
        ks = sorted({k for _, k in cells})
        methods = sorted({m for m, _ in cells}, key=lambda m: (order(m), m))
        seeds = max(len(v) for v in cells.values())
        out.append(f"### {model}, {prune} keep {keep} (solver {solver}; mean ± std over {seeds} seeds, top-1 %)\n")
        flops, params, sparse = (statistics.median(x) for x in zip(*shrink[g], strict=True))
        if prune == "structured":
            out.append(f"Student (every method): dense FLOPs ÷{flops:.2f}, parameters ÷{params:.2f}.\n")
        else:
            out.append(f"Student (every method): {100 * sparse:.1f}% of the pruned layers' weights are zero "
                       "(dense FLOPs unchanged; speed needs a sparse kernel).\n")  # fmt: skip
        out += header("method", *(f"K={k}" for k in ks), "compress time (s)")
        out.append("| teacher | " + " | ".join(f"{100 * teacher[g]:.2f}" for _ in ks) + " | |")
        for m in methods:
            accs = [
                mean_std(cells[(m, k)]) + (f" (n={len(cells[(m, k)])})" if len(cells[(m, k)]) < seeds else "")
                if (m, k) in cells
                else ""
                for k in ks
            ]
            sec = statistics.median(seconds[(*g, m)])
            out.append(f"| {m} | " + " | ".join(accs) + f" | {sec:.1f} |")
        out.append("")
        series = {m: {k: cells[(m, k)] for k in ks if (m, k) in cells} for m in methods}
        plot = RESULTS / f"accuracy_vs_k_{path.stem.replace('accuracy_', '')}_{model}_{prune}.png"
        plot_vs_k(series, plot, f"{model}, {prune} keep {keep}", teacher[g], _line_width)
    return "\n".join(out)


def _line_width(method: str) -> dict:
    return {"lw": 2 if method.startswith("ours") else 1}


def speed_table(path: Path) -> str:
    rows = read_jsonl(path)
    if not rows:
        return ""
    out = [
        "| model | K | solver | compress time (s) | peak RSS (MB) | accuracy % | mean final layer loss | "
        "FLOPs reduction | speed-up b1 | speed-up b64 | b64 speed-up / FLOPs reduction | "
        "optimized: speed-up b1 | optimized: speed-up b64 | optimized: b64 / FLOPs | student b64 ms (eager / opt) | "
        "threads | load avg |",
        "|---" * 18 + "|",
    ]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["k"], r["solver"], r.get("iterations"))].append(r)
    for (model, k, solver, iters), rs in sorted(groups.items(), key=str):

        def med(key: str, rs: list = rs) -> float:
            return statistics.median(r[key] for r in rs)

        def opt(key: str, divide: float = 1.0, suffix: str = "x", rs: list = rs) -> str:
            have = [r[key] for r in rs if key in r]  # rows from before the optimized measurement lack it
            return f"{statistics.median(have) / divide:.2f}{suffix}" if have else "n/a"

        label = f"adam ({iters} it)" if solver == "adam" else solver
        load = statistics.median(r.get("loadavg_1min_after", float("nan")) for r in rs)
        out.append(
            f"| {model} | {k} | {label} | {med('compress_seconds'):.1f} (n={len(rs)}) | {med('peak_rss_mb'):.0f} | "
            f"{100 * med('accuracy'):.2f} | {med('mean_final_layer_loss'):.4f} | {med('flops_reduction'):.2f}x | "
            f"{med('speedup_b1'):.2f}x | {med('speedup_b64'):.2f}x | "
            f"{med('speedup_b64') / med('flops_reduction'):.2f} | {opt('speedup_opt_b1')} | {opt('speedup_opt_b64')} | "
            f"{opt('speedup_opt_b64', med('flops_reduction'), '')} | {med('student_b64_ms'):.1f} / "
            f"{opt('student_opt_b64_ms', suffix='')} | {rs[0]['threads']} | {load:.1f} |"
        )
    return "\n".join(out) + "\n"


def teacher_table() -> str:
    import json

    out = ["| teacher | Fashion-MNIST test accuracy | epochs | training time (threads) | sha256 (first 12) |",
           "|---|---|---|---|---|"]  # fmt: skip
    for side in sorted((ROOT / "teachers").glob("*.json")):
        m = json.loads(side.read_text())
        out.append(
            f"| {m['model']} | {100 * m['test_accuracy']:.2f} % | {m['recipe']['epochs']} | "
            f"{m['train_time_s'] / 60:.0f} min ({m.get('threads', '?')}) | `{m['sha256'][:12]}` |"
        )
    return "\n".join(out)


def main() -> None:
    sections = {"teacher_rows": teacher_table(), "results_tables": "", "solver_table": "", "speed_section": ""}
    for path in sorted(RESULTS.glob("accuracy_*.jsonl")):
        if "_e2e" in path.stem or "_grid" in path.stem:  # e2e_table.py / grid_table.py render those
            continue
        text = accuracy_tables(path)
        sections["results_tables"] += text + "\n"
        publish(RESULTS / f"{path.stem}.md", text, generated("report.py", path.name))
    for name in ("speed", "solvers"):
        table = speed_table(RESULTS / f"{name}.jsonl")
        if table:
            publish(RESULTS / f"{name}.md", table, generated("report.py", f"{name}.jsonl"))
            sections["solver_table" if name == "solvers" else "speed_section"] = table
    fill_readme(sections)


if __name__ == "__main__":
    main()
