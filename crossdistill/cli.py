"""Command-line interface: a thin typer layer over the library.

User errors (:class:`UserError`) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Few-shot network compression by cross distillation."
)
console = Console(stderr=True)
REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "teachers" / "resnet20_fashion-mnist.safetensors"


def _run(fn):
    try:
        return fn()
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    except FileNotFoundError as e:
        console.print(f"[bold red]error:[/] {e.filename or e}: no such file; check the path")
        raise typer.Exit(2) from None


@app.command("train-teacher")
def train_teacher_cmd(
    model: str = typer.Option("resnet20", help="registered model name (resnet20, resnet32, resnet56, vgg16, lenet5)"),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist | mnist | cifar10 | cifar100"),
    epochs: int = typer.Option(6, help="training epochs"),
    lr: float = typer.Option(0.1, help="peak learning rate of the one-cycle schedule"),
    batch_size: int = typer.Option(128),
    seed: int = typer.Option(0),
    fp16: bool = typer.Option(False, help="store weights as float16"),
    out: Path | None = typer.Option(None, help="output .safetensors (default teachers/<model>_<dataset>.safetensors)"),
    data_dir: Path | None = typer.Option(None, help="folder holding the data set files"),
) -> None:
    """Train a teacher (resumable: rerun the same command to continue after an interruption)."""
    from .train import TrainConfig, train_teacher

    def go():
        cfg = TrainConfig(model=model, dataset=dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          fp16_storage=fp16)  # fmt: skip
        path = out or Path("teachers") / f"{model}_{dataset}.safetensors"
        meta = train_teacher(cfg, path, data_dir)
        console.print(f"saved {path}: test accuracy {meta['test_accuracy']:.4f}, {meta['train_time_s']:.0f} s")

    _run(go)


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="a .safetensors checkpoint with its .json sidecar"),
    dataset: str | None = typer.Option(None, help="data set (default: the one in the checkpoint)"),
    limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
    latency: bool = typer.Option(True, help="measure CPU latency at batch 1 and 64"),
    data_dir: Path | None = typer.Option(None),
    json_out: Path | None = typer.Option(None, "--json", help="also write the numbers as JSON"),
) -> None:
    """Accuracy on the test split, parameters, FLOPs, size on disk and latency of a checkpoint."""
    from .checkpoint import atomic_write
    from .evaluate import evaluate_checkpoint, render_table

    def go():
        report, meta = evaluate_checkpoint(checkpoint, dataset=dataset, data_dir=data_dir, limit=limit,
                                           latency=latency)  # fmt: skip
        Console().print(render_table({checkpoint.stem: report}, title=f"{meta['model']} on {meta['dataset']}"))
        if "test_accuracy" in meta and limit is None:
            console.print(f"stored accuracy {meta['test_accuracy']:.4f}, measured {report.accuracy:.4f}")
        if json_out:
            atomic_write(json_out, lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=2)))

    _run(go)


def _compress_one(teacher, images, cfg, label: str, labels=None):
    """run_method() with a rich progress bar over layers."""
    from .methods import run_method
    from .progress import progress

    with progress() as bar:
        task = bar.add_task(label, total=None)

        def on_layer(i, n, name):
            bar.update(task, total=n, completed=i, description=f"{label}: {name}")

        student, report = run_method(cfg.method, teacher, images, labels, cfg, on_layer=on_layer)
        bar.update(task, completed=len(report.layers))
    return student, report


@app.command()
def compress(
    teacher: Path = typer.Option(..., help="teacher checkpoint (.safetensors + .json)"),
    dataset: str | None = typer.Option(None, help="data set for the few-shot draw (default: the teacher's)"),
    k: int = typer.Option(5, help="images per class drawn from the train split"),
    seed: int = typer.Option(0, help="seed of the few-shot draw"),
    method: str = typer.Option(
        "ours", help="nc | ours | ours-s | correction | imitation | l1 | l1+bp | fitnet | fskd | thinet | cp"
    ),  # fmt: skip
    mu: float | None = typer.Option(None, help="ours: weight of L^c (default: 0.9 ResNets, 0.6 others)"),
    alpha: float = typer.Option(0.7, help="ours-s: teacher-side mix"),
    beta: float = typer.Option(0.7, help="ours-s: student-side mix"),
    prune: str = typer.Option("structured", help="structured | unstructured"),
    keep: float = typer.Option(0.5, help="fraction of channels (structured) or weights (unstructured) kept"),
    solver: str = typer.Option("lstsq", help="lstsq (exact) | adam (official schedule)"),
    iterations: int = typer.Option(3000, help="adam: iterations per layer"),
    lr: float = typer.Option(5e-4, help="adam: learning rate"),
    recalibrate_bn: bool = typer.Option(False, help="re-estimate BN statistics on the few images"),
    include: list[str] | None = typer.Option(None, help="only layers matching these name patterns"),
    exclude: list[str] | None = typer.Option(None, help="leave layers matching these name patterns"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    out: Path = typer.Option(Path("runs/student"), help="output folder"),
    test_limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
    data_dir: Path | None = typer.Option(None),
) -> None:
    """Compress a teacher with K images per class; save the student and print a before/after table."""
    from .checkpoint import load_checkpoint
    from .compress import CompressConfig, official_mu
    from .data import load_few_shot
    from .evaluate import evaluate as eval_model
    from .evaluate import render_table
    from .student import save_student

    def go():
        model, meta = load_checkpoint(teacher)
        ds = dataset or meta["dataset"]
        images, labels = load_few_shot(ds, k, seed, data_dir)
        cfg = CompressConfig(
            method=method, mu=official_mu(model) if mu is None else mu, alpha=alpha, beta=beta, prune=prune,
            keep=keep, solver=solver, iterations=iterations, lr=lr, recalibrate_bn=recalibrate_bn,
            include=include or None, exclude=exclude or None, device=device,
        )  # fmt: skip
        student, report = _compress_one(model, images, cfg, f"{method} K={k}", labels)
        reports = {
            "teacher": eval_model(model, ds, data_dir=data_dir, limit=test_limit),
            f"student ({method})": eval_model(student.cpu(), ds, data_dir=data_dir, limit=test_limit),
        }
        Console().print(render_table(reports, title=f"{meta['model']}, {prune} keep {keep}, K={k}, seed {seed}"))
        rep = {**report.to_dict(), "k": k, "seed": seed, "dataset": ds,
               "evaluation": {n: r.to_dict() for n, r in reports.items()}}  # fmt: skip
        paths = save_student(student, out, meta, rep, images, {"method": method, "k": k, "seed": seed})
        console.print(f"compressed in {report.seconds:.1f} s; student written to {paths['weights'].parent}/")

    _run(go)


@app.command()
def demo(
    teacher: Path = typer.Option(DEMO_TEACHER, help="shipped teacher to compress"),
    k: int = typer.Option(5, help="images per class"),
    seed: int = typer.Option(0),
    keep: float = typer.Option(0.5),
    out: Path = typer.Option(Path("runs/demo"), help="output folder (student, report, plot)"),
    test_limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
) -> None:
    """Compress a shipped teacher with NC, Ours and Ours-S (K=5, structured, keep 0.5) and compare them."""
    from .capture import forward_order
    from .checkpoint import load_checkpoint
    from .compress import CompressConfig, official_mu
    from .data import dataset_info, load_dataset, load_few_shot, normalize
    from .diagnostics import layer_output_errors, plot_layer_errors
    from .evaluate import evaluate as eval_model
    from .evaluate import render_table
    from .student import save_student

    def go():
        t0 = time.perf_counter()
        model, meta = load_checkpoint(teacher)
        ds = meta["dataset"]
        images, _ = load_few_shot(ds, k, seed)
        console.print(f"teacher {meta['model']} ({teacher.name}), {len(images)} few-shot images from {ds}")
        students, reports = {}, {"teacher": eval_model(model, ds, limit=test_limit)}
        for method in ("nc", "ours", "ours-s"):
            cfg = CompressConfig(method=method, keep=keep, mu=official_mu(model))
            students[method], rep = _compress_one(model, images, cfg, f"{method}")
            reports[f"{method} ({rep.seconds:.1f} s)"] = eval_model(students[method], ds, limit=test_limit)
            save_student(students[method], out / method, meta, {**rep.to_dict(), "k": k, "seed": seed}, images)
        Console().print(render_table(reports, title=f"{meta['model']} on {ds}: structured keep {keep}, K={k}"))
        # layers whose output width is unchanged: there teacher and student outputs are comparable
        width = lambda m, n: m.get_submodule(n).weight.shape[0]  # noqa: E731
        names = [n for n in forward_order(model, images[:1]) if width(students["ours"], n) == width(model, n)]
        test = load_dataset(ds, "test")
        held_out = normalize(test.images[:500], dataset_info(ds))
        pretty = {"nc": "NC", "ours": "Ours", "ours-s": "Ours-S"}
        curves = {pretty[m]: layer_output_errors(model, s, names, held_out) for m, s in students.items()}
        plot = plot_layer_errors(curves, names, out / "layer_errors.png",
                                 f"{meta['model']}: output error per layer on 500 test images (K={k})")  # fmt: skip
        console.print(f"plot: {plot}; students under {out}/; total {time.perf_counter() - t0:.0f} s")

    _run(go)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
