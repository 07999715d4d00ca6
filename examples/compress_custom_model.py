"""Compress a CNN that crossdistill has never seen, from a folder of images, and export it as ONNX.

    python examples/compress_custom_model.py [--out DIR] [--train-images 3000] [--epochs 2]

Steps (each one a block below):
1. build a small CNN of our own: depthwise-separable block, a residual block, global pooling and
   a two-layer Linear head (``build`` is importable, so the saved student can be rebuilt);
2. train it briefly on a slice of Fashion-MNIST (Debian's ``dataset-fashion-mnist`` files or
   crossdistill's download); without the data set it stays randomly initialised, and says so;
3. write 5 images per class as PNG files into a folder: the "few-shot" data a user would have;
4. load that folder with crossdistill, compress the model to half its width (Linear head
   included) with cross distillation, and compare it with the teacher on 1000 test images;
5. save the student: safetensors + JSON, torch.export program and ONNX, and check the ONNX file
   in onnxruntime against PyTorch.

Runs in well under a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = [0.2860], [0.3530]  # Fashion-MNIST pixel statistics (of x / 255)


class SmallNet(nn.Module):
    """Not one of crossdistill's models: depthwise-separable stem, a residual block, an MLP head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.separable = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # depthwise
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # pointwise
        )  # fmt: skip
        self.res = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.separable(self.stem(x))
        x = F.relu(x + self.res(x))
        return self.head(x)


def build() -> nn.Module:
    return SmallNet()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary one)")
    parser.add_argument("--train-images", type=int, default=3000, help="Fashion-MNIST images to train on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--keep", type=float, default=0.5)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="crossdistill-example-"))
    t0 = time.perf_counter()
    torch.manual_seed(0)

    from PIL import Image

    from crossdistill import compress, save_student
    from crossdistill.data import load_dataset
    from crossdistill.errors import UserError
    from crossdistill.evaluate import accuracy, evaluate
    from crossdistill.usermodel import images_from_folder, normalise_with

    # 1-2. the user's model, trained briefly (or random weights when Fashion-MNIST is unavailable)
    teacher = build()
    try:
        train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    except (UserError, OSError) as e:
        train = test = None
        print(f"Fashion-MNIST unavailable ({e}); the model keeps its RANDOM initial weights")
    if train is not None:
        x_train = normalise_with(train.images[: args.train_images], MEAN, STD)
        y_train = train.labels[: args.train_images]
        opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
        steps = args.epochs * -(-len(x_train) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
        teacher.train()
        for _ in range(args.epochs):
            for i in torch.randperm(len(x_train)).split(64):
                loss = F.cross_entropy(teacher(x_train[i]), y_train[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        print(f"trained on {len(x_train)} images for {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")
    teacher.eval()
    torch.save(teacher.state_dict(), out / "teacher.pt")

    # 3. a folder of few-shot images, 5 per class (what a user brings)
    few = out / "few_shot"
    source = train if train is not None else None
    for c in range(10):
        (few / f"class_{c}").mkdir(parents=True, exist_ok=True)
        if source is not None:
            picks = (source.labels[args.train_images :] == c).nonzero().flatten()[:5] + args.train_images
            arrays = [source.images[j, 0].numpy() for j in picks]
        else:
            arrays = [torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy() for _ in range(5)]
        for j, a in enumerate(arrays):
            Image.fromarray(a).save(few / f"class_{c}" / f"{j}.png")

    # 4. load the folder, compress (convs and the Linear head), compare with the teacher
    images, labels, mean, std, classes = images_from_folder(few, channels=1, mean=MEAN, std=STD)
    student, report = compress(teacher, images, method="ours", keep=args.keep, include_linear=True)
    print(f"compressed with {len(images)} images ({len(classes)} classes) in {report.seconds:.1f} s: "
          f"params {report.params_before} -> {report.params_after}, "
          f"FLOPs {report.flops_before} -> {report.flops_after}")  # fmt: skip
    if test is not None:
        x_test, y_test = normalise_with(test.images[:1000], MEAN, STD), test.labels[:1000]
        for name, net in (("teacher", teacher), ("student", student)):
            acc, n = accuracy(net, x_test, y_test), len(y_test)
            size = evaluate(net, input_shape=(1, 28, 28), latency=False)
            print(f"{name}: accuracy {100 * acc:.1f}% on {n} test images, {size.params} params, {size.flops} FLOPs")

    # 5. save: safetensors + JSON (rebuilds through this file's build()), torch.export, ONNX
    meta = {"model_file": f"{Path(__file__).resolve()}:build", "in_channels": 1, "mean": mean, "std": std}
    paths = save_student(student, out / "student", meta, report.to_dict(), images, overwrite=True)  # rerun: replace
    print("written:", ", ".join(str(p) for p in paths.values()))
    if "onnx" in paths:
        try:
            import onnxruntime as ort
        except ImportError:
            print("onnxruntime not installed: skipping the ONNX check (pip install -e '.[export]')")
        else:
            session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
            (y_onnx,) = session.run(None, {"images": images[:8].numpy()})
            with torch.no_grad():
                diff = float((torch.from_numpy(y_onnx) - student(images[:8])).abs().max())
            print(f"onnxruntime output matches PyTorch: max abs difference {diff:.2e}")
            assert diff < 1e-3, diff
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs under {out}")


if __name__ == "__main__":
    main()
