"""Held-out output error of NC / Ours / Ours-S vs L1 without re-fit on the tiny zoo networks (#13).

Each tests/zoo.py network (random init, 3x16x16, keep 0.5) is fitted on 4 or 8 N(0,1) images and
scored on 16 others: ||F^S - F^T|| / ||F^T|| at the output, for main's default (``safety="off"``),
``ridge_per_unknown=1``, ``ridge_cv``, ``ridge_guard`` (split halves), ``ridge_guard="views"`` alone (each with
the safety net off), and the new default (the safety net, ``safety="views"``). Rows go to
``results/ridge_rule_zoo.jsonl`` (replaced), the table to
``ridge_rule_zoo.md``.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_ridge_zoo.py
    PYTHONPATH=$PWD python benchmarks/probe_ridge_zoo.py table     # the .md from the JSONL
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_ridge_zoo.py only "safety 16 views"  # re-run settings
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
from common import RESULTS, ROOT, machine

from crossdistill.compress import recalibrate_bn
from crossdistill.methods import run_method
from crossdistill.run import output_error

sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402

OFF = {"safety": "off"}
SETTINGS = {
    "off": OFF,  # main's default before the safety net
    "per_unknown=1": {"ridge_per_unknown": 1.0, **OFF},
    "cv": {"ridge_cv": True, **OFF},
    "guard": {"ridge_guard": True, **OFF},
    "views guard": {"ridge_guard": "views", "safety_views": 16, **OFF},
    "safety 16 views": {"safety_views": 16},
    "safety (default, 8 views)": {},  # session 7: second views for the guarded re-run, the L1 start as a reference
}
METHODS = ("nc", "ours", "ours-s")
TOL = 1.05  # "no worse than L1": within 5 %


def main(only: list[str] | None = None) -> None:
    """Every setting, or with ``only`` those settings (the other rows are kept from the JSONL)."""
    torch.set_num_threads(1)
    builders = {n: getattr(zoo, n) for n in zoo.ALL} | dict(zoo.PATTERNS)
    out = RESULTS / "ridge_rule_zoo.jsonl"
    rows = []
    if only:
        saved = [json.loads(line) for line in out.read_text().splitlines()]
        rows = [r for r in saved if r["setting"] in SETTINGS and r["setting"] not in only]
    for n_fit in (4, 8):
        for arch, build in builders.items():
            torch.manual_seed(0)
            teacher = build()
            g = torch.Generator().manual_seed(1)
            fit, held = torch.randn(n_fit, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
            recalibrate_bn(teacher, torch.cat([fit, held]))
            teacher.eval()
            jobs = [("l1", "off")] + [(m, s) for s in SETTINGS for m in METHODS]
            if only:
                jobs = [(m, s) for m, s in jobs if s in only]
            for method, setting in jobs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    student, _ = run_method(method, teacher, fit, keep=0.5, **SETTINGS[setting])
                errors = {"held": output_error(student, teacher, held), "fit": output_error(student, teacher, fit)}
                row = {"arch": arch, "images": n_fit, "method": method, "setting": setting, **errors}
                rows.append(row)
                print(json.dumps(row), flush=True)
    env = {**machine(), "note": "shared 2-core machine"}
    out.write_text("".join(json.dumps({**r, "machine": r.get("machine", env)}) + "\n" for r in rows))
    table(rows, list(builders))


def table(rows: list[dict], archs: list[str]) -> None:
    """``ridge_rule_zoo.md`` from the rows (``python probe_ridge_zoo.py table`` rebuilds it from the JSONL)."""
    lines = [
        "# Held-out output error vs L1 without re-fit, tiny zoo networks (`benchmarks/probe_ridge_zoo.py`)",
        "",
        "Random init, keep 0.5, fitted on 4 or 8 N(0,1) images, scored on 16 others. **Bold**: above L1 x "
        f"{TOL}. Raw rows: `ridge_rule_zoo.jsonl`.",
        "",
        "| net | images | L1 | " + " | ".join(f"{m} {s}" for s in SETTINGS for m in METHODS) + " |",
        "|---|---|---|" + "---|" * (len(SETTINGS) * len(METHODS)),
    ]
    worse = {s: 0 for s in SETTINGS}
    for n_fit in (4, 8):
        for arch in archs:
            get = {(r["method"], r["setting"]): r["held"] for r in rows if r["arch"] == arch and r["images"] == n_fit}
            l1 = get[("l1", "off")]
            cells = []
            for s in SETTINGS:
                for m in METHODS:
                    v = get[(m, s)]
                    worse[s] += v > TOL * l1
                    cells.append(f"**{v:.3g}**" if v > TOL * l1 else f"{v:.3g}")
            lines.append(f"| {arch} | {n_fit} | {l1:.3g} | " + " | ".join(cells) + " |")
    lines += ["", "Students above L1 x 1.05: " + ", ".join(f"{s} {n}" for s, n in worse.items()) + "."]
    (RESULTS / "ridge_rule_zoo.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["table"]:
        saved = [json.loads(line) for line in (RESULTS / "ridge_rule_zoo.jsonl").read_text().splitlines()]
        table(saved, list(dict.fromkeys(r["arch"] for r in saved)))
    elif sys.argv[1:2] == ["only"]:
        main(sys.argv[2:])
    else:
        main()
