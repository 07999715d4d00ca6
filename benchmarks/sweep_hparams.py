"""Hyperparameters by validation: Ours' mu, Ours-S' alpha/beta, MiR refinement lr/steps (resumable).

    OMP_NUM_THREADS=1 python benchmarks/sweep_hparams.py --models resnet20 --ks 1 5 --seeds 0 1 2
    python benchmarks/sweep_hparams.py --summary     # rebuild the markdown summary only

Validation, never test: every setting is scored by top-1 accuracy on a
validation split drawn from the TRAIN split (``--val-per-class`` images per
class, ``crossdistill.data.load_validation``), disjoint from the few-shot
draw of that (K, seed). The test split is never loaded.

Cells (one JSONL row each, skipped when already in the results file):

- ``nc``; ``ours`` for each mu of ``--mus``; ``ours-s`` for each (alpha, beta) of ``--alpha-betas``;
- ``--baselines`` (instead of the above): ``l1+bp`` and ``fitnet`` for BN handling
  (train / eval / recalibrate) x lr (``--baseline-lrs``);
- ``refine``: :func:`crossdistill.mir.mir_refine` from the NC student (``start=nc``: NC+MiR) and from
  the L1-norm student (``start=l1``: the ``mir`` method), for each lr of ``--lrs``, and from the L1
  student with BN statistics re-estimated first (``start=l1-recal``, ``--recal-lrs``), with the
  validation accuracy every ``--eval-every`` steps up to ``--max-steps`` (constant lr, so the
  accuracy at step s is that of a run of s steps).

The summary (``results/sweep_hparams_<dataset>.md``) averages over seeds and
names the best setting per (model, K).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import RESULTS, append_jsonl, machine, official_mu, read_jsonl, teacher_path, validation_draws
from tables import write_md

from crossdistill.checkpoint import load_checkpoint
from crossdistill.compress import CompressConfig
from crossdistill.data import dataset_info
from crossdistill.methods import run_method
from crossdistill.mir import MirConfig, MirExtras, mir_refine

KEYS = ("model", "prune", "keep", "k", "seed", "method", "params")


@torch.no_grad()
def val_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(y), 500))
    return correct / len(y)


FAMILIES = ("plain", "refine-nc", "refine-l1", "mir", "baselines")


def cells(args: argparse.Namespace) -> list[tuple[str, dict]]:
    fams = set(args.only) if args.only else ({"baselines"} if args.baselines else set(FAMILIES) - {"baselines"})
    out: list[tuple[str, dict]] = []
    if "plain" in fams:
        out += [("nc", {})]
        out += [("ours", {"mu": mu}) for mu in args.mus]
        out += [
            ("ours-s", {"alpha": float(a), "beta": float(b)}) for a, b in (ab.split(",") for ab in args.alpha_betas)
        ]
    if "refine-nc" in fams:  # the +mir refinement after a layer-wise solve
        out += [("refine", {"start": "nc", "lr": lr}) for lr in args.lrs]
    if "refine-l1" in fams:
        out += [("refine", {"start": "l1", "lr": lr}) for lr in args.lrs]
    if "mir" in fams:  # method mir: L1 start, BN statistics re-estimated first
        out += [("refine", {"start": "l1-recal", "lr": lr}) for lr in args.recal_lrs]
    if "baselines" in fams:  # end-to-end baselines: BN handling x lr (train mode: the old default, one lr)
        grid = [("train", 0.01)] if "train" in args.baseline_modes else []
        grid += [(bn, lr) for bn in args.baseline_modes if bn != "train" for lr in args.baseline_lrs]
        out += [(b, {"bn_mode": bn, "lr": lr}) for b in ("l1+bp", "fitnet") for bn, lr in grid]
    return [(m, {k: v if isinstance(v, str) else float(v) for k, v in p.items()}) for m, p in out]


def run(args: argparse.Namespace, out: Path) -> None:
    done = {tuple(json.dumps(r[k], sort_keys=True) for k in KEYS) for r in read_jsonl(out)}
    info = dataset_info(args.dataset)
    env = machine()
    for seed, k, images, labels, vx, vy in validation_draws(info, args.seeds, args.ks, args.val_per_class):
        for model_name in args.models:
            path = teacher_path(model_name, info.name)
            if not path.exists():
                print(f"skip {model_name}: no teacher at {path}")
                continue
            teacher, meta = load_checkpoint(path)
            starts: dict[str, torch.nn.Module] = {}
            for method, params in cells(args):
                cell = {"model": model_name, "prune": "structured", "keep": args.keep, "k": k, "seed": seed,
                        "method": method, "params": params}  # fmt: skip
                if tuple(json.dumps(cell[key], sort_keys=True) for key in KEYS) in done:
                    continue
                t0 = time.perf_counter()
                cfg = CompressConfig(keep=args.keep, mu=official_mu(model_name))
                row = {**cell, "dataset": info.name, "val_images": len(vy), "teacher_sha256": meta["sha256"]}
                if method != "refine":
                    student, _ = run_method(method, teacher, images, labels, cfg, **params)
                    row["val_accuracy"] = val_accuracy(student, vx, vy)
                else:
                    start = params["start"].removesuffix("-recal")
                    if start not in starts:
                        starts[start], _ = run_method(start, teacher, images, labels, cfg)
                    curve: list[dict] = []

                    def record(step: int, model: torch.nn.Module, c=curve, x=vx, y=vy) -> None:
                        c.append({"step": step, "val_accuracy": val_accuracy(model, x, y)})

                    mcfg = MirConfig(steps=args.max_steps, lr=params["lr"], eval_every=args.eval_every,
                                     recalibrate_bn=params["start"].endswith("-recal"))  # fmt: skip
                    _, rinfo = mir_refine(starts[start], teacher, images, mcfg, extras=MirExtras(on_eval=record))
                    row["curve"] = curve
                    row["loss_before"], row["loss_after"] = rinfo["loss_before"], rinfo["loss_after"]
                row["seconds"] = time.perf_counter() - t0
                row["machine"] = {**env, "note": "shared 2-core machine, loaded by other jobs"}
                append_jsonl(out, row)
                acc = row.get("val_accuracy", max((c["val_accuracy"] for c in row.get("curve", [])), default=0))
                print(f"{model_name} K={k} seed={seed} {method} {params} val {acc:.4f} ({row['seconds']:.0f} s)",
                      flush=True)  # fmt: skip


def summarize(out: Path, md: Path) -> None:
    """Mean validation accuracy over seeds per setting; refinement curves as step columns; best per family."""
    rows = read_jsonl(out)
    plain: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    curves: dict[tuple, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        group = (r["model"], r["k"])
        if r["method"] == "refine":
            name = f"{r['params']['start']}+mir lr={r['params']['lr']:g}"
            for c in r["curve"]:
                curves[group][name][c["step"]].append(c["val_accuracy"])
        else:
            p = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
            plain[group][f"{r['method']} {p}".strip()].append(r["val_accuracy"])
    lines = [
        "# Hyperparameters by validation (train split, disjoint from the few-shot draw; never test)",
        "",
        f"Raw rows: `{out.name}` ({len(rows)} cells). Mean validation accuracy (%) over the seeds run (n);",
        "one seed's validation set has 100 images per class, so single differences below ~1 point are noise.",
        "",
    ]
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    for group in sorted(set(plain) | set(curves)):
        model, k = group
        lines += [f"## {model}, K={k}", ""]
        best: dict[str, tuple[float, str]] = {}
        if plain[group]:
            lines += ["| setting | val acc | n |", "|---|---|---|"]
            for name, accs in sorted(plain[group].items()):
                lines.append(f"| {name} | {mean(accs):.2f} | {len(accs)} |")
                family = name.split(" ")[0]
                if family not in best or mean(accs) > best[family][0]:
                    best[family] = (mean(accs), name)
            lines.append("")
        if curves[group]:
            steps = sorted({s for c in curves[group].values() for s in c})
            lines += ["| refinement \\ steps | " + " | ".join(map(str, steps)) + " | n |",
                      "|---|" + "---|" * (len(steps) + 1)]  # fmt: skip
            for name, c in sorted(curves[group].items()):
                cells = [f"{mean(c[s]):.2f}" if s in c else "" for s in steps]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(c[steps[0]])} |")
                family = name.split(" ")[0]
                for s in steps:
                    if s in c and (family not in best or mean(c[s]) > best[family][0]):
                        best[family] = (mean(c[s]), f"{name} steps={s}")
            lines.append("")
        lines += ["Best per family: " + "; ".join(f"**{n}** ({m:.2f})" for m, n in best.values()), ""]
    write_md(md, "\n".join(lines) + "\n")
    print(f"wrote {md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--mus", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--alpha-betas", nargs="+", default=["0.5,0.5", "0.6,0.6", "0.7,0.7", "0.8,0.8", "0.9,0.9",
                                                         "0.7,0.9", "0.9,0.7"])  # fmt: skip
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3])
    ap.add_argument("--recal-lrs", nargs="+", type=float, default=[1e-3], help="L1 + BN recalibration + MiR")
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--baselines", action="store_true", help="instead: l1+bp / fitnet BN mode x lr")
    ap.add_argument("--baseline-lrs", nargs="+", type=float, default=[0.01, 0.001])
    ap.add_argument("--baseline-modes", nargs="+", default=["train", "eval", "recalibrate"], help="BN handling")
    ap.add_argument("--only", nargs="+", choices=FAMILIES, default=None, help="cell families to run")
    ap.add_argument("--summary", action="store_true", help="only rebuild the markdown summary")
    ap.add_argument("--out", default=None, help="results file (default results/sweep_hparams_<dataset>.jsonl)")
    args = ap.parse_args()
    out = RESULTS / f"sweep_hparams_{args.dataset}.jsonl" if args.out is None else Path(args.out)
    if not args.summary:
        torch.manual_seed(0)
        run(args, out)
    summarize(out, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
