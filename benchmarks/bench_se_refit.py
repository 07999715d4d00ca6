"""Squeeze-excite networks: held-out output error per method, with and without the SE squeeze re-fit.

    OMP_NUM_THREADS=1 python benchmarks/bench_se_refit.py      # writes results/se_refit.jsonl and se_refit.md

The SE networks of tests/zoo.py (efficientnet, mobilenet_v3), random init, BN statistics set on the
images, 20 fitted / 40 held-out N(0, 1) images at 16x16 (bench_coverage.py's setting), structured keep
0.5. For each method: the held-out output error ||F^S(x) - F^T(x)|| / ||F^T(x)|| with the squeeze conv
re-fitted on the kept channels (the default, ``run._refit_gate_inputs``) and with it left as sliced
(the function replaced by a no-op), and nc / ours once more with ``holdout=0.2, ridge="auto"``.
The L1 student (no re-fit at all) is the reference. One process, one thread, a few minutes.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, machine
from tables import publish

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "tests" / "zoo.py"
OUT, TABLE = RESULTS / "se_refit.jsonl", RESULTS / "se_refit.md"
ARCHS = ["efficientnet", "mobilenet_v3"]
METHODS = ["ours", "nc", "thinet", "cp"]


def main() -> None:
    import json

    import crossdistill.run as run_module
    from crossdistill.compress import recalibrate_bn
    from crossdistill.methods import run_method
    from crossdistill.models import load_model_file
    from crossdistill.run import output_error

    torch.set_num_threads(1)
    refit = run_module._refit_gate_inputs
    rows = []
    for arch in ARCHS:
        torch.manual_seed(0)
        teacher = load_model_file(f"{ZOO}:{arch}")
        gen = torch.Generator().manual_seed(1)
        fit, held = torch.randn(20, 3, 16, 16, generator=gen), torch.randn(40, 3, 16, 16, generator=gen)
        recalibrate_bn(teacher, torch.cat([fit, held]))
        teacher.eval()
        cells = [("l1", "no re-fit", {})]
        cells += [(m, v, {}) for m in METHODS for v in ("squeeze re-fitted", "squeeze sliced")]
        cells += [
            (m, "squeeze re-fitted, holdout 0.2 + ridge auto", {"holdout": 0.2, "ridge": "auto"})
            for m in ("nc", "ours")
        ]
        for method, variant, kw in cells:
            run_module._refit_gate_inputs = refit if variant != "squeeze sliced" else (lambda *args: None)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                student, report = run_method(method, teacher, fit, keep=0.5, **kw)
            row = {"arch": arch, "method": method, "variant": variant,
                   "flops_ratio": report.flops_after / report.flops_before,
                   "fit_output_error": output_error(student, teacher, fit),
                   "heldout_output_error": output_error(student, teacher, held),
                   "seconds": time.perf_counter() - t0, "machine": machine()}  # fmt: skip
            rows.append(row)
            print(arch, method, variant, f"held-out {row['heldout_output_error']:.4f}", flush=True)
    run_module._refit_gate_inputs = refit
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        "SE networks of tests/zoo.py, keep 0.5, 20 fitted / 40 held-out noise images, random init "
        "(benchmarks/bench_se_refit.py; shared 2-core machine, one thread).",
        "",
        "| architecture | method | variant | FLOPs | output error, fitted | output error, held out |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['method']} | {r['variant']} | x{r['flops_ratio']:.2f} | "
            f"{r['fit_output_error']:.4f} | {r['heldout_output_error']:.4f} |"
        )
    publish(TABLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
