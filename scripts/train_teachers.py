"""Train the shipped Fashion-MNIST teachers (resumable; rerun to continue).

    python scripts/train_teachers.py [resnet20 resnet56 vgg16 resnet18 mobilenet_v2]

Recipes are the ones below; each run writes teachers/<model>_fashion-mnist.safetensors + .json.
"""

import sys
from pathlib import Path

from crossdistill.train import TrainConfig, train_teacher

RECIPES = {
    "resnet20": TrainConfig(model="resnet20", epochs=6),
    "resnet56": TrainConfig(model="resnet56", epochs=6),
    "vgg16": TrainConfig(model="vgg16", epochs=2, lr=0.05, fp16_storage=True),  # 2 epochs: what a session affords
    # torchvision families (crossdistill/torchvision_style.py); 4 epochs: what a shared 2-core session affords
    "resnet18": TrainConfig(model="resnet18", epochs=4),
    "mobilenet_v2": TrainConfig(model="mobilenet_v2", epochs=4),
}

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "teachers"
    for name in sys.argv[1:] or list(RECIPES):
        out = root / f"{name}_fashion-mnist.safetensors"
        if out.exists():
            print(f"{out} exists; skipping")
            continue
        meta = train_teacher(RECIPES[name], out, overwrite=True)  # absent (checked above); teachers/ is its job
        print(f"{name}: test accuracy {meta['test_accuracy']:.4f} in {meta['train_time_s']:.0f}s", flush=True)
