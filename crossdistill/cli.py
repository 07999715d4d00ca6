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


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def _first_conv_channels(model) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise UserError("the model has no Conv2d layer; crossdistill compresses convolutional networks")
    return first.in_channels


@app.command()
def compress(
    teacher: Path | None = typer.Option(None, help="teacher checkpoint (.safetensors + .json) of our registry"),
    model_file: str | None = typer.Option(
        None, help="your model instead: path/to/file.py:function, function() returns the nn.Module"
    ),
    weights: Path | None = typer.Option(None, help="with --model-file: state dict (.pt/.pth/.safetensors)"),
    images: Path | None = typer.Option(
        None, help="folder of few-shot images (one sub-folder per class, or flat and unlabelled); all are used"
    ),
    size: int | None = typer.Option(None, help="with --images: resize images to SIZE x SIZE"),
    mean: str | None = typer.Option(None, help="with --images: per-channel mean of x/255, e.g. 0.5,0.5,0.5"),
    std: str | None = typer.Option(None, help="with --images: per-channel std (default: mean/std of the images)"),
    test_images: Path | None = typer.Option(None, help="with --images: labelled folder to measure accuracy on"),
    dataset: str | None = typer.Option(None, help="data set for the few-shot draw (default: the teacher's)"),
    k: int = typer.Option(5, help="images per class drawn from the train split"),
    seed: int = typer.Option(0, help="seed of the few-shot draw"),
    method: str = typer.Option(
        "ours", help="nc | ours | ours-s | correction | imitation | l1 | l1+bp | fitnet | fskd | thinet | cp | mir"
    ),  # fmt: skip
    mu: float | None = typer.Option(None, help="ours: weight of L^c (default: 0.9 ResNets, 0.6 others)"),
    alpha: float = typer.Option(0.7, help="ours-s: teacher-side mix"),
    beta: float = typer.Option(0.7, help="ours-s: student-side mix"),
    prune: str = typer.Option("structured", help="structured | unstructured"),
    keep: float = typer.Option(0.5, help="fraction of channels (structured) or weights (unstructured) kept"),
    keep_file: Path | None = typer.Option(None, help="YAML mapping layer-name pattern -> keep ratio"),
    include_linear: bool = typer.Option(False, help="also prune / re-fit Linear layers"),
    skip_unsupported: bool = typer.Option(False, help="leave layers that cannot be compressed untouched"),
    solver: str = typer.Option("lstsq", help="lstsq (exact) | adam (official schedule)"),
    iterations: int = typer.Option(3000, help="adam: iterations per layer"),
    lr: float = typer.Option(5e-4, help="adam: learning rate"),
    recalibrate_bn: bool = typer.Option(False, help="re-estimate BN statistics on the few images"),
    include: list[str] | None = typer.Option(None, help="only layers matching these name patterns"),
    exclude: list[str] | None = typer.Option(None, help="leave layers matching these name patterns"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    out: Path = typer.Option(Path("runs/student"), help="output folder"),
    test_limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
    latency: bool = typer.Option(True, help="measure CPU latency at batch 1 and 64"),
    data_dir: Path | None = typer.Option(None),
    # --- holistic refinement (crossdistill.mir): --refine mir, and the settings of --method mir ---
    refine: str | None = typer.Option(None, help="mir: then train end to end to the teacher's pre-pool features"),
    mir_steps: int | None = typer.Option(None, help="mir: training steps (default 300 refine, 400 --method mir)"),
    mir_lr: float | None = typer.Option(None, help="mir: Adam learning rate (default 1e-4 refine, 1e-3 --method mir)"),
    mir_holdout_folds: int = typer.Option(0, help="mir: >= 2 chooses the steps on held-out images (K >= 2)"),
    mir_feature_layer: str | None = typer.Option(None, help="mir: module whose input is mimicked"),
) -> None:
    """Compress a teacher with a few images; save the student and print a before/after table.

    Either --teacher CKPT (few-shot draw of K per class from --dataset) or --model-file FILE.py:FN
    [--weights W] --images DIR (your model and your images).
    """
    from .checkpoint import load_checkpoint
    from .compress import CompressConfig, official_mu
    from .data import load_few_shot
    from .evaluate import evaluate as eval_model
    from .evaluate import render_table
    from .plan import load_keep_file
    from .student import save_student

    def go():
        if (teacher is None) == (model_file is None):
            raise UserError("give either --teacher CKPT or --model-file FILE.py:FUNCTION (with --images DIR)")
        if model_file is not None:
            from .usermodel import accuracy, images_from_folder, load_model_file, load_weights

            if images is None:
                raise UserError("--model-file needs --images DIR: a folder of images the model takes")
            model = load_model_file(model_file)
            if weights is not None:
                load_weights(model, weights)
            model.eval()
            channels = _first_conv_channels(model)
            x, labels, m, s, _ = images_from_folder(images, channels, size, _floats(mean), _floats(std))
            labels = labels if bool((labels >= 0).all()) else None
            meta = {"model_file": model_file, "in_channels": channels, "mean": m, "std": s,
                    "weights": str(weights) if weights else None}  # fmt: skip
            ds, title = None, f"{Path(model_file.rpartition(':')[0]).name}, {len(x)} images from {images}"
        else:
            if images is not None:
                raise UserError("--images goes with --model-file; with --teacher the few-shot set is drawn by --k")
            model, meta = load_checkpoint(teacher)
            ds = dataset or meta["dataset"]
            x, labels = load_few_shot(ds, k, seed, data_dir)
            title = f"{meta['model']}, K={k}, seed {seed}"
        cfg = CompressConfig(
            method=method, mu=official_mu(model) if mu is None else mu, alpha=alpha, beta=beta, prune=prune,
            keep=keep, solver=solver, iterations=iterations, lr=lr, recalibrate_bn=recalibrate_bn,
            include=include or None, exclude=exclude or None, device=device, include_linear=include_linear,
            skip_unsupported=skip_unsupported, keep_overrides=load_keep_file(keep_file) if keep_file else {},
        )  # fmt: skip
        # --- holistic refinement settings (crossdistill.mir) ---
        from .mir import MirConfig, method_defaults

        cfg.refine = refine
        cfg.mir = method_defaults() if method == "mir" else MirConfig()
        cfg.mir.steps = cfg.mir.steps if mir_steps is None else mir_steps
        cfg.mir.lr = cfg.mir.lr if mir_lr is None else mir_lr
        cfg.mir.holdout_folds, cfg.mir.feature_layer = mir_holdout_folds, mir_feature_layer
        cfg.validate()
        student, report = _compress_one(model, x, cfg, f"{method}", labels)
        student = student.cpu()
        if model_file is not None:  # accuracy only on a given labelled test folder
            shape = tuple(x.shape[1:])
            reports = {"teacher": eval_model(model, input_shape=shape, latency=latency),
                       f"student ({method})": eval_model(student, input_shape=shape, latency=latency)}  # fmt: skip
            if test_images is not None:
                tx, tl, *_ = images_from_folder(test_images, x.shape[1], size or x.shape[-1], meta["mean"],
                                                meta["std"])  # fmt: skip
                if test_limit is not None:
                    tx, tl = tx[:test_limit], tl[:test_limit]
                for name, net in (("teacher", model), (f"student ({method})", student)):
                    reports[name].accuracy, reports[name].test_images = accuracy(net, tx, tl)
        else:
            reports = {
                "teacher": eval_model(model, ds, data_dir=data_dir, limit=test_limit, latency=latency),
                f"student ({method})": eval_model(student, ds, data_dir=data_dir, limit=test_limit, latency=latency),
            }
        Console().print(render_table(reports, title=f"{title}: {prune} keep {keep}"))
        rep = {**report.to_dict(), "k": k if model_file is None else None, "seed": seed, "dataset": ds,
               "images": str(images) if images else None,
               "evaluation": {n: r.to_dict() for n, r in reports.items()}}  # fmt: skip
        extra = {"method": method, "k": k, "seed": seed} if model_file is None else {"method": method}
        paths = save_student(student, out, meta, rep, x, extra)
        console.print(f"compressed in {report.seconds:.1f} s (peak memory {report.peak_memory_mb:.0f} MB); "
                      f"student written to {paths['weights'].parent}/ "
                      f"({', '.join(p.name for p in paths.values())})")  # fmt: skip

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
