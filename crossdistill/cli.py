"""Command-line interface: a thin typer layer over the library.

User errors (:class:`UserError`, bad options, bad paths) print one line and exit with status 2;
an unexpected internal error prints one line saying so (exit 1) and writes the traceback to a file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from .config import SIGNALS, CompressConfig
from .errors import UserError

if TYPE_CHECKING:  # the library is imported inside the commands: `crossdistill --help` stays fast
    from .evaluate import EvalReport

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Few-shot network compression by cross distillation."
)
console = Console(stderr=True)
REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "teachers" / "resnet20_fashion-mnist.safetensors"
DEFAULTS = CompressConfig()  # option defaults of `compress` and `demo` come from the library's dataclass


# --------------------------------------------------------------------------- errors: one line, always

# the library names its keywords; on the command line the fix is spelled as an option
_CLI_SPELLING = [
    (r"skip_unsupported=True", "--skip-unsupported"),
    (r"\bpass size= to", "pass --size to"),
    (r"^keep must", "--keep must"),
    (r"^keep for", "--keep-file ratio for"),
    (r"^k must", "--k must"),
    (r"^limit must", "--limit / --test-limit must"),
    (r"^(mu|alpha|beta) must", r"--\1 must"),
    (r"^unknown method", "unknown --method"),
    (r"^unknown solver", "unknown --solver"),
    (r"^prune must", "--prune must"),
    (r"^batch_size must", "--batch-size must"),
    (r"\bbn_mode='train'", "bn_mode train"),
]


def _cli_spelling(message: str) -> str:
    for pattern, repl in _CLI_SPELLING:
        message = re.sub(pattern, repl, message)
    return message


def _line(text: str) -> None:
    """Write one line to stderr (newlines inside a message are folded; rich would wrap it)."""
    sys.stderr.write(" ".join(str(text).split()) + "\n")
    sys.stderr.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    _line(f"warning: {message}")


def _crash_file() -> Path:
    """Where the traceback of an internal error goes: the per-user cache, else the temp folder."""
    from .data import default_cache_dir

    text = traceback.format_exc()
    for folder in (default_cache_dir() / "crashes", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                dir=folder, prefix=time.strftime("crossdistill-crash-%Y%m%d-%H%M%S-"), suffix=".txt"
            )
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return Path(name)
        except OSError:
            continue
    return Path("(could not be written)")


def _run(fn):
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # a warning is one line too
        try:
            return fn()
        except UserError as e:
            _line(f"error: {_cli_spelling(str(e))}")
            raise typer.Exit(2) from None
        except OSError as e:
            if e.filename is None:  # not about a path the user gave: ours
                raise _internal(e) from None
            _line(f"error: {e.filename}: {e.strerror or e}; check the path and its permissions")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _line("error: interrupted; outputs are swapped in only when complete, so --out is as it was")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - anything else is a bug of ours, said as such
            raise _internal(e) from None


def _internal(e: BaseException) -> typer.Exit:
    where = _crash_file()
    first = (str(e).strip().splitlines() or [""])[0][:200]
    _line(
        f"internal error ({type(e).__name__}: {first}); not a problem with your input: the full traceback "
        f"is in {where}, please report it"
    )
    return typer.Exit(1)


@app.command("train-teacher")
def train_teacher_cmd(
    model: str = typer.Option(
        "resnet20", help="registered model name (resnet20/32/56, vgg16, lenet5, resnet18, mobilenet_v2)"
    ),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist | mnist | cifar10 | cifar100"),
    # None: the recipe's own default (crossdistill.train.TrainConfig), so the CLI and the library agree
    epochs: int | None = typer.Option(None, help="training epochs [default: TrainConfig's, 8]"),
    lr: float | None = typer.Option(None, help="peak learning rate of the one-cycle schedule [default: 0.1]"),
    batch_size: int | None = typer.Option(None, help="[default: 128]"),
    seed: int = typer.Option(0),
    fp16: bool = typer.Option(False, help="store weights as float16"),
    out: Path | None = typer.Option(None, help="output .safetensors (default runs/<model>_<dataset>.safetensors)"),
    data_dir: Path | None = typer.Option(None, help="folder holding the data set files"),
    overwrite: bool = typer.Option(False, help="replace an existing --out file"),
) -> None:
    """Train a teacher (resumable: rerun the same command to continue after an interruption)."""
    from .train import TrainConfig, train_teacher

    def go():
        given = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
        recipe = {k: v for k, v in given.items() if v is not None}
        cfg = TrainConfig(model=model, dataset=dataset, seed=seed, fp16_storage=fp16, **recipe)
        path = out or Path("runs") / f"{model}_{dataset}.safetensors"  # never teachers/: those ship
        meta = train_teacher(cfg, path, data_dir, overwrite=overwrite)
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
    model_file: str | None = typer.Option(None, help="a student of your model: the file.py:function building it"),
    trust_model_file: bool = typer.Option(False, help="import the model file named in the checkpoint (runs its code)"),
) -> None:
    """Accuracy on the test split, parameters, FLOPs, size on disk and latency of a checkpoint."""
    from .checks import check_input_file, check_output_file, check_positive
    from .evaluate import evaluate_checkpoint
    from .files import atomic_write

    def go():
        check_input_file(checkpoint, "checkpoint")
        check_positive("--limit", limit, integer=True)
        if json_out is not None:
            check_output_file(json_out, overwrite=True, flag="--json")
        report, meta = evaluate_checkpoint(
            checkpoint,
            dataset=dataset,
            model_file=model_file,
            trust_model_file=trust_model_file,
            data_dir=data_dir,
            limit=limit,
            latency=latency,
        )
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

        with warnings.catch_warnings():
            from .coverage import ShortfallWarning

            warnings.simplefilter("ignore", ShortfallWarning)  # printed under the table instead
            student, report = run_method(cfg.method, teacher, images, labels, cfg, on_layer=on_layer)
        bar.update(task, completed=len(report.layers))
    return student, report


def _print_shortfall(reports: dict) -> None:
    """The shortfall warning of each compressed student (report.shortfall), under the table."""
    for label, report in reports.items():
        held = getattr(report, "heldout", None) or {}
        for text in (getattr(report, "shortfall", None), held.get("warning")):
            if text:
                console.print(f"warning ({label}): {text}", style="yellow", markup=False, highlight=False)
        if held:
            console.print(
                f"held-out output error ({label}, {held['images']} images): {held['output_error']:.4f} "
                f"(fitted images: {held['fit_output_error']:.4f})"
            )


def _ridge(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--ridge takes a number >= 0 or 'auto', got {text!r}") from None


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


# --------------------------------------------------------------------------- options -> settings


def _compress_config(
    model, fields: dict[str, Any], budget: dict[str, Any] | None = None, mir: dict[str, Any] | None = None
) -> CompressConfig:
    """The validated CompressConfig of a command's options: the one place where options become settings.

    ``fields``: options spelled as CompressConfig fields; ``mu`` None or absent: the model family's
    official mu; an empty ``include`` / ``exclude``: no pattern. ``budget``: the target options ``flops``,
    ``params``, ``latency`` (at most one given) and the settings used only with a target (``signal``,
    ``depth``, ``latency_batch``, ``alloc_floor``). ``mir``: ``refine`` and the MirConfig fields of
    --method mir / --refine mir over the model family's defaults (a None value keeps the default).
    """
    from .models import official_mu

    fields = {**fields, "mu": official_mu(model) if fields.get("mu") is None else fields["mu"]}
    for name in ("include", "exclude"):
        if name in fields:
            fields[name] = fields[name] or None
    cfg = CompressConfig(**fields)
    if budget is not None:
        targets = {n: budget[n] for n in ("flops", "params", "latency") if budget[n] is not None}
        if len(targets) > 1:
            raise UserError("give one of --target-flops, --target-params, --target-latency")
        if targets:
            cfg.target = targets
            for name in ("signal", "depth", "latency_batch", "alloc_floor"):
                setattr(cfg, name, budget[name])
    if mir is not None:
        from .mir import method_defaults, refine_defaults

        mir = dict(mir)
        cfg.refine = mir.pop("refine")
        cfg.mir = method_defaults(model) if cfg.method == "mir" else refine_defaults(model)
        for name, value in mir.items():
            if value is not None:
                setattr(cfg.mir, name, value)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- checks before the work


def _check_compress_args(
    out: Path,
    overwrite: bool,
    device: str,
    files: dict[str, Path | None],
    folders: dict[str, Path | None],
    numbers: dict[str, float | None],
) -> None:
    """Everything checkable from the command line alone, before a model is loaded or an image read.

    ``files`` / ``folders`` / ``numbers`` map an option's CLI spelling to its value; numbers are
    positive, and whole except ``--lr``.
    """
    from .checks import check_device, check_input_dir, check_input_file, check_output_dir, check_positive
    from .outdir import clean_stale

    clean_stale(out)
    check_output_dir(out, overwrite)
    for flag, path in files.items():
        if path is not None:
            check_input_file(path, flag)
    for flag, path in folders.items():
        if path is not None:
            check_input_dir(path, flag)
    for flag, value in numbers.items():
        check_positive(flag, value, integer=flag != "--lr")
    check_device(device)


def _check_classes_fit(model, x, classes: list[str], flag: str) -> None:
    """A folder with more classes than the model has outputs cannot be labelled or scored."""
    import torch

    from .checks import check_model_output

    try:
        with torch.no_grad():
            out = model.eval()(x[:1])
    except RuntimeError as e:
        raise UserError(f"the model cannot run on images of shape {tuple(x.shape[1:])}: {e}") from e
    check_model_output(out, "the model", logits=bool(classes))
    if len(classes) > out.shape[-1]:
        raise UserError(
            f"{flag} has {len(classes)} classes but the model has {out.shape[-1]} outputs; "
            "use the class folders the model was trained on"
        )


def _check_target(teacher, student, x, cfg) -> dict:
    """The target measured on the real student: FLOPs / params counted, latency timed against the teacher."""
    from .target import check_achieved

    check = check_achieved(teacher, student, tuple(x.shape[1:]), cfg)
    noise = f" (timing noise ±{check['noise']:.3f})" if "noise" in check else ""
    console.print(f"target {check['kind']} {check['asked']}: achieved {check['achieved']:.3f}{noise}")
    return check


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
    val_images: Path | None = typer.Option(
        None, help="with --images: folder of other images, never fitted: the report gives the error on them"
    ),
    dataset: str | None = typer.Option(None, help="data set for the few-shot draw (default: the teacher's)"),
    k: int = typer.Option(5, help="images per class drawn from the train split"),
    seed: int = typer.Option(0, help="seed of the few-shot draw"),
    method: str = typer.Option(
        DEFAULTS.method,
        help="nc | ours | ours-s | correction | imitation | l1 | l1+bp | fitnet | fskd | thinet | cp | mir",
    ),
    mu: float | None = typer.Option(None, help="ours: weight of L^c (default: 0.9 ResNets, 0.6 others)"),
    alpha: float = typer.Option(DEFAULTS.alpha, help="ours-s: teacher-side mix"),
    beta: float = typer.Option(DEFAULTS.beta, help="ours-s: student-side mix"),
    prune: str = typer.Option(DEFAULTS.prune, help="structured | unstructured"),
    keep: float = typer.Option(DEFAULTS.keep, help="fraction of channels (structured) or weights (unstructured) kept"),
    keep_file: Path | None = typer.Option(None, help="YAML mapping layer-name pattern -> keep ratio"),
    round_to: int = typer.Option(DEFAULTS.round_to, help="structured: round kept channel counts to a multiple (8)"),
    holdout: float = typer.Option(DEFAULTS.holdout, help="fraction of the images held out of the fit, to report on"),
    ridge: str = typer.Option(
        str(DEFAULTS.ridge), help="lstsq ridge (x mean Gram diagonal), or auto: chosen on the --holdout images"
    ),
    safety: str = typer.Option(
        DEFAULTS.safety,
        help="views: check the student against the no-re-fit start (and the L1 student) on flipped/shifted views, "
        "fall back if worse | off",
    ),
    include_linear: bool = typer.Option(DEFAULTS.include_linear, help="also prune / re-fit Linear layers"),
    skip_unsupported: bool = typer.Option(
        DEFAULTS.skip_unsupported, help="leave layers that cannot be compressed untouched"
    ),
    solver: str = typer.Option(DEFAULTS.solver, help="lstsq (exact) | adam (official schedule)"),
    iterations: int = typer.Option(DEFAULTS.iterations, help="adam: iterations per layer"),
    lr: float = typer.Option(DEFAULTS.lr, help="adam: learning rate"),
    recalibrate_bn: bool = typer.Option(DEFAULTS.recalibrate_bn, help="re-estimate BN statistics on the few images"),
    include: list[str] | None = typer.Option(None, help="only layers matching these name patterns"),
    exclude: list[str] | None = typer.Option(None, help="leave layers matching these name patterns"),
    device: str = typer.Option(DEFAULTS.device, help="cpu | cuda | auto"),
    out: Path = typer.Option(Path("runs/student"), help="output folder"),
    test_limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
    latency: bool = typer.Option(True, help="measure CPU latency at batch 1 and 64"),
    data_dir: Path | None = typer.Option(None),
    overwrite: bool = typer.Option(False, help="replace the files of a non-empty --out folder"),
    trust_model_file: bool = typer.Option(False, help="--teacher of your model: import the file it names"),
    # --- budget (crossdistill.target): give one target instead of --keep
    target_flops: float | None = typer.Option(None, help="student FLOPs as a fraction of the teacher's, e.g. 0.5"),
    target_params: float | None = typer.Option(None, help="student parameters as a fraction of the teacher's"),
    target_latency: float | None = typer.Option(
        None, help="student latency on this device (at --latency-batch) as a fraction of the teacher's"
    ),
    latency_batch: int = typer.Option(DEFAULTS.latency_batch, help="batch size of a latency target"),
    signal: str = typer.Option(DEFAULTS.signal, help="target: sensitivity signal, " + " | ".join(SIGNALS)),
    alloc_floor: float = typer.Option(
        DEFAULTS.alloc_floor, help="target: smallest kept fraction of a layer (lowered, warned, if the target needs)"
    ),
    depth: str = typer.Option(DEFAULTS.depth, help="target: channels | blocks (drop residual blocks) | mixed"),
    # --- holistic refinement (crossdistill.mir): --refine mir, and the settings of --method mir ---
    refine: str | None = typer.Option(None, help="mir: then train end to end to the teacher's pre-pool features"),
    mir_steps: int | None = typer.Option(
        None, help="mir: training steps (default 300 refine; --method mir 600 residual nets, 200 plain)"
    ),
    mir_lr: float | None = typer.Option(None, help="mir: Adam learning rate (default 1e-4)"),
    mir_holdout_folds: int = typer.Option(0, help="mir: >= 2 chooses the steps on held-out images (K >= 2)"),
    mir_feature_layer: str | None = typer.Option(None, help="mir: module whose input is mimicked"),
) -> None:
    """Compress a teacher with a few images; save the student and print a before/after table.

    Either --teacher CKPT (few-shot draw of K per class from --dataset) or --model-file FILE.py:FN
    [--weights W] --images DIR (your model and your images).
    """
    from .checkpoint import load_checkpoint
    from .data import load_few_shot
    from .evaluate import evaluate as eval_model
    from .plan import load_keep_file
    from .student import save_student

    def go():
        if (teacher is None) == (model_file is None):
            raise UserError("give either --teacher CKPT or --model-file FILE.py:FUNCTION (with --images DIR)")
        _check_compress_args(
            out,
            overwrite,
            device,
            files={"--teacher": teacher, "--weights": weights, "--keep-file": keep_file},
            folders={"--images": images, "--test-images": test_images, "--val-images": val_images},
            numbers={"--size": size, "--k": k, "--iterations": iterations, "--test-limit": test_limit, "--lr": lr},
        )
        if model_file is not None:
            from .checks import check_model
            from .evaluate import accuracy
            from .models import load_model_file
            from .usermodel import images_from_folder, load_weights

            if images is None:
                raise UserError("--model-file needs --images DIR: a folder of images the model takes")
            model = load_model_file(model_file)
            if weights is not None:
                load_weights(model, weights)
            model.eval()
            check_model(model)
            channels = _first_conv_channels(model)
            x, labels, m, s, classes = images_from_folder(images, channels, size, _floats(mean), _floats(std))
            labels = labels if bool((labels >= 0).all()) else None
            meta = {
                "model_file": model_file,
                "in_channels": channels,
                "mean": m,
                "std": s,
                "weights": str(weights) if weights else None,
                "classes": classes or None,
            }
            ds, title = None, f"{Path(model_file.rpartition(':')[0]).name}, {len(x)} images from {images}"
            _check_classes_fit(model, x, classes, "--images")
            val = None
            if val_images is not None:  # normalised like the fitted images
                val = images_from_folder(val_images, channels, size or x.shape[-1], m, s)[0]
            test = None
            if test_images is not None:  # read before the work; labelled by class *name* in the images' classes
                tx, tl, _, _, tclasses = images_from_folder(
                    test_images, channels, size or x.shape[-1], m, s, classes=classes or None
                )
                _check_classes_fit(model, x, tclasses, "--test-images")
                test = (tx[:test_limit], tl[:test_limit]) if test_limit is not None else (tx, tl)
        else:
            if images is not None:
                raise UserError("--images goes with --model-file; with --teacher the few-shot set is drawn by --k")
            if val_images is not None:
                raise UserError("--val-images goes with --model-file; with --teacher hold images out with --holdout")
            val = None
            model, meta = load_checkpoint(teacher, trust_model_file=trust_model_file)
            if meta.get("model_file"):
                raise UserError(f"{teacher} is a student of your own model; compress with --model-file and --images")
            ds = dataset or meta["dataset"]
            x, labels = load_few_shot(ds, k, seed, data_dir)
            title = f"{meta['model']}, K={k}, seed {seed}"
        fields = {
            "method": method,
            "mu": mu,
            "alpha": alpha,
            "beta": beta,
            "prune": prune,
            "keep": keep,
            "solver": solver,
            "iterations": iterations,
            "lr": lr,
            "recalibrate_bn": recalibrate_bn,
            "include": include,
            "exclude": exclude,
            "device": device,
            "include_linear": include_linear,
            "skip_unsupported": skip_unsupported,
            "keep_overrides": load_keep_file(keep_file) if keep_file else {},
            "round_to": round_to,
            "holdout": holdout,
            "ridge": _ridge(ridge),
            "safety": safety,
        }
        budget = {
            "flops": target_flops,
            "params": target_params,
            "latency": target_latency,
            "signal": signal,
            "depth": depth,
            "latency_batch": latency_batch,
            "alloc_floor": alloc_floor,
        }
        mir = {
            "refine": refine,
            "steps": mir_steps,
            "lr": mir_lr,
            "holdout_folds": mir_holdout_folds,
            "feature_layer": mir_feature_layer,
        }
        cfg = _compress_config(model, fields, budget, mir)
        student, report = _compress_one(model, x, cfg, f"{method}", labels)
        student = student.cpu()
        if val is not None:  # the error on images the fit never saw, as with holdout
            from .coverage import heldout_errors

            names = [r.name for r in report.layers if not r.name.startswith("<")]
            report.heldout = heldout_errors(model.cpu().eval(), student, x.cpu(), val, names)
        if model_file is not None:  # accuracy only on a given labelled test folder
            shape = tuple(x.shape[1:])
            measure = lambda net: eval_model(net, input_shape=shape, latency=latency)  # noqa: E731
        else:
            measure = lambda net: eval_model(net, ds, data_dir=data_dir, limit=test_limit, latency=latency)  # noqa: E731
        reports = {"teacher": measure(model), f"student ({method})": measure(student)}
        if model_file is not None and test is not None:
            for name, net in (("teacher", model), (f"student ({method})", student)):
                reports[name].accuracy, reports[name].test_images = accuracy(net, *test), int((test[1] >= 0).sum())
        budget = f"target {cfg.target}" if cfg.target else f"keep {keep}"
        Console().print(render_table(reports, title=f"{title}: {prune} {budget}"))
        files = {}
        if cfg.target:
            from .target import plot_allocation

            report.allocation["check"] = _check_target(model, student, x, cfg)
            files["allocation.png"] = lambda path: plot_allocation(report.allocation, path)
        _print_shortfall({method: report})
        rep = {
            **report.to_dict(),
            "k": k if model_file is None else None,
            "seed": seed,
            "dataset": ds,
            "images": str(images) if images else None,
            "evaluation": {n: r.to_dict() for n, r in reports.items()},
        }
        extra = {"method": method, "k": k, "seed": seed} if model_file is None else {"method": method}
        paths = save_student(student, out, meta, rep, x, overwrite=overwrite, files=files, **extra)
        console.print(
            f"compressed in {report.seconds:.1f} s (peak memory {report.peak_memory_mb:.0f} MB); "
            f"student written to {paths['weights'].parent}/ "
            f"({', '.join(p.name for p in paths.values())})"
        )

    _run(go)


@app.command()
def demo(
    teacher: Path = typer.Option(DEMO_TEACHER, help="shipped teacher to compress"),
    k: int = typer.Option(5, help="images per class"),
    seed: int = typer.Option(0),
    keep: float = typer.Option(DEFAULTS.keep),
    out: Path = typer.Option(Path("runs/demo"), help="output folder (student, report, plot)"),
    test_limit: int | None = typer.Option(None, help="evaluate on the first N test images only"),
    overwrite: bool = typer.Option(False, help="replace the results of an earlier demo in --out"),
) -> None:
    """Compress a shipped teacher with NC, Ours and Ours-S (K=5, structured, keep 0.5) and compare them."""
    from .capture import forward_order
    from .checkpoint import load_checkpoint
    from .data import dataset_info, load_dataset, load_few_shot, normalize
    from .diagnostics import layer_output_errors, plot_layer_errors
    from .evaluate import evaluate as eval_model
    from .student import save_student

    def go():
        from .checks import check_output_dir

        t0 = time.perf_counter()
        check_output_dir(out, overwrite)
        model, meta = load_checkpoint(teacher)
        ds = meta["dataset"]
        images, _ = load_few_shot(ds, k, seed)
        console.print(f"teacher {meta['model']} ({teacher.name}), {len(images)} few-shot images from {ds}")
        students, reports, compress_reports = {}, {"teacher": eval_model(model, ds, limit=test_limit)}, {}
        for method in ("nc", "ours", "ours-s"):
            cfg = _compress_config(model, {"method": method, "keep": keep})
            students[method], rep = _compress_one(model, images, cfg, f"{method}")
            compress_reports[method] = rep
            reports[f"{method} ({rep.seconds:.1f} s)"] = eval_model(students[method], ds, limit=test_limit)
            save_student(
                students[method],
                out / method,
                meta,
                {**rep.to_dict(), "k": k, "seed": seed},
                images,
                overwrite=overwrite,
            )
        Console().print(render_table(reports, title=f"{meta['model']} on {ds}: structured keep {keep}, K={k}"))
        _print_shortfall(compress_reports)
        # layers whose output width is unchanged: there teacher and student outputs are comparable
        width = lambda m, n: m.get_submodule(n).weight.shape[0]  # noqa: E731
        names = [n for n in forward_order(model, images[:1]) if width(students["ours"], n) == width(model, n)]
        test = load_dataset(ds, "test")
        held_out = normalize(test.images[:500], dataset_info(ds))
        pretty = {"nc": "NC", "ours": "Ours", "ours-s": "Ours-S"}
        curves = {pretty[m]: layer_output_errors(model, s, names, held_out) for m, s in students.items()}
        plot = plot_layer_errors(
            curves,
            names,
            out / "layer_errors.png",
            f"{meta['model']}: output error per layer on 500 test images (K={k})",
        )
        console.print(f"plot: {plot}; students under {out}/; total {time.perf_counter() - t0:.0f} s")

    _run(go)


# --------------------------------------------------------------------------- the before/after table


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _fmt_flops(n: int) -> str:
    return f"{n / 1e9:.2f} GFLOPs" if n >= 1e9 else f"{n / 1e6:.2f} MFLOPs"


def _fmt_bytes(n: int) -> str:  # decimal units: 1 KB = 1000 bytes
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


_ROWS: list[tuple[str, str, Callable[[Any], str], bool]] = [  # label, field, formatter, show ratio to the first column
    ("Top-1 accuracy", "accuracy", lambda a: "-" if a is None else f"{100 * a:.2f} %", False),
    ("Test images", "test_images", lambda n: f"{n:,}", False),
    ("Parameters", "params", _fmt_count, True),
    ("Nonzero parameters", "nonzero_params", _fmt_count, True),
    ("FLOPs (2/MAC, batch 1)", "flops", _fmt_flops, True),
    ("Sparse FLOPs", "sparse_flops", _fmt_flops, True),
    ("Size on disk", "size_bytes", _fmt_bytes, True),
    ("Latency batch 1", "latency_b1_ms", _fmt_ms, True),
    ("Latency batch 64", "latency_b64_ms", _fmt_ms, True),
    ("CPU threads", "threads", str, False),
]


def render_table(reports: dict[str, EvalReport], title: str | None = None) -> Table:
    """A rich table with one column per model (e.g. ``{"teacher": ..., "student": ...}``) and one row per metric.

    From the second column on, size and speed figures also show their
    percentage of the first column's value (e.g. a student against its teacher).
    """
    table = Table(title=title)
    table.add_column("metric", style="bold")
    names = list(reports)
    for name in names:
        table.add_column(name, justify="right")
    first = reports[names[0]] if names else None
    for label, key, fmt, ratio in _ROWS:
        cells = []
        for name in names:
            value = getattr(reports[name], key)
            text = fmt(value)
            base = getattr(first, key)
            if ratio and reports[name] is not first and value is not None and base:
                text += f" ({100 * value / base:.0f}%)"
            cells.append(text)
        table.add_row(label, *cells)
    return table


def main(argv: list[str] | None = None) -> int:
    """The ``crossdistill`` command: option parsing errors are one line too (exit 2)."""
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="crossdistill", standalone_mode=False)
    except ClickException as e:
        _line(f"error: {e.format_message()} (see crossdistill --help)")
        return e.exit_code
    except Abort:
        _line("error: aborted")
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
